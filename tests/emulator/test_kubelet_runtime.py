"""The local kubelet's image → runtime table, path rewriting and $(VAR) expansion (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest
from localcluster.runtime import (
    ImageNotPresent,
    PathRewriter,
    StartError,
    expand,
    image_repository,
    missing_runtimes,
    resolve_launch,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("ghcr.io/finetune-operator/trainer:0.1.0", "ghcr.io/finetune-operator/trainer"),
        ("vllm/vllm-openai:v0.32.0", "vllm/vllm-openai"),
        ("docker.io/vllm/vllm-openai@sha256:abc", "vllm/vllm-openai"),
        ("docker.io/library/busybox:1.36", "busybox"),
        ("localhost:5000/team/app", "localhost:5000/team/app"),
    ],
)
def test_image_repository_ignores_tag_digest_and_docker_hub_prefix(image, repository):
    assert image_repository(image) == repository


def test_trainer_image_runs_python_from_the_dev_virtualenv():
    launch = resolve_launch(
        "ghcr.io/finetune-operator/trainer:0.1.0",
        ["python", "-m", "finetune_trainer"],
        ["validate"],
        pod_ip="127.1.0.9",
        kubeconfig=None,
        root=ROOT,
    )
    assert launch.argv == [str(ROOT / ".venv/bin/python"), "-m", "finetune_trainer", "validate"]
    assert launch.env["PATH"].startswith(str(ROOT / ".venv/bin") + ":")
    assert "KUBECONFIG" not in launch.env


def test_operator_image_gets_the_local_kubeconfig(tmp_path):
    launch = resolve_launch(
        "ghcr.io/finetune-operator/operator:0.1.0",
        ["python", "-m", "finetune_operator"],
        [],
        pod_ip="127.1.0.9",
        kubeconfig=tmp_path / "kubeconfig",
        root=ROOT,
    )
    assert launch.env["KUBECONFIG"] == str(tmp_path / "kubeconfig")
    assert launch.argv[0] == str(ROOT / ".venv/bin/python")


def test_vllm_image_uses_the_openai_entrypoint_and_binds_the_pod_ip(tmp_path):
    venv = tmp_path / ".venv-vllm" / "bin"
    venv.mkdir(parents=True)
    (venv / "python3").write_text("")
    (venv / "python3").chmod(0o755)
    (venv / "python").write_text("")
    launch = resolve_launch(
        "vllm/vllm-openai:v0.32.0",
        [],
        ["--model", "/models/m", "--port", "8000"],
        pod_ip="127.1.0.7",
        kubeconfig=None,
        root=tmp_path,
    )
    assert launch.argv == [
        str(venv / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/m",
        "--port",
        "8000",
        "--host",
        "127.1.0.7",
    ]
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"  # not every pod's worker on CPU 0
    assert launch.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # no worker process of its own


def test_missing_virtualenv_is_an_image_not_present_naming_the_command_that_installs_it(tmp_path):
    with pytest.raises(ImageNotPresent) as raised:
        resolve_launch("vllm/vllm-openai:v1", [], [], pod_ip="127.1.0.7", kubeconfig=None, root=tmp_path)
    assert str(raised.value) == (
        'image "vllm/vllm-openai:v1" is not present on this machine: the local kubelet runs it in '
        f"{tmp_path / '.venv-vllm'}, which does not exist (run `make vllm-venv`)"
    )
    with pytest.raises(ImageNotPresent, match="make mlflow-venv"):
        resolve_launch("ghcr.io/mlflow/mlflow:v3", [], [], pod_ip="127.1.0.7", kubeconfig=None, root=tmp_path)
    # The kubelet's override (Kubelet.runtimes) wins over the project root's directory.
    with pytest.raises(ImageNotPresent, match=str(tmp_path / "elsewhere")):
        resolve_launch(
            "ghcr.io/finetune-operator/trainer:0.1.0",
            [],
            [],
            pod_ip="127.1.0.7",
            kubeconfig=None,
            root=ROOT,
            venvs={"ghcr.io/finetune-operator/trainer": tmp_path / "elsewhere"},
        )
    assert missing_runtimes(tmp_path) == [
        f"ghcr.io/finetune-operator/trainer: {tmp_path / '.venv'} does not exist (run `make venv`)",
        f"ghcr.io/finetune-operator/operator: {tmp_path / '.venv'} does not exist (run `make venv`)",
        f"vllm/vllm-openai: {tmp_path / '.venv-vllm'} does not exist (run `make vllm-venv`)",
        f"ghcr.io/mlflow/mlflow: {tmp_path / '.venv-mlflow'} does not exist (run `make mlflow-venv`)",
    ]


def test_unknown_program_and_missing_entrypoint_are_start_errors(tmp_path):
    with pytest.raises(StartError, match='exec: "no-such-binary": executable file not found in \\$PATH'):
        resolve_launch("busybox", ["no-such-binary"], [], pod_ip="127.1.0.7", kubeconfig=None, root=tmp_path)
    with pytest.raises(StartError, match="set the container's command"):
        resolve_launch("busybox", [], [], pod_ip="127.1.0.7", kubeconfig=None, root=tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$(A)/x", "1/x"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("a$(A)b$(B)", "a1b2"),
        ("$", "$"),
    ],
)
def test_var_expansion_like_the_kubelet(value, expected):
    assert expand(value, {"A": "1", "B": "2"}) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/workspace", "/pod/ws"),
        ("/workspace/out/a.bin", "/pod/ws/out/a.bin"),
        ("/workspaces", "/workspaces"),
        ("--output-dir=/workspace/out", "--output-dir=/pod/ws/out"),
        ("/dev/termination-log", "/pod/term"),
        ("/dev/shm/x", "/pod/shm/x"),
        ("relative/workspace", "relative/workspace"),
    ],
)
def test_paths_under_a_mount_are_rewritten_to_the_pod_directory(value, expected):
    rewrite = PathRewriter(
        {"/workspace": "/pod/ws", "/dev/termination-log": "/pod/term", "/dev/shm": "/pod/shm"}
    )
    assert rewrite(value) == expected
