"""Fixtures of the Helm chart tests (helpers live in chart_helpers.py)."""

from __future__ import annotations

import pytest
from localcluster.pytest_plugin import (
    lc_api,
    lc_kubectl,
    lc_kubectl_one,
    lc_namespace,
    local_cluster,
    pytest_collection_modifyitems,
)

from .chart_helpers import helm_binary


@pytest.fixture(scope="session")
def helm() -> str:
    binary = helm_binary()
    if binary is None:
        pytest.skip("helm not found at .tools/bin/helm (run `make tools`), $HELM or on PATH")
    return binary
