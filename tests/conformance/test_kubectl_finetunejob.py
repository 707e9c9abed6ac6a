"""The project's own CRD through kubectl: it installs, `ftj` resolves, server-side dry runs validate the demo
manifest, a broken one reads like kube-apiserver, and the Table has the CRD's printer columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, Kubectl, Raw

CRD = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
MS_CRD = REPO / "crds" / "finetune.dev_modelservers.yaml"
DEMO = REPO / "examples" / "demo.yaml"

pytestmark = pytest.mark.skipif(
    not (CRD.exists() and DEMO.exists()), reason="crds/ or examples/ not generated yet"
)


def test_finetunejob_crd_applies_and_validates(
    kubectl: Kubectl, namespace: str, raw: Raw, tmp_path: Path
) -> None:
    kubectl("apply", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=10s")
    out = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(DEMO), "-o", "yaml").stdout
    created = yaml.safe_load(out)
    assert created["kind"] == "FineTuneJob" and created["metadata"]["namespace"] == namespace
    assert kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout == ""  # dry run stored nothing

    broken: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    broken["spec"]["hyperparameters"]["epochs"] = 0
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(broken))
    result = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(manifest), check=False)
    assert result.returncode != 0
    assert 'The FineTuneJob "tiny-demo" is invalid' in result.stderr
    assert "spec.hyperparameters.epochs" in result.stderr

    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    status, table, _ = raw.request(
        "GET", f"/apis/finetune.dev/v1alpha1/namespaces/{namespace}/finetunejobs", accept=accept
    )
    crd = yaml.safe_load(CRD.read_text())
    columns = [
        c["name"]
        for v in crd["spec"]["versions"]
        if v.get("storage")
        for c in v.get("additionalPrinterColumns", [])
    ]
    assert status == 200 and [c["name"] for c in table["columnDefinitions"]] == ["Name", *columns]


def test_a_gpu_count_on_a_cpu_type_is_refused_by_the_api_naming_both_fields(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    """Issue 20: the demo (trained on CPU, no deployment.gpus) is stored without a GPU count, which the
    operator derives from the GPU type; asking for GPUs on a cpu type is refused by CEL, both fields named."""
    kubectl("apply", "-f", str(CRD), "-f", str(MS_CRD))
    for crd in ("finetunejobs.finetune.dev", "modelservers.finetune.dev"):
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=10s")
    out = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(DEMO), "-o", "yaml").stdout
    assert "gpus" not in yaml.safe_load(out)["spec"]["deployment"]

    def refused(obj: dict[str, Any]) -> str:
        manifest = tmp_path / f"{obj['kind']}.yaml"
        manifest.write_text(yaml.safe_dump(obj))
        result = kubectl("create", "--dry-run=server", "-n", namespace, "-f", str(manifest), check=False)
        assert result.returncode != 0, result.stdout
        return str(result.stderr)

    job: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    job["spec"]["deployment"]["gpus"] = 2
    error = refused(job)
    assert 'The FineTuneJob "tiny-demo" is invalid' in error and "spec.deployment.gpus: " in error
    assert "resources.gpuType" in error
    server = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "cpu-pool"},
        "spec": {
            "baseModel": {"uri": "s3://finetune-demo/models/tiny-llama"},
            "adapterSources": ["s3://finetune-demo/runs"],
            "gpuType": "cpu",
            "gpus": 1,
        },
    }
    error = refused(server)
    assert "spec.gpus: " in error and "gpuType is cpu" in error


def test_storage_output_cannot_change_but_its_credentials_can(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    kubectl("apply", "-f", str(CRD))
    kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", "--timeout=10s")
    job: dict[str, Any] = yaml.safe_load(DEMO.read_text())
    job["spec"]["suspend"] = True  # an operator watching the cluster starts no pod for it
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    kubectl("apply", "-n", namespace, "-f", str(manifest))

    job["spec"]["storage"]["output"] = "s3://finetune-demo/elsewhere"
    manifest.write_text(yaml.safe_dump(job))
    result = kubectl("apply", "-n", namespace, "-f", str(manifest), check=False)
    assert result.returncode != 0
    assert 'The FineTuneJob "tiny-demo" is invalid' in result.stderr
    assert "spec.storage.output: Invalid value" in result.stderr
    assert "storage.output is immutable once set" in result.stderr

    job["spec"]["storage"]["output"] = "s3://finetune-demo/runs"
    job["spec"]["storage"]["credentialsSecret"] = "rotated-s3-credentials"
    manifest.write_text(yaml.safe_dump(job))
    assert "configured" in kubectl("apply", "-n", namespace, "-f", str(manifest)).stdout
    kubectl("delete", "-n", namespace, "-f", str(manifest), "--wait=false")
