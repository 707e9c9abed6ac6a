"""The toy base model and dataset uploaded to an S3 endpoint, as the e2e tests and bench-chaos use them."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from .toymodel import write_base_model, write_toy_dataset

BUCKETS = ("models", "data", "runs")


def upload_toy_assets(s3: Any) -> dict[str, str]:
    """Create the buckets and upload the toy base (s3://models/toy) and dataset (s3://data/toy/…)."""
    for bucket in BUCKETS:
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_base_model(Path(tmp) / "model")
        for path in model.iterdir():
            s3.upload_file(str(path), "models", f"toy/{path.name}")
        data = write_toy_dataset(Path(tmp) / "data")
        for name in ("train.jsonl", "test.jsonl"):
            s3.upload_file(str(data / name), "data", f"toy/{name}")
    return {
        "model": "s3://models/toy",
        "train": "s3://data/toy/train.jsonl",
        "test": "s3://data/toy/test.jsonl",
    }
