"""`python -m localcluster` (make local-cluster): ready with a kubeconfig in ≤ 10 s, S3 published, and every
child process stopped on SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import psutil
import pytest
from localcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.local_kubelet
KUBECTL = "/usr/bin/kubectl"


def test_foreground_cluster_starts_fast_serves_s3_and_stops_children(tmp_path: Path):
    workdir = tmp_path / "local"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["LOCAL_OPERATOR"] = "0"
    env["LOCAL_MLFLOW"] = "0"  # the MLflow server (make local-cluster starts it) has tests of its own
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "localcluster", "--workdir", str(workdir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        kubeconfig = workdir / "kubeconfig"
        wait_for(kubeconfig.exists, timeout=10, interval=0.05, what="kubeconfig")
        assert time.monotonic() - began <= 10
        kenv = {**env, "KUBECONFIG": str(kubeconfig)}
        nodes = json.loads(
            subprocess.run(
                [KUBECTL, "get", "nodes", "-o", "json"], env=kenv, check=True, capture_output=True, text=True
            ).stdout
        )["items"]
        gpu = [n for n in nodes if n["status"]["capacity"].get("nvidia.com/gpu") == "8"]
        assert len(nodes) == 3 and len(gpu) == 2
        assert all(n["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB" for n in gpu)
        assert all(n["spec"]["taints"] == [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}] for n in gpu)

        # S3: the same credentials in .local/s3.env and in Secret default/s3-credentials, and they work.
        s3_env = dict(line.split("=", 1) for line in (workdir / "s3.env").read_text().splitlines())
        assert set(s3_env) == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
        }
        secret = json.loads(
            subprocess.run(
                [KUBECTL, "get", "secret", "s3-credentials", "-n", "default", "-o", "json"],
                env=kenv,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == s3_env
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_env["AWS_ENDPOINT_URL"],
            region_name=s3_env["AWS_DEFAULT_REGION"],
            aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="a.txt", Body=b"hi")
        assert s3.get_object(Bucket="models", Key="a.txt")["Body"].read() == b"hi"

        # A pod process that ignores SIGTERM must still be gone once the cluster has stopped.
        pidfile = tmp_path / "pid"
        script = (
            "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
        )
        subprocess.run(
            [
                KUBECTL,
                "run",
                "sleeper",
                "--image=busybox",
                "--restart=Never",
                "--command",
                "--",
                sys.executable,
                "-c",
                script,
                str(pidfile),
            ],
            env=kenv,
            check=True,
            capture_output=True,
        )
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=15, what="pod process")
        pod_pid = int(pidfile.read_text())
        children = psutil.Process(proc.pid).children(recursive=True)
        assert pod_pid in {c.pid for c in children}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "local cluster ready" in out
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    assert not (workdir / "kubeconfig").exists()
