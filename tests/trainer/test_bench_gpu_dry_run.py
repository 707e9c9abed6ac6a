"""`make bench-gpu` cannot run here (no GPU): its dry run takes the same code path at toy scale on the CPU
(model of the shape's architecture built and saved, both arms trained as subprocesses, MFU and the
equal-steps ratio printed), so the command is ready for a device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bench_gpu_dry_run(method: str) -> None:
    bench = str(REPO / "benchmarks" / "bench_trainer.py")
    proc = subprocess.run(
        [sys.executable, bench, "--device", "cuda", "--dry-run", "--method", method],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    arms = [x for x in lines if "real tokens/s (median" in x]
    assert len(arms) == 2 and all("MFU" in x for x in arms), proc.stdout
    ratio = [x for x in lines if x.startswith("trainer-vs-hf tokens/s ratio:")]
    assert ratio and "at equal optimizer steps (2 steps of 4 examples, both arms)" in ratio[0], proc.stdout
    assert f"({method}," in proc.stdout
