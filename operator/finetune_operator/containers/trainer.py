"""The trainer container's fixed facts: its name, where it writes its termination message, and what an
OOM-killed trainer exits with."""

from __future__ import annotations

TRAINER_CONTAINER = "trainer"


TERMINATION_LOG = "/dev/termination-log"


# What a container killed by the kernel's OOM killer (SIGKILL) exits with; kubelet reports reason OOMKilled,
# but a podFailurePolicy can match only exit codes and pod conditions, so the rule matches 137.
OOM_KILLED_EXIT_CODE = 137

