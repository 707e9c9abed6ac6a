"""The toy base's cache: concurrent callers (make test's workers, a demo beside them) build it once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# A caller whose build takes long enough that the others arrive while it runs. Separate interpreters (not
# fork): the calling test process may hold threads of an embedded cluster.
CALLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from finetune_demo import toymodel

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def slow_build(out):
        with log.open("a") as f:
            f.write("built\\n")
        time.sleep(1.0)
        (out / "weights").write_text("w")

    toymodel._atomic_build(target, slow_build)
    """
)


def test_concurrent_callers_build_the_cache_once(tmp_path: Path) -> None:
    target, log = tmp_path / "cache" / "llama-x", tmp_path / "log"
    callers = [
        subprocess.Popen([sys.executable, "-c", CALLER, str(target), str(log)], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=60)[1].decode() for p in callers]
    assert [p.returncode for p in callers] == [0, 0, 0], errors
    assert log.read_text() == "built\n"
    assert (target / "READY").exists() and (target / "weights").read_text() == "w"
    assert sorted(x.name for x in target.parent.iterdir() if not x.name.startswith(".")) == ["llama-x"]
