"""The exceptions that carry the trainer's exit codes (finetune_vocabulary.exitcodes, ../CONTRACT.md).

Stage code raises one of the ``TrainerError`` subclasses; anything else is classified by
:func:`classify` (CUDA/host OOM, network and storage failures) at the top of the CLI.
"""

from __future__ import annotations

from typing import Any

from finetune_vocabulary.exitcodes import ExitCode

OOM_HINT = (
    "lower hyperparameters.batchSize or hyperparameters.maxSeqLength (raise gradientAccumulationSteps to "
    "keep the effective batch), enable hyperparameters.gradientCheckpointing, or use method qlora / a "
    "larger gpuType"
)

# Validation reads data on CPU: running out of memory there is about the dataset, never a training setting.
VALIDATE_OOM_HINT = (
    "the dataset does not fit in the validation pod's memory (operator setting defaults.validateMemory); "
    "look for a very large file, or lower dataset.maxLineBytes"
)


__all__ = ["ExitCode", "TrainerError", "classify"]


class TrainerError(Exception):
    """An error with a contract exit code. ``summary`` goes into the termination message."""

    code: ExitCode = ExitCode.CRASH

    def __init__(self, message: str, *, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.summary = summary or {}


class InvalidDataError(TrainerError):
    """The dataset is unusable (permanent)."""

    code = ExitCode.INVALID_DATA


class InvalidConfigError(TrainerError):
    """The spec cannot run (permanent). The message names the field, e.g. ``spec.method``."""

    code = ExitCode.INVALID_CONFIG


class OutOfMemory(TrainerError):
    """CUDA or host out of memory (permanent); the message carries a hint."""

    code = ExitCode.OUT_OF_MEMORY


class TransientError(TrainerError):
    """Retriable: network, storage or another passing failure."""

    code = ExitCode.TRANSIENT


class PreemptedError(TrainerError):
    """SIGTERM received; raise it only after a checkpoint was committed (train) or nothing is half-written."""

    code = ExitCode.PREEMPTED


# botocore error codes that mean "try again later".
_RETRIABLE_S3_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "503",
    "500",
    "502",
    "504",
}
# botocore error codes that retrying cannot fix: the spec or its Secret is wrong.
_PERMANENT_S3_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "AllAccessDisabled",
    "InvalidBucketName",
    "403",
}
_STORAGE_HINT = "check spec.storage.credentialsSecret / serviceAccountName and the bucket name"


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # torch.OutOfMemoryError / torch.cuda.OutOfMemoryError, matched by name: this module never imports torch.
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text
    )


def classify(exc: BaseException, stage: str | None = None) -> tuple[ExitCode, str]:
    """Map an exception to (exit code, one-line message) following the contract."""
    if isinstance(exc, TrainerError):
        return exc.code, exc.message
    if _is_oom(exc):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = VALIDATE_OOM_HINT if stage == "validate" else OOM_HINT
        return ExitCode.OUT_OF_MEMORY, f"out of memory ({first[:300]}); hint: {hint}"
    try:
        from botocore import exceptions as boto_exc
    except ImportError:  # pragma: no cover - botocore is in the image
        boto_exc = None
    if boto_exc is not None:
        if isinstance(exc, boto_exc.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _PERMANENT_S3_CODES or status == "403":
                return (
                    ExitCode.INVALID_CONFIG,
                    f"storage refused the request ({code}): {exc}; {_STORAGE_HINT}",
                )
            return ExitCode.TRANSIENT, f"storage error ({code or status}): {exc}"
        if isinstance(exc, boto_exc.NoCredentialsError | boto_exc.PartialCredentialsError):
            return ExitCode.INVALID_CONFIG, f"no storage credentials: {exc}; {_STORAGE_HINT}"
        if isinstance(exc, boto_exc.BotoCoreError):
            return ExitCode.TRANSIENT, f"storage unreachable: {exc}"
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover
        hf_errors = None  # type: ignore[assignment]
    if hf_errors is not None:
        if isinstance(exc, hf_errors.GatedRepoError):
            return (
                ExitCode.INVALID_CONFIG,
                f"gated Hugging Face repository (set HF_TOKEN in the Secret): {exc}",
            )
        if isinstance(exc, hf_errors.RepositoryNotFoundError | hf_errors.RevisionNotFoundError):
            return ExitCode.INVALID_CONFIG, f"spec.baseModel: {exc}"
        if isinstance(exc, hf_errors.LocalEntryNotFoundError):
            return ExitCode.TRANSIENT, f"Hugging Face Hub unreachable and not cached: {exc}"
        if isinstance(exc, hf_errors.HfHubHTTPError):
            return ExitCode.TRANSIENT, f"Hugging Face Hub error: {exc}"
    if isinstance(exc, ConnectionError | TimeoutError):
        return ExitCode.TRANSIENT, f"network error: {exc}"
    # Also catch requests/httpx/urllib3 connection errors without importing them.
    if any(
        cls.__name__ in {"ConnectionError", "ConnectTimeout", "ReadTimeout", "ConnectError"}
        for cls in type(exc).__mro__
    ):
        return ExitCode.TRANSIENT, f"network error: {exc}"
    return ExitCode.CRASH, f"{type(exc).__name__}: {exc}"
