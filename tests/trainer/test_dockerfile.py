"""The Dockerfile cannot be built here: check it installs exactly the pinned set, non-root, no secrets."""

from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "trainer-image"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
SECRETISH = re.compile(r"(?i)(secret|token|password|passwd|api_?key|access_?key|credential)")
# Needed at run time but installed outside requirements.txt on purpose (CUDA builds).
SEPARATELY_PINNED = {"torch", "bitsandbytes"}


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (IMAGE / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in _instructions() if op == "ARG" and "=" in rest)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: not an exact pin: {raw!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _pip_installs() -> list[list[str]]:
    """Argument lists of every `pip install` in RUN lines, with ARGs substituted."""
    args = _args()
    installs = []
    for op, rest in _instructions():
        if op != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), command))
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def test_requirements_are_exact_pins_matching_the_dev_lock_and_venv() -> None:
    trainer = _pins(IMAGE / "requirements.txt")
    dev = _pins(ROOT / "requirements" / "dev.txt")
    assert not SEPARATELY_PINNED & set(trainer), "torch/bitsandbytes are pinned in the Dockerfile"
    for name, version in trainer.items():
        assert dev.get(name) == version, f"{name}: trainer {version} vs requirements/dev.txt {dev.get(name)}"
        assert metadata.version(name) == version, f"{name}: .venv has {metadata.version(name)}"
    for needed in (
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "safetensors",
        "tokenizers",
        "huggingface-hub",
        "boto3",
        "pydantic",
        "matplotlib",
    ):
        assert needed in trainer


def test_requirements_are_a_closed_set() -> None:
    """Every runtime dependency of every pin is pinned too (or is torch), so the image resolves nothing."""
    trainer = _pins(IMAGE / "requirements.txt")
    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
        "extra": "",
    }
    missing = set()
    for name in trainer:
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep in SEPARATELY_PINNED:
                continue
            if dep not in trainer:
                missing.add(f"{dep} (needed by {name})")
            elif not req.specifier.contains(trainer[dep], prereleases=True):
                missing.add(f"{dep}=={trainer[dep]} does not satisfy {name}'s {req.specifier}")
    assert not missing, sorted(missing)


def test_dockerfile_installs_exactly_the_pinned_set() -> None:
    dev = _pins(ROOT / "requirements" / "dev.txt")
    copied = [rest.split() for op, rest in _instructions() if op == "COPY"]
    assert ["requirements.txt", "/tmp/requirements.txt"] in copied
    seen_requirements = seen_torch = seen_package = False
    for args in _pip_installs():
        options = [a for a in args if a.startswith("-")]
        targets = [a for a in args if not a.startswith("-") and not a.startswith("http")]
        if "-r" in args:
            assert args == ["-r", "/tmp/requirements.txt"]
            seen_requirements = True
        elif "--no-deps" in args:
            # The shared vocabulary (no dependencies) and the package itself, nothing either could pull.
            assert targets == ["/src/vocabulary", "/src"]
            seen_package = True
        else:
            assert targets and all(PIN.match(t) for t in targets), f"unpinned install: {args}"
            for target in targets:
                name, version = target.split("==")
                assert name in SEPARATELY_PINNED, f"{name} must come from requirements.txt"
                if name == "torch":
                    assert version == dev["torch"] == "2.13.0"
                    index = args[args.index("--index-url") + 1]
                    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", index)
                    seen_torch = True
            assert set(options) <= {"--index-url"}
    assert seen_requirements and seen_torch and seen_package


def test_base_image_is_a_pinned_cuda_runtime() -> None:
    bases = [rest for op, rest in _instructions() if op == "FROM"]
    assert len(bases) == 1
    assert re.fullmatch(
        r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d\d\.\d\d(@sha256:[0-9a-f]{64})?", bases[0]
    )


def test_runs_as_non_root_with_caches_on_emptydir_mounts() -> None:
    instructions = _instructions()
    users = [(i, rest) for i, (op, rest) in enumerate(instructions) if op == "USER"]
    assert users and users[-1][1].split(":")[0] == "1000"
    assert all(op != "RUN" for op, _ in instructions[users[-1][0] :]), "nothing may run as root after USER"
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    assert "HF_HOME=/cache/huggingface" in env and "FTJ_WORKDIR=/workspace" in env
    assert "XDG_CACHE_HOME=/cache" in env
    entry = [rest for op, rest in instructions if op == "ENTRYPOINT"]
    assert entry == ['["python", "-m", "finetune_trainer"]']


@pytest.mark.parametrize("op", ["ENV", "ARG", "LABEL"])
def test_no_secrets_baked_in(op: str) -> None:
    for kind, rest in _instructions():
        if kind != op:
            continue
        names = re.findall(r"(\w+)=", rest) or [rest.split()[0]]
        for name in names:
            assert not SECRETISH.search(name), f"{op} {name} looks like a credential"
    copied = " ".join(rest for kind, rest in _instructions() if kind in ("COPY", "ADD"))
    assert not re.search(r"\.aws|\.netrc|\.env\b|id_rsa|\.git-credentials|\.huggingface", copied)
    ignored = (IMAGE / ".dockerignore").read_text().split()
    assert ".env" in ignored
