"""The toy base's cache: concurrent callers (make test's workers, a demo beside them) build it once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from finetune_demo import toymodel


def slow_build(log: Path, out: Path) -> None:
    with log.open("a") as f:
        f.write("built\n")
    time.sleep(0.5)  # long enough that the other caller arrives while this one builds
    (out / "weights").write_text("w")


def call_build(target: str, log: str) -> None:
    toymodel._atomic_build(Path(target), lambda out: slow_build(Path(log), out))


def test_concurrent_callers_build_the_cache_once(tmp_path: Path) -> None:
    target, log = tmp_path / "cache" / "llama-x", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    callers = [ctx.Process(target=call_build, args=(str(target), str(log))) for _ in range(3)]
    for p in callers:
        p.start()
    for p in callers:
        p.join(timeout=30)
    assert [p.exitcode for p in callers] == [0, 0, 0]
    assert log.read_text() == "built\n"
    assert (target / "READY").exists() and (target / "weights").read_text() == "w"
    assert sorted(x.name for x in target.parent.iterdir() if not x.name.startswith(".")) == ["llama-x"]
