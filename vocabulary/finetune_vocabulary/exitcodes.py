"""The trainer's exit codes (CONTRACT.md): the trainer exits with them, the operator reads them."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INVALID_DATA = 10
    INVALID_CONFIG = 11
    OUT_OF_MEMORY = 12
    TRANSIENT = 20
    PREEMPTED = 21
    # Not one of the contract's named codes: an unexpected crash. The operator treats it as transient.
    CRASH = 1


# No retry can fix these: the Job's podFailurePolicy fails at once, the operator names the reason.
PERMANENT_EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode.INVALID_DATA,
    ExitCode.INVALID_CONFIG,
    ExitCode.OUT_OF_MEMORY,
)
