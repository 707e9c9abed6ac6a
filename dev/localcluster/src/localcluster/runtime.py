"""The local kubelet's image → runtime table, path rewriting and $(VAR) expansion.

| image repository (tag ignored)     | runtime                                                    |
|------------------------------------|------------------------------------------------------------|
| ghcr.io/finetune-operator/trainer  | <root>/.venv, `python` is its interpreter; entrypoint      |
|                                    | `python -m finetune_trainer` when only args are given      |
| ghcr.io/finetune-operator/operator | <root>/.venv, plus KUBECONFIG of the local cluster;        |
|                                    | entrypoint `python -m finetune_operator`; the chart's API  |
|                                    | pod's command `python -m finetune_api` runs there too      |
| vllm/vllm-openai                   | <root>/.venv-vllm; entrypoint `python3 -m                  |
|                                    | vllm.entrypoints.openai.api_server` + args + --host podIP; |
|                                    | VLLM_CPU_OMP_THREADS_BIND=nobind (no pinning to CPU 0),    |
|                                    | VLLM_ENABLE_V1_MULTIPROCESSING=0 (no extra worker process) |
| ghcr.io/mlflow/mlflow              | <root>/.venv-mlflow; entrypoint `mlflow server` + args +   |
|                                    | --host podIP (the embedded MLflow server, mlflow.py)       |
| anything else                      | the container's command on the host                        |

An image whose virtualenv is missing is an image not present on this machine: `ImageNotPresent` names the
`make` target that installs it, and the kubelet reports it as ErrImagePull / ImagePullBackOff and retries.
`Kubelet.runtimes` (image repository → virtualenv) overrides a directory, e.g. for a test.

Every process gets CUDA_VISIBLE_DEVICES="" (GPU requests are scheduled, the work runs on the CPU) and the
podshim directory on PYTHONPATH (cluster DNS and pod IP binding, see podshim/sitecustomize.py).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from finetune_vocabulary.images import ENTRYPOINTS, OPERATOR_IMAGE, TRAINER_IMAGE, VLLM_IMAGE

# Which image runs which entrypoint is the product's fact (finetune_vocabulary.images); the venvs are ours.
MLFLOW_IMAGE = "ghcr.io/mlflow/mlflow"  # dev tooling only (mlflow.py), not a product image
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Runtime:
    venv: str  # the virtualenv's directory under the project root
    install: str  # the command that creates it


# image repository → where its processes run locally, and how to install that
RUNTIMES: Mapping[str, Runtime] = {
    TRAINER_IMAGE: Runtime(".venv", "make venv"),
    OPERATOR_IMAGE: Runtime(".venv", "make venv"),
    VLLM_IMAGE: Runtime(".venv-vllm", "make vllm-venv"),
    MLFLOW_IMAGE: Runtime(".venv-mlflow", "make mlflow-venv"),
}


def project_root() -> Path:
    override = os.environ.get("LOCALCLUSTER_PROJECT_ROOT")
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parents[4]


def image_repository(image: str) -> str:
    """`docker.io/vllm/vllm-openai:v0.32.0@sha256:…` → `vllm/vllm-openai`."""
    ref = image.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        ref = ref[:colon]
    for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix) :]
    if ref.startswith("library/"):
        ref = ref[len("library/") :]
    return ref


class StartError(Exception):
    """The container cannot start (reported like containerd's StartError, exit code 128)."""


class ImageNotPresent(StartError):
    """The image's runtime is not installed: the kubelet reports ErrImagePull and retries with back-off."""


def runtime_venv(repository: str, root: Path, overrides: Mapping[str, Path] | None = None) -> Path | None:
    """The virtualenv an image runs in (None: the command runs on the host)."""
    if overrides and repository in overrides:
        return overrides[repository]
    runtime = RUNTIMES.get(repository)
    return root / runtime.venv if runtime else None


def missing_runtimes(root: Path, overrides: Mapping[str, Path] | None = None) -> list[str]:
    """One line per image whose virtualenv does not exist, naming the command that installs it."""
    lines = []
    for repository, runtime in RUNTIMES.items():
        venv = runtime_venv(repository, root, overrides)
        if venv is not None and not (venv / "bin" / "python").exists():
            lines.append(f"{repository}: {venv} does not exist (run `{runtime.install}`)")
    return lines


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def resolve_launch(
    image: str,
    command: list[str],
    args: list[str],
    *,
    pod_ip: str,
    kubeconfig: Path | None,
    root: Path | None = None,
    venvs: Mapping[str, Path] | None = None,
) -> Launch:
    """Turn image + command + args into a local argv and the runtime's environment (PATH first)."""
    root = root or project_root()
    repo = image_repository(image)
    env: dict[str, str] = {}
    venv = runtime_venv(repo, root, venvs)
    if repo == TRAINER_IMAGE:
        env["PYTHONUNBUFFERED"] = "1"
        if not command:
            command = list(ENTRYPOINTS[TRAINER_IMAGE])
    elif repo == OPERATOR_IMAGE:
        env["PYTHONUNBUFFERED"] = "1"
        if not command:
            command = list(ENTRYPOINTS[OPERATOR_IMAGE])
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
    elif repo == VLLM_IMAGE:
        env["PYTHONUNBUFFERED"] = "1"
        env["VLLM_TARGET_DEVICE"] = "cpu"
        # vLLM binds ZeroMQ ipc sockets under $TMPDIR, which the kubelet points at the pod's /tmp volume; that
        # per-pod path exceeds the 107-byte socket path limit, so use the short host temp dir as in an image.
        env["VLLM_RPC_BASE_PATH"] = tempfile.gettempdir()
        # vLLM-CPU pins its worker to the host's first core by default ("auto"): every pod of this host on
        # CPU 0 while the others idle. The kubelet caps a pod's threads instead (thread_env, kubelet/pods).
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        # On CPU, vLLM turns the one-process executor into a worker process of its own unless the engine
        # runs without multiprocessing: one interpreter fewer to start (~8 s of CPU importing torch and
        # vLLM) per replica on a host whose cores the tests share. Server, LoRA loading, routing: the same.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not command:
            command = list(ENTRYPOINTS[VLLM_IMAGE])
        args = [*args, "--host", pod_ip]
    elif repo == MLFLOW_IMAGE:
        env["PYTHONUNBUFFERED"] = "1"
        if not command:
            command = ["mlflow", "server"]
        args = [*args, "--host", pod_ip]
    if venv is not None:
        if not (venv / "bin" / "python").exists():
            install = RUNTIMES[repo].install if repo in RUNTIMES else "create it"
            raise ImageNotPresent(
                f'image "{image}" is not present on this machine: the local kubelet runs it in {venv}, '
                f"which does not exist (run `{install}`)"
            )
        env["PATH"] = f"{venv / 'bin'}:{HOST_PATH}"
        env["VIRTUAL_ENV"] = str(venv)
    else:
        env["PATH"] = HOST_PATH
    argv = [*command, *args]
    if not argv:
        raise StartError(
            f'image "{image}" has no entrypoint known to the local kubelet: set the container\'s command'
        )
    if venv is not None and argv[0] in ("python", "python3"):
        argv[0] = str(venv / "bin" / "python")
    argv[0] = which(argv[0], env["PATH"])
    return Launch(argv=argv, env=env)


def which(program: str, path: str) -> str:
    if "/" in program:
        if not os.path.exists(program):
            raise StartError(f'exec: "{program}": stat {program}: no such file or directory')
        return program
    found = shutil.which(program, path=path)
    if found is None:
        raise StartError(f'exec: "{program}": executable file not found in $PATH')
    return found


_VAR = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: `$$` escapes, unknown references stay as written."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR.sub(sub, value)


class PathRewriter:
    """Maps in-container paths (volume mounts, termination message path) to the pod's local directories."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = sorted(
            ((k.rstrip("/") or "/", v) for k, v in mapping.items()), key=lambda kv: -len(kv[0])
        )

    def path(self, value: str) -> str | None:
        for mount, local in self.mapping:
            if value == mount or value.startswith(mount + "/"):
                return local + value[len(mount) :]
        return None

    def __call__(self, value: str) -> str:
        direct = self.path(value)
        if direct is not None:
            return direct
        if "=" in value:  # --output-dir=/workspace/out
            key, _, rest = value.partition("=")
            mapped = self.path(rest)
            if mapped is not None:
                return f"{key}={mapped}"
        return value
