"""The operator's layout stays readable: every module is in docs/architecture.md's map (with a line saying
what it is), no function is over 60 lines, and no module outside the API types is over 450 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "finetune_operator"
ARCHITECTURE = REPO / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 450
# The API types are long by nature (one pydantic model per section of the spec, each field documented).
LONG_MODULES_ALLOWED = ("api/",)


def modules() -> list[str]:
    return sorted(
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"
    )


def module_map() -> str:
    """The operator's part of docs/architecture.md's module map."""
    text = ARCHITECTURE.read_text()
    pattern = r"## Module map\n.*?\noperator/finetune_operator/(.*?)\n(trainer-image/|```)"
    match = re.search(pattern, text, re.S)
    assert match, "docs/architecture.md has no '## Module map' listing operator/finetune_operator/"
    return match.group(1)


def test_every_operator_module_is_in_the_architecture_module_map() -> None:
    text = module_map()
    missing = [m for m in modules() if not re.search(rf"(^|\s){re.escape(m)}\s+\S", text, re.M)]
    assert not missing, f"docs/architecture.md's module map lacks (path, then what it is): {missing}"


def test_the_module_map_names_no_module_that_is_gone() -> None:
    listed = set(re.findall(r"^\s+([a-z_]+(?:/[a-z_]+)*\.py)\s", module_map(), re.M))
    gone = sorted(m for m in listed if not (PACKAGE / m).exists() and not m.startswith("finetune_"))
    assert not gone, f"docs/architecture.md's module map names modules that do not exist: {gone}"


def test_every_package_says_what_it_may_import() -> None:
    text = ARCHITECTURE.read_text()
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    paragraphs = [" ".join(x.split()) for x in text.split("\n\n")]
    says = {p for p in packages for x in paragraphs if x.startswith(f"**`{p}/`**") and "may import" in x}
    missing = sorted(set(packages) - says)
    assert not missing, f"docs/architecture.md lacks a '**`<package>/`** ... may import' paragraph: {missing}"


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("module", modules())
def test_functions_and_modules_stay_short(module: str) -> None:
    source = (PACKAGE / module).read_text()
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for f in _functions(ast.parse(source))
        if f.end_lineno is not None and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines: {long}"
    if not module.startswith(LONG_MODULES_ALLOWED):
        lines = len(source.splitlines())
        assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines (modules stay under {MAX_MODULE_LINES})"
