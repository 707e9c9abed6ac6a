"""Files of `/v1/files` in S3: `<files-uri>/<namespace>/files/<id>.jsonl` plus a sidecar `<id>.json` with what
the listing shows. Uploads are streamed to a temporary file under the size cap and checked line by line with
the validate stage's own parser (finetune_vocabulary.records.check_upload) before anything is stored. boto3 is
blocking: every S3 call runs in a thread."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from finetune_vocabulary.records import DatasetError, UploadCheck, check_upload

from .config import ApiConfig
from .errors import ApiError

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
CHUNK = 1 << 20
MAX_LISTED_ERRORS = 5
FORM_OVERHEAD = 64 * 1024  # multipart headers and the purpose field, beyond the file itself


@dataclass(frozen=True)
class Upload:
    path: Path
    filename: str
    purpose: str


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def check_file_id(file_id: str) -> str:
    if FILE_ID.match(file_id) is None:
        raise ApiError(404, f"No such File object: {file_id[:64]}", code="file_not_found", param="file_id")
    return file_id


def clean_filename(name: str | None) -> str:
    base = os.path.basename((name or "").replace("\\", "/")).strip()
    base = "".join(ch for ch in base if ch.isprintable())[:255]
    return base or "upload.jsonl"


def file_object(meta: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's File object."""
    return {
        "id": meta["id"],
        "object": "file",
        "bytes": meta["bytes"],
        "created_at": meta["created_at"],
        "filename": meta["filename"],
        "purpose": meta["purpose"],
        "status": "processed",
        "status_details": None,
    }


def upload_error(check: UploadCheck, filename: str) -> ApiError:
    """400 naming the first lines at fault, as OpenAI words it: "train.jsonl line 2: ...; line 5: ..."."""
    listed = list(check.errors[:MAX_LISTED_ERRORS])
    parts = [listed[0].render()] + [f"line {f.line}: {f.message}" for f in listed[1:]]
    message = "; ".join(parts)
    if check.error_count > len(listed):
        message += f"; and {check.error_count - len(listed)} more"
    return ApiError(
        400, f"invalid training file {filename}: {message}", code="invalid_file_format", param="file"
    )


def check_upload_file(upload: Upload) -> UploadCheck:
    """The validate stage's line-level rules; any error → 400 naming the lines (runs in a thread)."""
    try:
        with upload.path.open("rb") as handle:
            check = check_upload(handle, upload.filename)
    except DatasetError as err:
        raise ApiError(400, str(err), code="invalid_file_format", param="file") from None
    if check.error_count or check.errors:
        raise upload_error(check, upload.filename)
    if check.examples == 0:
        raise ApiError(400, f"{upload.filename}: no usable lines", code="invalid_file_format", param="file")
    return check


async def _save_part(part: BodyPartReader, limit: int, target: Path) -> None:
    size = 0
    with target.open("wb") as out:
        while chunk := await part.read_chunk(CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, f"file larger than the limit of {limit} bytes", code="file_too_large", param="file"
                )
            await asyncio.to_thread(out.write, chunk)


async def receive_upload(request: web.Request, limit: int) -> Upload:
    """The multipart form (`file`, `purpose`), the file streamed to a temporary file of at most `limit` bytes;
    the caller deletes `Upload.path`."""
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD:
        raise ApiError(
            413, f"file larger than the limit of {limit} bytes", code="file_too_large", param="file"
        )
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "POST /v1/files takes multipart/form-data (file, purpose)", param="file")
    reader = await request.multipart()
    fd, tmp = tempfile.mkstemp(prefix="finetune-api-upload-", suffix=".jsonl")
    os.close(fd)
    path, filename, purpose, got_file = Path(tmp), "", "", False
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "nested multipart is not supported", param="file")
            if part.name == "file" and not got_file:
                filename, got_file = clean_filename(part.filename), True
                await _save_part(part, limit, path)
            elif part.name == "purpose":
                purpose = (await part.read(decode=True))[:64].decode(errors="replace").strip()
            else:
                await part.release()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if not got_file:
        path.unlink(missing_ok=True)
        raise ApiError(400, "missing the multipart field 'file'", param="file")
    if purpose != "fine-tune":
        path.unlink(missing_ok=True)
        raise ApiError(400, f"purpose must be 'fine-tune', got {purpose[:32]!r}", param="purpose")
    return Upload(path, filename, purpose)


class FileStore:
    """The S3 side; `client` is a boto3 S3 client (the standard AWS_* env when None)."""

    def __init__(self, config: ApiConfig, client: Any = None) -> None:
        self.config = config
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
        return self._client

    def key(self, namespace: str, name: str) -> str:
        return f"{self.config.prefix}{namespace}/files/{name}"

    def uri(self, namespace: str, file_id: str) -> str:
        """The dataset URI a FineTuneJob reads the file from."""
        return f"s3://{self.config.bucket}/{self.key(namespace, check_file_id(file_id) + '.jsonl')}"

    async def put(self, namespace: str, upload: Upload, check: UploadCheck) -> dict[str, Any]:
        file_id = new_file_id()
        meta = {
            "id": file_id,
            "filename": upload.filename,
            "bytes": upload.path.stat().st_size,
            "created_at": int(time.time()),
            "purpose": upload.purpose,
            "format": check.format,
            "objectives": list(check.objectives),
            "lines": check.lines,
            "examples": check.examples,
        }
        bucket = self.config.bucket
        await asyncio.to_thread(
            self.client.upload_file, str(upload.path), bucket, self.key(namespace, f"{file_id}.jsonl")
        )
        await asyncio.to_thread(
            self.client.put_object,
            Bucket=bucket,
            Key=self.key(namespace, f"{file_id}.json"),
            Body=json.dumps(meta).encode(),
            ContentType="application/json",
        )
        return meta

    async def get(self, namespace: str, file_id: str) -> dict[str, Any]:
        """The sidecar of a file; 404 `file_not_found` when there is none."""
        key = self.key(namespace, check_file_id(file_id) + ".json")
        try:
            answer = await asyncio.to_thread(self.client.get_object, Bucket=self.config.bucket, Key=key)
            body = await asyncio.to_thread(answer["Body"].read)
        except self.client.exceptions.NoSuchKey:
            raise ApiError(
                404, f"No such File object: {file_id}", code="file_not_found", param="file_id"
            ) from None
        meta: dict[str, Any] = json.loads(body)
        return meta

    async def list(self, namespace: str) -> list[dict[str, Any]]:
        """Every file of the namespace, newest first."""
        prefix = self.key(namespace, "")
        paginator = self.client.get_paginator("list_objects_v2")

        def keys() -> list[str]:
            pages = paginator.paginate(Bucket=self.config.bucket, Prefix=prefix)
            return [
                o["Key"] for page in pages for o in page.get("Contents") or [] if o["Key"].endswith(".json")
            ]

        metas = []
        for key in await asyncio.to_thread(keys):
            file_id = key[len(prefix) : -len(".json")]
            if FILE_ID.match(file_id):
                metas.append(await self.get(namespace, file_id))
        return sorted(metas, key=lambda m: (m["created_at"], m["id"]), reverse=True)

    async def content(self, namespace: str, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks (check it exists with `get` first: this runs once the answer began)."""
        answer = await asyncio.to_thread(
            self.client.get_object,
            Bucket=self.config.bucket,
            Key=self.key(namespace, check_file_id(file_id) + ".jsonl"),
        )
        body = answer["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK):
                yield chunk
        finally:
            body.close()

    async def delete(self, namespace: str, file_id: str) -> None:
        await self.get(namespace, file_id)
        for name in (f"{file_id}.jsonl", f"{file_id}.json"):
            await asyncio.to_thread(
                self.client.delete_object, Bucket=self.config.bucket, Key=self.key(namespace, name)
            )
