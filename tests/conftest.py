"""Test tiers: unit/ (the product, pure and fast), trainer/, chart/, e2e/ (the whole loop on the embedded
cluster); the embedded cluster's own tiers: emulator/ (its units) and conformance/ (through kubectl and the
Python client, against it or any KUBECONFIG). Only the tiers that need a cluster import its fixtures
(localcluster.pytest_plugin) in their own conftest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# `make test` runs two pytest-xdist workers that take whole files (--dist loadfile, so a module's vLLM server
# or MLflow starts once) in collection order (--no-loadscope-reorder). The tiers whose files run for minutes
# go first, within a tier the files that start vLLM (the longest), so that short files fill the gaps at the
# end rather than one long file running alone while the other worker idles.
PARALLEL_TIER_ORDER = ("e2e", "trainer", "conformance", "api", "chart", "emulator", "unit")


# Math libraries' threads per process in a parallel run. Each worker's torch (the trainer tier trains in
# process) would start one OpenMP thread per core; beside the other worker's processes on a 2-core host those
# threads spin waiting for each other (test_train_full: 51 s instead of 15 s). Pods get the same cap from the
# local kubelet (LOCALCLUSTER_POD_THREADS); an explicit setting in the environment wins.
WORKER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # before any test module imports torch
        for name in WORKER_THREAD_VARIABLES:
            os.environ.setdefault(name, "1")


def parallel_rank(path: Path, starts_vllm: bool) -> tuple[int, int]:
    """Where a test file goes in a parallel run; files outside the known tiers go last."""
    try:
        tier = path.relative_to(TESTS).parts[0]
    except ValueError:
        tier = ""
    known = PARALLEL_TIER_ORDER.index(tier) if tier in PARALLEL_TIER_ORDER else len(PARALLEL_TIER_ORDER)
    return known, 0 if starts_vllm else 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # a serial run keeps pytest's own order
        return
    vllm_files = {Path(item.path) for item in items if item.get_closest_marker("vllm")}
    # sort is stable: the tests of one file stay together and in their order
    items.sort(key=lambda item: parallel_rank(Path(item.path), Path(item.path) in vllm_files))
