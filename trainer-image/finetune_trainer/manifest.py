"""Committing directories: a directory counts only once its ``MANIFEST.json`` exists.

Writers upload every file, then write the manifest last and create-only (S3 ``If-None-Match: *``, local
``link()``), so readers never see a half-written directory and two writers cannot both commit the same one.
Readers use :func:`find_committed` / :func:`latest_committed` and ignore anything without a manifest;
:func:`download_committed` checks each file's size and sha256 against the manifest.

Typical use (train)::

    meta = manifest.metadata_from_config(config, base_model_revision=src.revision,
                                         dataset=manifest.read_manifest(config.layout.data).dataset)
    manifest.commit_dir(local_ckpt, config.layout.checkpoint(step), kind="checkpoint", step=step, **meta)
    found = manifest.latest_committed(config.layout.checkpoints)   # (uri, Manifest) | None
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .exitcodes import TransientError

if TYPE_CHECKING:
    from .config import TrainerConfig

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1

# Distributions whose versions every manifest records (importlib.metadata only: torch is never imported).
RECORDED_LIBRARIES = (
    "finetune-trainer",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "bitsandbytes",
    "boto3",
)


class AlreadyCommitted(storage.AlreadyExists):
    """The directory already has a manifest; committed directories are immutable."""


class NotCommitted(storage.NotFound):
    """No manifest: the directory does not count."""


class IntegrityError(TransientError):
    """A downloaded file does not match its manifest entry."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    kind: str  # dataset | checkpoint | adapter | merged | train | evaluation
    files: list[FileEntry]
    step: int | None = None
    created: str = ""
    job: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)  # name -> {uri, etag, versionId}
    base_model: dict[str, Any] = field(default_factory=dict)  # {uri, revision}
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        doc = asdict(self)
        doc["baseModel"] = doc.pop("base_model")
        return json.dumps(doc, indent=2, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            doc = json.loads(text)
        except RecursionError:  # a manifest in a user's model directory is untrusted
            raise ValueError(f"{MANIFEST_NAME} is nested too deeply to be a manifest") from None
        return cls(
            kind=doc.get("kind", ""),
            files=[FileEntry(**f) for f in doc.get("files", [])],
            step=doc.get("step"),
            created=doc.get("created", ""),
            job=doc.get("job", {}),
            dataset=doc.get("dataset", {}),
            base_model=doc.get("baseModel", {}),
            hyperparameters=doc.get("hyperparameters", {}),
            libraries=doc.get("libraries", {}),
            extra=doc.get("extra", {}),
            version=doc.get("version", 1),
        )

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in RECORDED_LIBRARIES:
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def metadata_from_config(
    config: TrainerConfig, *, base_model_revision: str | None = None, dataset: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Keyword arguments for :func:`commit_dir` describing this run."""
    return {
        "job": config.job.model_dump(by_alias=True),
        "base_model": {
            "uri": config.spec.base_model.uri,
            "revision": base_model_revision or config.spec.base_model.revision,
        },
        "hyperparameters": config.hyperparameters_record(),
        "dataset": dataset or {},
    }


def build_manifest(
    local_dir: str | Path,
    *,
    kind: str,
    step: int | None = None,
    job: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    base_model: dict[str, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Describe every file under ``local_dir`` (size + sha256) plus the run's provenance."""
    root = Path(local_dir)
    files = [
        FileEntry(rel, (root / rel).stat().st_size, storage.sha256_file(root / rel))
        for rel in storage.local_files(root, exclude=[MANIFEST_NAME])
    ]
    return Manifest(
        kind=kind,
        files=files,
        step=step,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        job=job or {},
        dataset=dataset or {},
        base_model=base_model or {},
        hyperparameters=hyperparameters or {},
        libraries=library_versions(),
        extra=extra or {},
    )


def manifest_uri(dir_uri: str) -> str:
    return storage.join(dir_uri, MANIFEST_NAME)


def read_manifest(dir_uri: str) -> Manifest | None:
    """The directory's manifest, or None when it is not committed."""
    try:
        return Manifest.from_json(storage.read_bytes(manifest_uri(dir_uri)))
    except storage.NotFound:
        return None


def is_committed(dir_uri: str) -> bool:
    return storage.exists_object(manifest_uri(dir_uri))


def commit_dir(
    local_dir: str | Path, dest_uri: str, *, kind: str, step: int | None = None, **meta: Any
) -> Manifest:
    """Upload ``local_dir`` to ``dest_uri`` and commit it by writing MANIFEST.json last (create-only).

    Raises AlreadyCommitted (before touching anything) when ``dest_uri`` is already committed. Leftovers of
    an earlier, uncommitted attempt at the same place are removed first.
    """
    if is_committed(dest_uri):
        raise AlreadyCommitted(f"{dest_uri} is already committed")
    manifest = build_manifest(local_dir, kind=kind, step=step, **meta)
    if storage.list_files(dest_uri):
        log.info("removing uncommitted leftovers under %s", dest_uri)
        storage.delete_prefix(dest_uri)
    storage.upload_dir(local_dir, dest_uri, exclude=[MANIFEST_NAME])
    try:
        storage.write_bytes(manifest_uri(dest_uri), manifest.to_json().encode(), create_only=True)
    except storage.AlreadyExists:
        raise AlreadyCommitted(f"{dest_uri} was committed by another writer") from None
    log.info(
        "committed %s",
        dest_uri,
        extra={
            "fields": {
                "event": "commit",
                "kind": kind,
                "uri": dest_uri,
                "step": step,
                "files": len(manifest.files),
            }
        },
    )
    return manifest


def find_committed(prefix: str) -> list[str]:
    """URIs of the committed sub-directories of ``prefix``, sorted by name; uncommitted ones are ignored."""
    return [
        storage.join(prefix, name)
        for name in storage.list_dirs(prefix)
        if is_committed(storage.join(prefix, name))
    ]


def latest_committed(prefix: str) -> tuple[str, Manifest] | None:
    """The committed sub-directory with the highest ``step`` (ties and step-less ones: by name)."""
    best: tuple[tuple[int, str], str, Manifest] | None = None
    for uri in find_committed(prefix):
        found = read_manifest(uri)
        if found is None:
            continue
        rank = (found.step if found.step is not None else -1, uri)
        if best is None or rank > best[0]:
            best = (rank, uri, found)
    return (best[1], best[2]) if best else None


def delete_committed(dir_uri: str) -> int:
    """Delete a committed directory: the manifest goes first, so no reader ever sees it half-deleted."""
    storage.delete_file(manifest_uri(dir_uri))
    return storage.delete_prefix(dir_uri)


def verify_local(local_dir: str | Path, manifest: Manifest) -> list[str]:
    """Problems found comparing ``local_dir`` with the manifest (empty when everything matches)."""
    problems = []
    root = Path(local_dir)
    for entry in manifest.files:
        path = root / entry.path
        if (problem := storage.relpath_problem(entry.path)) is not None:
            problems.append(f"{entry.path!r}: {problem}")
        elif not path.is_file():
            problems.append(f"{entry.path}: missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{entry.path}: size {path.stat().st_size} != {entry.size}")
        elif storage.sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 mismatch")
    return problems


def download_committed(dir_uri: str, dest: str | Path, *, verify: bool = True) -> Manifest:
    """Download the files a manifest lists (nothing else) and check their size and sha256."""
    manifest = read_manifest(dir_uri)
    if manifest is None:
        raise NotCommitted(f"{dir_uri} has no {MANIFEST_NAME}")
    dest = Path(dest)
    # Every entry is checked before anything is written: a hostile MANIFEST leaves nothing behind.
    targets = [storage.safe_target(dest, e.path, source=manifest_uri(dir_uri)) for e in manifest.files]
    for entry, target in zip(manifest.files, targets, strict=True):
        if (
            target.is_file()
            and target.stat().st_size == entry.size
            and (not verify or storage.sha256_file(target) == entry.sha256)
        ):
            continue
        storage.download_file(storage.join(dir_uri, entry.path), target)
    if verify:
        problems = verify_local(dest, manifest)
        if problems:
            raise IntegrityError(
                f"{dir_uri}: downloaded files do not match the manifest: {'; '.join(problems[:5])}"
            )
    (dest / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest
