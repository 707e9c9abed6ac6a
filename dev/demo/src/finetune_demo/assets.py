"""The toy base model and dataset uploaded to an S3 endpoint, as the e2e tests and bench-chaos use them."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from .preference import objective_datasets
from .toymodel import write_base_model, write_toy_dataset

BUCKETS = ("models", "data", "runs")


def upload_toy_assets(s3: Any) -> dict[str, str]:
    """Create the buckets and upload the toy base (s3://models/toy), dataset (s3://data/toy/…) and its
    forms for the other objectives (finetune_demo.preference): s3://data/<key>/train.jsonl under `<key>` and
    …/test.jsonl under `<key>-test`, for key preference, unpaired, prompts and (train only) bad-preference."""
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
    uris = {
        "model": "s3://models/toy",
        "train": "s3://data/toy/train.jsonl",
        "test": "s3://data/toy/test.jsonl",
    }
    for key, files in objective_datasets().items():
        for name, body in files.items():
            s3.put_object(Bucket="data", Key=f"{key}/{name}", Body=body)
            uris[key if name == "train.jsonl" else f"{key}-test"] = f"s3://data/{key}/{name}"
    return uris
