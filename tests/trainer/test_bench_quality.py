"""bench-quality's quick variant: on the demo's task, the train stage (the code the training Job runs) makes
the same optimizer steps as a plain PEFT loop with the same recipe and reaches its held-out quality."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_quick_quality_vs_reference(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_quality
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    root_level = logging.getLogger().level
    try:
        bench_quality.main(["--quick"])
    finally:  # the CLI quiets the root logger; the worker process runs other tests after this one
        logging.getLogger().setLevel(root_level)
    out = capsys.readouterr().out
    summary = [x for x in out.splitlines() if x.startswith("quality-vs-reference ")]
    assert len(summary) == 1, out
    fields = summary[0].split()
    em_delta = float(fields[fields.index("em_delta:") + 1])
    assert em_delta >= -0.05, out
    steps = [x for x in out.splitlines() if "optimizer steps" in x]
    assert len(steps) == 2 and all("optimizer steps 114," in x for x in steps), out
