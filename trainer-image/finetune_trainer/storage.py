"""One small API over the places a run reads from and writes to.

URIs:
  ``s3://bucket/key``                 boto3; honours ``AWS_ENDPOINT_URL`` (MinIO, other S3-compatible
                                      stores), retries in ``adaptive`` mode (``AWS_RETRY_MODE`` and
                                      ``AWS_MAX_ATTEMPTS`` override), multipart transfers above
                                      ``FTJ_S3_MULTIPART_THRESHOLD`` bytes.
  ``hf://org/name[@rev][/file]``      Hugging Face Hub (read-only). ``hf://datasets/org/name/...`` for
                                      dataset repos. Token from ``HF_TOKEN``; ``HF_HUB_OFFLINE=1`` uses the
                                      cache under ``HF_HUB_CACHE`` / ``HF_HOME`` only.
  ``pvc://claim/path``                a PersistentVolumeClaim mounted at ``$FTJ_PVC_ROOT/<claim>``
                                      (default ``/mnt/pvc/<claim>``).
  ``/abs/path``, ``rel/path``, ``file:///abs/path``   local files.

Missing objects raise :class:`NotFound` (a ``FileNotFoundError``); a create-only write to an existing key
raises :class:`AlreadyExists` (a ``FileExistsError``). Network/storage failures propagate as botocore
errors, which :func:`finetune_trainer.exitcodes.classify` maps to TRANSIENT.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .exitcodes import InvalidDataError

log = logging.getLogger(__name__)

DEFAULT_PVC_ROOT = "/mnt/pvc"
DEFAULT_MULTIPART_BYTES = 64 * 1024 * 1024
_HASH_CHUNK = 4 * 1024 * 1024


class NotFound(FileNotFoundError):
    """The object, file or directory does not exist."""


class AlreadyExists(FileExistsError):
    """A create-only write found the key already there."""


class UnsupportedOperation(ValueError):
    """E.g. writing to hf://."""


class UnsafePath(InvalidDataError, ValueError):
    """An object key or manifest path that would be written outside the download destination (permanent)."""


# Linux NAME_MAX, and the longest S3 key: anything longer cannot be a file we wrote.
MAX_SEGMENT_BYTES = 255
MAX_RELPATH_BYTES = 1024
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def relpath_problem(relpath: str) -> str | None:
    """Why ``relpath`` (an object key below a prefix, or a manifest entry) is not a plain relative path."""
    if not relpath:
        return "empty path"
    if _CONTROL_CHARS.search(relpath):
        return "NUL or control character"
    if "\\" in relpath:
        return "backslash"
    if relpath.startswith("/"):
        return "absolute path"
    if len(relpath.encode()) > MAX_RELPATH_BYTES:
        return f"longer than {MAX_RELPATH_BYTES} bytes"
    for segment in relpath.split("/"):
        if not segment:
            return "empty path segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"'{segment}' segment"
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            return f"a path segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def safe_target(dest: str | os.PathLike[str], relpath: str, *, source: str) -> Path:
    """``dest / relpath``, or UnsafePath when that would not stay under ``dest`` (hostile keys, symlinks)."""
    problem = relpath_problem(relpath)
    if problem is None:
        root = Path(dest).resolve()
        resolved = (root / relpath).resolve()
        if resolved == root or root not in resolved.parents:
            problem = "resolves outside the destination (through a symbolic link)"
    if problem is not None:
        raise UnsafePath(f"{source}: refusing to write {relpath!r} under {os.fspath(dest)}: {problem}")
    return Path(dest) / relpath


# --- URIs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A parsed URI. ``key`` is the object key (s3), path in repo (hf) or "" ; ``path`` the local path."""

    uri: str
    scheme: Literal["s3", "hf", "local"]
    bucket: str = ""  # s3 bucket
    key: str = ""  # s3 key / path inside an hf repo
    repo_id: str = ""  # hf
    repo_type: str = "model"  # hf: model | dataset | space
    revision: str | None = None
    path: Path | None = None  # local and pvc


def _check_segments(uri: str, parts: Iterable[str]) -> None:
    if any(p in ("..", ".") for p in parts):
        raise ValueError(f"{uri}: '.' and '..' segments are not allowed")


def pvc_root() -> Path:
    return Path(os.environ.get("FTJ_PVC_ROOT", DEFAULT_PVC_ROOT))


def pvc_mount(claim: str) -> Path:
    """Where claim ``claim`` is mounted: ``$FTJ_PVC_<CLAIM>`` (e.g. FTJ_PVC_MY_MODELS for my-models) when
    set, else ``$FTJ_PVC_ROOT/<claim>``. The per-claim variable lets a kubelet that relocates mounts (the
    embedded cluster's) rewrite the path like any other env value that starts with a mountPath."""
    override = os.environ.get("FTJ_PVC_" + re.sub(r"[^A-Za-z0-9]", "_", claim).upper())
    return Path(override) if override else pvc_root() / claim


def parse(uri: str | os.PathLike[str]) -> Location:
    """Parse a storage URI (see the module docstring). Raises ValueError for malformed ones."""
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        rest = uri[len("s3://") :]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{uri}: missing bucket")
        _check_segments(uri, key.split("/"))
        return Location(uri, "s3", bucket=bucket, key=key.strip("/"))
    if uri.startswith("hf://"):
        parts = [p for p in uri[len("hf://") :].split("/") if p]
        repo_type = "model"
        if parts and parts[0] in ("datasets", "models", "spaces"):
            repo_type = parts.pop(0).rstrip("s")
        if len(parts) < 2:
            raise ValueError(f"{uri}: expected hf://org/name[@revision][/path]")
        name, _, revision = parts[1].partition("@")
        _check_segments(uri, parts[2:])
        return Location(
            uri,
            "hf",
            repo_id=f"{parts[0]}/{name}",
            repo_type=repo_type,
            revision=urllib.parse.unquote(revision) or None,
            key="/".join(parts[2:]),
        )
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://") :]
        claim, _, sub = rest.partition("/")
        if not claim:
            raise ValueError(f"{uri}: missing claim name")
        _check_segments(uri, sub.split("/"))
        return Location(uri, "local", path=pvc_mount(claim) / sub)
    if uri.startswith("file://"):
        return Location(uri, "local", path=Path(urllib.parse.unquote(uri[len("file://") :])))
    if "://" in uri:
        raise ValueError(f"{uri}: unsupported scheme (use s3://, hf://, pvc:// or a local path)")
    return Location(uri, "local", path=Path(uri))


def join(uri: str, *parts: str) -> str:
    """Append path segments to a URI or path with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


# --- S3 -----------------------------------------------------------------------------------------------------


def _s3_env_key() -> tuple[str | None, ...]:
    names = (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
        "AWS_PROFILE",
        "FTJ_S3_ADDRESSING_STYLE",
    )
    return tuple(os.environ.get(n) for n in names)


@functools.lru_cache(maxsize=8)
def _s3_client_for(env_key: tuple[str | None, ...]) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "adaptive"),
            # Like the AWS_MAX_ATTEMPTS convention: tries in all, the first one included.
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10")),
        },
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": os.environ.get("FTJ_S3_ADDRESSING_STYLE", "auto")},
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # boto3 reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself; credentials come from the default chain
    # (env from the job's Secret, IRSA web identity, ...). Nothing here ever logs them.
    return boto3.session.Session().client("s3", region_name=region, config=config)


def s3_client() -> Any:
    """A boto3 S3 client for the current environment (cached per endpoint/credentials/retry settings)."""
    return _s3_client_for(_s3_env_key())


def _transfer_config(multipart_threshold: int | None = None) -> Any:
    from boto3.s3.transfer import TransferConfig

    threshold = multipart_threshold or int(
        os.environ.get("FTJ_S3_MULTIPART_THRESHOLD", DEFAULT_MULTIPART_BYTES)
    )
    return TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=max(threshold, 5 * 1024 * 1024),
        max_concurrency=8,
        use_threads=True,
    )


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def _s3_prefix(loc: Location) -> str:
    return loc.key.rstrip("/") + "/" if loc.key else ""


# --- object info --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """A stored file: its URI, path relative to the listed prefix, size, ETag and (S3) VersionId."""

    uri: str
    relpath: str
    size: int
    etag: str | None = None
    version_id: str | None = None


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stat(uri: str) -> ObjectInfo:
    """Size, ETag and VersionId of one object (local files: ``sha256:<hex>`` as ETag, no VersionId)."""
    loc = parse(uri)
    name = PurePosixPath(loc.key or str(loc.path)).name
    if loc.scheme == "s3":
        try:
            head = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as exc:
            if _is_not_found(exc):
                raise NotFound(uri) from None
            raise
        return ObjectInfo(
            uri,
            name,
            int(head["ContentLength"]),
            head.get("ETag", "").strip('"') or None,
            head.get("VersionId"),
        )
    if loc.scheme == "hf":
        local = _hf_file(loc)
        # Cache layout: snapshots/<commit>/<file> -> blobs/<etag>.
        return ObjectInfo(
            uri, name, local.stat().st_size, Path(os.path.realpath(local)).name, _hf_commit_of(local, loc.key)
        )
    assert loc.path is not None
    if not loc.path.is_file():
        raise NotFound(uri)
    return ObjectInfo(uri, name, loc.path.stat().st_size, "sha256:" + sha256_file(loc.path), None)


def exists(uri: str) -> bool:
    """Whether a file/object exists (directories: whether anything is under the prefix)."""
    loc = parse(uri)
    if loc.scheme == "local":
        assert loc.path is not None
        return loc.path.exists()
    try:
        if loc.scheme == "hf" and not loc.key:
            if not hf_offline():  # never download a whole repository just to see that it exists
                from huggingface_hub import repo_exists

                return bool(repo_exists(loc.repo_id, repo_type=loc.repo_type, token=_hf_token()))
            _hf_snapshot(loc)
        else:
            stat(uri)
        return True
    except NotFound:
        if loc.scheme == "s3":
            resp = s3_client().list_objects_v2(Bucket=loc.bucket, Prefix=_s3_prefix(loc), MaxKeys=1)
            return bool(resp.get("KeyCount", 0) > 0)
        return False


def list_files(prefix: str) -> list[ObjectInfo]:
    """Every file under ``prefix`` (recursive), sorted by relative path."""
    loc = parse(prefix)
    if loc.scheme == "s3":
        out = []
        paginator = s3_client().get_paginator("list_objects_v2")
        base = _s3_prefix(loc)
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(base) :]
                if rel.endswith("/") and not obj["Size"]:
                    continue  # a "folder" marker (S3 consoles create them), not a file
                if rel:
                    out.append(
                        ObjectInfo(
                            f"s3://{loc.bucket}/{obj['Key']}",
                            rel,
                            int(obj["Size"]),
                            obj.get("ETag", "").strip('"') or None,
                        )
                    )
        return sorted(out, key=lambda o: o.relpath)
    if loc.scheme == "hf":
        root = _hf_snapshot(loc)
        return [
            ObjectInfo(join(prefix, rel), rel, (root / rel).stat().st_size)
            for rel in sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        ]
    assert loc.path is not None
    if not loc.path.is_dir():
        return []
    return [
        ObjectInfo(
            join(prefix, p.relative_to(loc.path).as_posix()),
            p.relative_to(loc.path).as_posix(),
            p.stat().st_size,
        )
        for p in sorted(loc.path.rglob("*"))
        if p.is_file()
    ]


def list_dirs(prefix: str) -> list[str]:
    """Names of the immediate sub-directories of ``prefix`` (S3: common prefixes), sorted."""
    loc = parse(prefix)
    if loc.scheme == "s3":
        names: set[str] = set()
        base = _s3_prefix(loc)
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=base, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(base) :].rstrip("/"))
        return sorted(names)
    if loc.scheme == "hf":
        raise UnsupportedOperation(f"{prefix}: listing hf:// directories is not supported")
    assert loc.path is not None
    return sorted(p.name for p in loc.path.iterdir() if p.is_dir()) if loc.path.is_dir() else []


# --- read / write -------------------------------------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    if loc.scheme == "s3":
        try:
            data: bytes = s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            return data
        except Exception as exc:
            if _is_not_found(exc):
                raise NotFound(uri) from None
            raise
    if loc.scheme == "hf":
        return _hf_file(loc).read_bytes()
    assert loc.path is not None
    try:
        return loc.path.read_bytes()
    except FileNotFoundError:
        raise NotFound(uri) from None


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def _atomic_local_write(path: Path, data: bytes, create_only: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if create_only:
            # link() fails if the target exists: create-only and never a half-written file for readers.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExists(str(path)) from None
            except OSError:  # filesystems without hard links
                try:
                    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    raise AlreadyExists(str(path)) from None
                with os.fdopen(out, "wb") as fh:
                    fh.write(data)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(uri: str, data: bytes, *, create_only: bool = False, content_type: str | None = None) -> None:
    """Write an object whole. ``create_only`` raises AlreadyExists instead of overwriting."""
    loc = parse(uri)
    if loc.scheme == "s3":
        from botocore.exceptions import ClientError

        client = s3_client()
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        if create_only:
            # Stores that ignore If-None-Match would overwrite silently; the HEAD catches the usual case.
            # Real S3, MinIO and moto honour the conditional put, which closes the race.
            if exists_object(uri):
                raise AlreadyExists(uri)
            extra["IfNoneMatch"] = "*"
        try:
            client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **extra)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if create_only and code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                raise AlreadyExists(uri) from None
            raise
        return
    if loc.scheme == "hf":
        raise UnsupportedOperation(f"{uri}: hf:// is read-only")
    assert loc.path is not None
    _atomic_local_write(loc.path, data, create_only)


def write_text(uri: str, text: str, *, create_only: bool = False) -> None:
    write_bytes(uri, text.encode("utf-8"), create_only=create_only)


def exists_object(uri: str) -> bool:
    """Whether exactly this object/file exists (no prefix semantics)."""
    try:
        stat_light(uri)
        return True
    except NotFound:
        return False


def stat_light(uri: str) -> ObjectInfo:
    """Like :func:`stat` but without hashing local files."""
    loc = parse(uri)
    if loc.scheme == "local":
        assert loc.path is not None
        if not loc.path.is_file():
            raise NotFound(uri)
        return ObjectInfo(uri, loc.path.name, loc.path.stat().st_size)
    return stat(uri)


# --- transfers ----------------------------------------------------------------------------------------------


def download_file(uri: str, dest: str | os.PathLike[str]) -> Path:
    """Copy one object to ``dest`` (written to a temporary name first, so no partial file is left)."""
    loc = parse(uri)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")  # ranks sharing a workdir may race
    try:
        if loc.scheme == "s3":
            try:
                s3_client().download_file(loc.bucket, loc.key, str(tmp), Config=_transfer_config())
            except Exception as exc:
                if _is_not_found(exc):
                    raise NotFound(uri) from None
                raise
        elif loc.scheme == "hf":
            shutil.copyfile(_hf_file(loc), tmp)
        else:
            assert loc.path is not None
            if not loc.path.is_file():
                raise NotFound(uri)
            shutil.copyfile(loc.path, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download_dir(uri: str, dest: str | os.PathLike[str], *, exclude: Sequence[str] = ()) -> Path:
    """Copy every file under ``uri`` into ``dest``; files already there with the same size are kept."""
    dest = Path(dest)
    files = list_files(uri)
    if not files:
        raise NotFound(f"{uri}: no files")
    wanted = [info for info in files if PurePosixPath(info.relpath).name not in exclude]
    _download_all(wanted, dest)
    return dest


def _download_all(files: Sequence[ObjectInfo], dest: Path) -> None:
    """Download ``files`` under ``dest`` by relative path; every key is checked before anything is written."""
    targets = [safe_target(dest, info.relpath, source=info.uri) for info in files]
    for info, target in zip(files, targets, strict=True):
        if not (target.is_file() and target.stat().st_size == info.size):
            download_file(info.uri, target)


def upload_file(src: str | os.PathLike[str], uri: str, *, multipart_threshold: int | None = None) -> None:
    """Copy a local file to ``uri`` (S3: multipart above the threshold, retried by boto3)."""
    loc = parse(uri)
    if loc.scheme == "s3":
        s3_client().upload_file(
            os.fspath(src), loc.bucket, loc.key, Config=_transfer_config(multipart_threshold)
        )
        return
    if loc.scheme == "hf":
        raise UnsupportedOperation(f"{uri}: hf:// is read-only")
    assert loc.path is not None
    loc.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.path.with_name(f".{loc.path.name}.part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, loc.path)


def local_files(local_dir: str | os.PathLike[str], exclude: Sequence[str] = ()) -> list[str]:
    """Relative POSIX paths of the files under ``local_dir``, sorted, minus names in ``exclude``."""
    root = Path(local_dir)
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name not in exclude
    )


def upload_dir(
    local_dir: str | os.PathLike[str],
    uri: str,
    *,
    exclude: Sequence[str] = (),
    multipart_threshold: int | None = None,
) -> list[str]:
    """Upload every file under ``local_dir`` to ``uri``; returns the relative paths uploaded."""
    rels = local_files(local_dir, exclude)
    for rel in rels:
        upload_file(Path(local_dir) / rel, join(uri, rel), multipart_threshold=multipart_threshold)
    return rels


def delete_file(uri: str) -> bool:
    """Delete one object/file; returns whether it existed."""
    loc = parse(uri)
    if loc.scheme == "s3":
        if not exists_object(uri):
            return False
        s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)
        return True
    if loc.scheme == "hf":
        raise UnsupportedOperation(f"{uri}: hf:// is read-only")
    assert loc.path is not None
    try:
        loc.path.unlink()
        return True
    except FileNotFoundError:
        return False


def delete_prefix(uri: str) -> int:
    """Delete ``uri`` and everything under it (a directory, or a single object); returns how many."""
    loc = parse(uri)
    if loc.scheme == "s3":
        client = s3_client()
        keys = [f"{_s3_prefix(loc)}{o.relpath}" for o in list_files(uri)]
        if loc.key and exists_object(uri):
            keys.append(loc.key)
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            client.delete_objects(
                Bucket=loc.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
        return len(keys)
    if loc.scheme == "hf":
        raise UnsupportedOperation(f"{uri}: hf:// is read-only")
    assert loc.path is not None
    if not loc.path.exists():
        return 0
    if not loc.path.is_dir():
        loc.path.unlink()
        return 1
    count = len(local_files(loc.path))
    shutil.rmtree(loc.path)
    return count


# --- Hugging Face Hub ---------------------------------------------------------------------------------------


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hf_cache_dir() -> Path:
    """Read at call time (huggingface_hub reads HF_HOME once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home) / "hub"


def _hf_token() -> str | bool | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


@contextlib.contextmanager
def _hf_not_found(uri: str) -> Iterator[None]:
    """A file missing from the repo (or, offline, from the cache) is NotFound; network trouble stays as is."""
    from huggingface_hub import errors

    try:
        yield
    except errors.LocalEntryNotFoundError:
        if hf_offline():
            raise NotFound(f"{uri} (not in the offline Hugging Face cache)") from None
        raise
    except errors.RemoteEntryNotFoundError:
        raise NotFound(uri) from None


def _hf_snapshot(
    loc: Location, revision: str | None = None, allow_patterns: Sequence[str] | None = None
) -> Path:
    from huggingface_hub import snapshot_download

    with _hf_not_found(loc.uri):
        path = snapshot_download(
            loc.repo_id,
            repo_type=loc.repo_type,
            revision=revision or loc.revision,
            cache_dir=hf_cache_dir(),
            token=_hf_token(),
            local_files_only=hf_offline(),
            allow_patterns=list(allow_patterns) if allow_patterns else None,
        )
    return Path(str(path))


def _hf_file(loc: Location) -> Path:
    from huggingface_hub import hf_hub_download

    if not loc.key:
        raise ValueError(f"{loc.uri}: expected a file inside the repository")
    with _hf_not_found(loc.uri):
        return Path(
            hf_hub_download(
                loc.repo_id,
                loc.key,
                repo_type=loc.repo_type,
                revision=loc.revision,
                cache_dir=hf_cache_dir(),
                token=_hf_token(),
                local_files_only=hf_offline(),
            )
        )


def _hf_commit_of(local: Path, key: str) -> str:
    snapshot = local
    for _ in key.split("/"):
        snapshot = snapshot.parent
    return snapshot.name


# --- models -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A base model ready to load: local directory plus the revision to record in manifests."""

    path: Path
    revision: str | None


def _listing_digest(files: Iterable[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for info in files:
        digest.update(f"{info.relpath}\0{info.size}\0{info.etag or ''}\n".encode())
    return digest.hexdigest()[:16]


def fetch_model(
    uri: str,
    *,
    revision: str | None = None,
    dest: str | os.PathLike[str] | None = None,
    allow_patterns: Sequence[str] | None = None,
) -> ModelSource:
    """Make a Hugging Face model directory available locally.

    hf:// resolves to the cache snapshot (revision = commit hash); s3:// is copied under ``dest`` (default
    ``$FTJ_WORKDIR/models/<hash>``; revision = a digest of keys, sizes and ETags); pvc:// and local paths are
    used in place.
    """
    loc = parse(uri)
    if loc.scheme == "hf":
        path = _hf_snapshot(loc, revision, allow_patterns)
        if loc.key:
            path = path / loc.key
        return ModelSource(path, path.name if not loc.key else _hf_commit_of(path, loc.key))
    if loc.scheme == "s3":
        files = list_files(uri)
        if not files:
            raise NotFound(f"{uri}: no model files")
        if dest is None:
            dest = (
                Path(os.environ.get("FTJ_WORKDIR", "/workspace"))
                / "models"
                / hashlib.sha256(uri.encode()).hexdigest()[:16]
            )
        wanted = [
            f
            for f in files
            if not allow_patterns or any(fnmatch.fnmatch(f.relpath, pattern) for pattern in allow_patterns)
        ]
        _download_all(wanted, Path(dest))
        return ModelSource(Path(dest), revision or "s3:" + _listing_digest(files))
    assert loc.path is not None
    if not loc.path.is_dir():
        raise NotFound(f"{uri}: not a directory")
    return ModelSource(loc.path, revision)
