"""operator/Dockerfile, checked statically (no image builds here).

Slim pinned base, operator package only (no torch), non-root numeric user matching the chart, exec-form
entrypoint matching the Deployment, no secrets.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement

from .chart_helpers import CHART, REPO

DOCKERFILE = REPO / "operator" / "Dockerfile"
DOCKERIGNORE = REPO / "operator" / "Dockerfile.dockerignore"
HEAVY = {
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "vllm",
    "datasets",
    "finetune-trainer",
    "nvidia-cudnn-cu12",
    "triton",
}
SECRETISH = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE)", re.I)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip() if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip()
    ]


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    assert DOCKERFILE.exists(), "operator/Dockerfile is missing"
    return instructions(DOCKERFILE.read_text())


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in steps if op == "ARG" and "=" in arg)


def test_base_is_a_pinned_slim_python_matching_the_project(steps) -> None:
    args = build_args(steps)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r"3\.(\d+)", requires).group(0)
    for op, arg in steps:
        if op != "FROM":
            continue
        image = arg.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in {"build"}:
            continue
        match = re.fullmatch(r"python:(3\.\d+)\.(\d+)-slim(-[a-z]+)?(@sha256:[a-f0-9]{64})?", image)
        assert match, f"base {image!r} must be python:<exact patch>-slim[-distro][@sha256:…]"
        assert match.group(1) == minor, (
            f"base Python {match.group(1)} differs from requires-python {requires}"
        )


def test_runs_as_a_numeric_non_root_user_matching_the_chart(steps) -> None:
    users = [arg for op, arg in final_stage(steps) if op == "USER"]
    assert users, "the final stage must set USER"
    last_user = max(i for i, (op, _) in enumerate(steps) if op == "USER")
    assert all(op != "RUN" for op, _ in steps[last_user:]), "nothing may run as root after USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) == values["runAsUser"]


def test_entrypoint_is_the_operator_module_as_the_chart_runs_it(steps) -> None:
    entrypoints = [arg for op, arg in final_stage(steps) if op == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].startswith("["), (
        "ENTRYPOINT must be exec form (signals reach Kopf)"
    )
    assert yaml.safe_load(entrypoints[-1]) == ["python", "-m", "finetune_operator"]
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    command = re.search(r"^\s+command: (\[.*\])$", deployment, re.M).group(1)
    assert yaml.safe_load(command) == ["python", "-m", "finetune_operator"]
    exposed = {int(p) for op, arg in final_stage(steps) if op == "EXPOSE" for p in arg.split()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert exposed == {values["livenessPort"], values["metrics"]["port"], values["api"]["port"]}
    # The OpenAI-compatible API runs from the same image with its own module (templates/api.yaml).
    api = (CHART / "templates" / "api.yaml").read_text()
    command = re.search(r"^\s+command: (\[.*\])$", api, re.M).group(1)
    assert yaml.safe_load(command) == ["python", "-m", "finetune_api"]
    assert (REPO / "operator" / "finetune_api" / "__main__.py").is_file()


def test_copies_and_installs_only_the_operator_and_api_packages(steps) -> None:
    assert not [arg for op, arg in steps if op == "ADD"], "use COPY (ADD fetches URLs and unpacks archives)"
    sources = []
    for op, arg in steps:
        if op == "COPY" and "--from=" not in arg:
            sources += shlex.split(arg)[:-1]
    assert sources and set(sources) <= {
        "pyproject.toml",
        "requirements/dev.txt",
        "vocabulary",
        "operator/finetune_operator",
        "operator/finetune_api",
    }
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert len(installs) == 1
    install = re.search(r"pip install [^&;|]*", installs[0]).group(0).split()
    # The shared vocabulary and the root package (operator only) under the lock as constraints: nothing else.
    assert install == ["pip", "install", "--constraint", "/src/constraints.txt", "/src/vocabulary", "/src"], (
        install
    )


def test_no_secrets_in_the_image_definition(steps) -> None:
    for op, arg in steps:
        if op in {"ENV", "ARG", "LABEL"}:
            names = re.findall(r"(\w+)=", arg) or [arg.split()[0]]
            assert not [n for n in names if SECRETISH.search(n)], f"{op} {arg}"
        if op == "RUN":
            assert "--mount=type=secret" not in arg and not SECRETISH.search(arg), arg


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(distribution: str) -> set[str]:
    seen: set[str] = set()
    pending = [distribution]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(_requirement_name(requirement.name))
    return seen


def test_operator_dependencies_exclude_torch_and_are_all_pinned() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    closure = set().union(*(_closure(_requirement_name(r)) for r in declared))
    assert {"kopf", "pydantic", "pyyaml", "aiohttp", "prometheus-client", "finetune-vocabulary"} <= closure
    assert closure & HEAVY == set()
    # Built from this repository (COPY vocabulary), not from a registry; it depends on nothing.
    assert _closure("finetune-vocabulary") == {"finetune-vocabulary"}
    closure.discard("finetune-vocabulary")
    pins = {
        _requirement_name(line)
        for line in (REPO / "requirements" / "dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert closure - pins == set(), "unpinned operator dependencies: the image would float"


def test_operator_package_imports_nothing_heavy() -> None:
    heavy_modules = {
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "finetune_trainer",
        "vllm",
    }
    for path in sorted((REPO / "operator").rglob("*.py")):  # the operator and the API service
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in heavy_modules, f"{path.relative_to(REPO)} imports {name}"


def test_dockerignore_keeps_the_context_to_what_is_copied() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "exclude everything first, then re-include what the image copies"
    assert {line[1:].removesuffix("/**") for line in lines if line.startswith("!")} == {
        "pyproject.toml",
        "requirements/dev.txt",
        "vocabulary",
        "operator/finetune_operator",
        "operator/finetune_api",
    }
