"""The service's settings (flags of `python -m finetune_api`, each also from env `FINETUNE_API_<FLAG>`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# s3://bucket[/prefix]: the bucket as S3 names it, the prefix without a trailing slash.
FILES_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>[^\s]*?))?/?$")


@dataclass(frozen=True)
class ApiConfig:
    files_uri: str
    host: str = "0.0.0.0"
    port: int = 8000
    max_file_bytes: int = 536870912
    max_body_bytes: int = 1048576
    rate_limit: int = 600  # requests per minute per user; 0 = off
    models_configmap: str = "finetune-api-models"
    models_namespace: str = "default"
    kubeconfig: str | None = None  # None: in-cluster

    def __post_init__(self) -> None:
        if FILES_URI.match(self.files_uri) is None:
            raise ValueError(f"--files-uri must be s3://bucket[/prefix], got {self.files_uri!r}")
        for name in ("port", "max_file_bytes", "max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.rate_limit < 0:
            raise ValueError("--rate-limit must be 0 (off) or positive")

    @property
    def bucket(self) -> str:
        match = FILES_URI.match(self.files_uri)
        assert match is not None
        return match.group("bucket")

    @property
    def prefix(self) -> str:
        """The key prefix under the bucket ("" or "a/b/", with its trailing slash)."""
        match = FILES_URI.match(self.files_uri)
        assert match is not None
        prefix = (match.group("prefix") or "").strip("/")
        return f"{prefix}/" if prefix else ""
