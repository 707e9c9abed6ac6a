"""The chaos benchmark's small variant (`bench_chaos.py --quick`): 3 jobs on their own embedded cluster while
the operator is SIGKILLed 4 times, the API fails and slows the operator's requests and drops watches, S3
answers 500/503 through a proxy, and a training pod is evicted. Every job completes; nothing is duplicated,
lost, left without its Event or stuck."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"^chaos: jobs=(?P<jobs>\d+) completed=(?P<completed>\d+) duplicates=(?P<duplicates>\d+) "
    r"lost_artifacts=(?P<lost>\d+) events_missing=(?P<events>\d+) stuck=(?P<stuck>\d+) "
    r"operator_restarts=(?P<restarts>\d+)$",
    re.M,
)


def test_quick_chaos_run_meets_the_target() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_chaos.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )
    output = result.stdout + result.stderr
    match = LINE.search(result.stdout)
    assert result.returncode == 0 and match, output[-5000:]
    figures = {k: int(v) for k, v in match.groupdict().items()}
    assert figures["completed"] == figures["jobs"] == 3, output[-5000:]
    assert (figures["duplicates"], figures["lost"], figures["events"], figures["stuck"]) == (0, 0, 0, 0), (
        output[-5000:]
    )
    assert figures["restarts"] >= 4  # every SIGKILL was followed by a restart
    assert "evicted none" not in result.stdout
