"""The operator's structure, guarded by `make test` as well as `make lint`: no import circle between its
modules, and the layers written in .importlinter (wiring > kinds > serving contract > policy > containers >
k8s > api > config) hold. A circle or an upward import is what makes a newcomer read half the package to
change one kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "finetune_operator"


def import_circles(package: str) -> list[list[str]]:
    """The package's modules that reach themselves through imports, grouped by circle (strongly connected
    components). grimp reads every import statement: TYPE_CHECKING blocks and function-local imports count,
    since they are dependencies all the same."""
    graph = grimp.build_graph(package, include_external_packages=False)
    circles: list[list[str]] = []
    seen: set[str] = set()
    for module in sorted(graph.modules):
        if module in seen:
            continue
        # modules this one imports (transitively) that also import it (transitively): its circle
        circle = graph.find_upstream_modules(module) & graph.find_downstream_modules(module)
        if circle:
            members = sorted(circle | {module})
            seen.update(members)
            circles.append(members)
    return circles


def test_the_operator_has_no_import_circle() -> None:
    circles = import_circles(PACKAGE)
    assert not circles, "import circles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(
        " <-> ".join(circle) for circle in circles
    )


WIRING = ("context", "handlers", "lifecycle", "__main__")
BELOW_THE_WIRING = (
    "finetunejob",
    "modelserver",
    "serving_contract",
    "finetunepolicy",
    "containers",
    "k8s",
    "api",
)


def test_nothing_below_the_wiring_imports_it() -> None:
    """A kind's controller gets the operator's state handed in (e.g. finetunejob.records.ControllerContext),
    so it can be read, tested and changed without the Kopf wiring."""
    graph = grimp.build_graph(PACKAGE, include_external_packages=False)
    upward = {
        (below, wiring): chains
        for below in BELOW_THE_WIRING
        for wiring in WIRING
        if (chains := graph.find_shortest_chains(f"{PACKAGE}.{below}", f"{PACKAGE}.{wiring}"))
    }
    assert not upward, upward


def test_the_import_layers_hold() -> None:
    """lint-imports checks the contracts in .importlinter (layers, and no torch/Kopf below the wiring).
    Run by this interpreter, so it reads the operator this test imports (not whichever checkout the
    lint-imports script's shebang points at)."""
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = subprocess.run(
        [sys.executable, "-c", command, "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
