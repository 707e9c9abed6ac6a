"""The chart README documents every value, and the docs point at real files."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .chart_helpers import CHART, REPO


def leaf_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            paths |= leaf_paths(value, path + ".")
        else:
            paths.add(path)
    return paths


def values_section() -> str:
    return (CHART / "README.md").read_text().split("\n## Values\n", 1)[1]


def test_readme_values_table_covers_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = values_section()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    missing = {
        path
        for path in leaf_paths(values)
        if not any(path == d or path.startswith(d + ".") for d in documented)
    }
    assert missing == set(), "document these values in charts/finetune-operator/README.md"
    stale = {
        d
        for d in documented
        if "." in d or d in values
        if not any(p == d or p.startswith(d + ".") for p in leaf_paths(values))
    }
    assert stale == set(), "the README documents values that do not exist"


def test_readme_defaults_match_values_yaml() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = values_section()
    for key, default in re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", readme, re.M):
        value: Any = values
        for part in key.split("."):
            value = value[part]
        if isinstance(value, (dict, list)):
            continue
        expected = '""' if value == "" else str(value).lower() if isinstance(value, bool) else str(value)
        assert default == expected, f"README says {key} defaults to {default}, values.yaml has {value!r}"


def test_helm_doc_links_resolve() -> None:
    for doc in (REPO / "docs" / "helm.md", CHART / "README.md"):
        prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)#]+)\)", prose):
            if not target.startswith("http"):
                assert (doc.parent / target).resolve().exists(), f"{doc.name} links to missing {target}"
