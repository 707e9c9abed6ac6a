"""Kopf runs an operator against the cluster unchanged: handlers fire, status patches land, finalizers
hold deletion until the delete handler ran."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .conftest import WIDGET_GROUP, WIDGET_PLURAL, WIDGET_VERSION, Cluster, Raw, wait_for

OPERATOR = textwrap.dedent(f'''
    import kopf

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.posting.level = 0
        settings.watching.server_timeout = 10

    @kopf.on.create("{WIDGET_GROUP}", "{WIDGET_VERSION}", "{WIDGET_PLURAL}")
    def created(spec, patch, **_):
        patch.status["phase"] = "Seen"
        patch.status["replicas"] = spec["size"] * 2

    @kopf.on.delete("{WIDGET_GROUP}", "{WIDGET_VERSION}", "{WIDGET_PLURAL}")
    def deleted(name, namespace, **_):
        import kubernetes
        kubernetes.config.load_kube_config()
        kubernetes.client.CoreV1Api().create_namespaced_config_map(
            namespace, {{"metadata": {{"name": f"deleted-{{name}}"}}}})
''')


@pytest.mark.slow
def test_kopf_operator_handles_create_status_and_finalizers(
    raw: Raw, cluster: Cluster, namespace: str, widget_crd: Any, tmp_path: Path
) -> None:
    script = tmp_path / "operator.py"
    script.write_text(OPERATOR)
    env = {**os.environ, "KUBECONFIG": cluster.kubeconfig}
    log = (tmp_path / "kopf.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", namespace, str(script)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    path = f"/apis/{WIDGET_GROUP}/{WIDGET_VERSION}/namespaces/{namespace}/{WIDGET_PLURAL}"
    try:
        status, body, _ = raw.request(
            "POST",
            path,
            {
                "apiVersion": f"{WIDGET_GROUP}/{WIDGET_VERSION}",
                "kind": "Widget",
                "metadata": {"name": "k"},
                "spec": {"size": 4},
            },
        )
        assert status == 201, body

        def handled() -> Any:
            obj = raw.request("GET", f"{path}/k")[1]
            return obj if obj.get("status", {}).get("phase") else None

        obj = wait_for(handled, "kopf create handler", timeout=40, interval=0.2)
        # Fields the schema declares land; Kopf's own progress lives in annotations.
        assert obj["status"] == {"phase": "Seen", "replicas": 8}
        assert any(a.startswith("kopf.zalando.org/") for a in obj["metadata"]["annotations"])
        assert any(f.startswith("kopf.zalando.org") for f in obj["metadata"]["finalizers"])
        assert raw.request("DELETE", f"{path}/k")[0] in (200, 202)
        wait_for(
            lambda: raw.request("GET", f"{path}/k")[0] == 404, "finalizer released", timeout=40, interval=0.2
        )
        assert raw.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/deleted-k")[0] == 200
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
