"""FineTuneSchedule through kubectl on the API server: the CRD installs, `fts` resolves, the example is
accepted, bad specs are refused with the field named, and `kubectl get fts` shows the printer columns with the
values the operator writes to the status."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, Kubectl, Raw, wait_for

CRD = REPO / "crds" / "finetune.dev_finetuneschedules.yaml"
EXAMPLE = REPO / "examples" / "finetuneschedule.yaml"


@pytest.fixture
def installed(kubectl: Kubectl) -> dict[str, Any]:
    kubectl("apply", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/finetuneschedules.finetune.dev", "--timeout=10s")
    return dict(yaml.safe_load(EXAMPLE.read_text()))


def _refused(kubectl: Kubectl, namespace: str, tmp_path: Path, obj: dict[str, Any]) -> str:
    manifest = tmp_path / "fts.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    result = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(manifest), check=False)
    assert result.returncode != 0, result.stdout
    assert 'The FineTuneSchedule "support-bot-weekly" is invalid' in result.stderr
    return str(result.stderr)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"schedule": "0 3 * *"}, "spec.schedule"),
        ({"schedule": None}, None),  # with no trigger either: below
        ({"concurrencyPolicy": "Allow"}, "spec.concurrencyPolicy"),
        ({"historyLimit": 51}, "spec.historyLimit"),
        ({"trigger": {"newExamples": 0}}, "spec.trigger.newExamples"),
        ({"trigger": {"newExamples": 5, "checkSeconds": 1}}, "spec.trigger.checkSeconds"),
        ({"dataset": {"base": "hf://org/data"}}, "spec.dataset.base"),
        ({"timeZone": "not a zone"}, "spec.timeZone"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
    installed: dict[str, Any],
    change: dict[str, Any],
    named: str | None,
) -> None:
    obj = copy.deepcopy(installed)
    for key, value in change.items():
        if value is None:
            obj["spec"].pop(key)
        else:
            obj["spec"][key] = value
    if named is None:
        obj["spec"].pop("trigger")
        error = _refused(kubectl, namespace, tmp_path, obj)
        assert "set schedule, trigger or both" in error
        return
    assert named in _refused(kubectl, namespace, tmp_path, obj)


def test_a_trigger_needs_captured_data(
    kubectl: Kubectl, namespace: str, tmp_path: Path, installed: dict[str, Any]
) -> None:
    obj = copy.deepcopy(installed)
    del obj["spec"]["dataset"]["fromCapture"]
    error = _refused(kubectl, namespace, tmp_path, obj)
    assert "spec.trigger" in error and "needs dataset.fromCapture" in error


def test_the_example_is_stored_as_written(
    kubectl: Kubectl, namespace: str, tmp_path: Path, installed: dict[str, Any]
) -> None:
    obj = copy.deepcopy(installed)
    obj["spec"]["suspend"] = True  # the operator starts no run for it
    manifest = tmp_path / "fts.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    kubectl("apply", "-n", namespace, "-f", str(manifest))
    stored = yaml.safe_load(kubectl("get", "fts", "-n", namespace, "support-bot-weekly", "-o", "yaml").stdout)
    assert stored["spec"]["concurrencyPolicy"] == "Forbid" and stored["spec"]["historyLimit"] == 5
    # the template is kept as written (the operator checks it as a FineTuneJob spec)
    assert stored["spec"]["jobTemplate"]["spec"]["dataset"] == {"test": "s3://my-bucket/support/test.jsonl"}
    assert "support-bot-weekly" in kubectl("get", "finetune", "-n", namespace, "-o", "name").stdout


def _job(raw: Raw, namespace: str, name: str) -> dict[str, Any] | None:
    code, body, _ = raw.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
    return body if code == 200 else None


def test_a_due_schedule_creates_its_data_job_and_get_fts_shows_it(
    kubectl: Kubectl, namespace: str, raw: Raw, tmp_path: Path, installed: dict[str, Any]
) -> None:
    """With the embedded cluster's operator: an hourly schedule whose last run was two hours ago is due now
    (the newest missed time runs, the older one counts as missed): its data Job is created, owned by the
    schedule, running the trainer's assemble stage; `kubectl get fts` shows the columns."""
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "metadata": {"name": "hourly"},
        "spec": {
            "schedule": "@hourly",
            "dataset": {"base": "s3://finetune-demo/data/train.jsonl"},
            "jobTemplate": {
                "spec": {
                    "baseModel": {"uri": "s3://finetune-demo/models/tiny-llama"},
                    "dataset": {"test": "s3://finetune-demo/data/test.jsonl"},
                    "storage": {"output": "s3://finetune-demo/runs"},
                    "resources": {"gpus": 0, "gpuType": "cpu"},
                }
            },
        },
    }
    manifest = tmp_path / "hourly.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    kubectl("apply", "-n", namespace, "-f", str(manifest))
    base = f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetuneschedules/hourly"
    code, created, _ = raw.request("GET", base)
    assert code == 200, created
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    patch = {"status": {"lastScheduleTime": two_hours_ago.strftime("%Y-%m-%dT%H:%M:%SZ")}}
    code, body, _ = raw.request("PATCH", f"{base}/status", patch, content_type="application/merge-patch+json")
    assert code == 200, body
    job = wait_for(lambda: _job(raw, namespace, "hourly-1-data"), "the data Job", timeout=60)
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "FineTuneSchedule",
        "hourly",
        created["metadata"]["uid"],
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "assemble"
    config = json.loads(next(e["value"] for e in container["env"] if e["name"] == "FTJ_CONFIG"))
    assert config["assemble"]["minNewExamples"] == 0 and config["assemble"]["capture"] is None
    assert (
        config["assemble"]["output"] == f"s3://finetune-demo/runs/schedules/{namespace}/hourly/1/train.jsonl"
    )

    def scheduled() -> dict[str, Any] | None:
        found = raw.request("GET", base)[1].get("status") or {}
        return found if found.get("lastScheduleTime") != patch["status"]["lastScheduleTime"] else None

    status = wait_for(scheduled, "the schedule's status", timeout=30)
    newest = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    assert status["lastScheduleTime"] == newest.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert status["missedRuns"] == 1
    assert status["nextScheduleTime"] == (newest + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    table = kubectl("get", "fts", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "SCHEDULE", "SUSPEND", "RUNS", "LAST", "RUN", "SERVING", "AGE"]
    assert table[1].split()[:4] == ["hourly", "@hourly", "false", "0"]
    # suspended, the schedule starts nothing more (the namespace goes with the test)
    kubectl("patch", "fts", "hourly", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
