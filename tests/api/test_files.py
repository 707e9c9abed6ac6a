"""/v1/files through the official openai client: upload (validated line by line), list, retrieve, content,
delete, the size limit, and SubjectAccessReview before anything reaches S3."""

from __future__ import annotations

import io
from typing import Any

import openai
import pytest

from .conftest import BUCKET, Admin, Tenant, good_lines

pytestmark = [pytest.mark.timeout(120)]


def s3_keys(s3: Any, namespace: str) -> list[str]:
    answer = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"files/{namespace}/")
    return [o["Key"] for o in answer.get("Contents") or []]


def test_files_list_pages_newest_first_and_by_purpose(tenant: Tenant) -> None:
    """files.list takes OpenAI's limit, after and order; the SDK's iteration follows the pages."""
    client = tenant.client()
    ids = [
        client.files.create(file=(f"t{i}.jsonl", io.BytesIO(good_lines(2))), purpose="fine-tune").id
        for i in range(3)
    ]
    newest_first = [f.id for f in client.files.list().data]
    assert sorted(newest_first) == sorted(ids)
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == newest_first[:2] and first.has_more
    rest = client.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in rest.data] == newest_first[2:] and not rest.has_more
    assert [f.id for f in client.files.list(limit=1)] == newest_first  # auto-pagination, one per page
    assert [f.id for f in client.files.list(order="asc").data] == newest_first[::-1]
    assert client.files.list(purpose="batch").data == []
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.list(order="sideways")  # type: ignore[arg-type]
    assert bad.value.param == "order"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.files.list(after="file-unknown")
    assert unknown.value.param == "after"
    for file_id in ids:
        client.files.delete(file_id)


def test_upload_list_retrieve_content_delete(tenant: Tenant, s3: Any) -> None:
    client = tenant.client()
    data = good_lines(4)
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(data)
    assert uploaded.filename == "train.jsonl" and uploaded.purpose == "fine-tune"
    assert uploaded.status == "processed"
    assert f"files/{tenant.namespace}/files/{uploaded.id}.jsonl" in s3_keys(s3, tenant.namespace)

    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert client.files.content(uploaded.id).content == data

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    assert client.files.list().data == []
    assert s3_keys(s3, tenant.namespace) == []
    with pytest.raises(openai.NotFoundError) as missing:
        client.files.retrieve(uploaded.id)
    assert missing.value.code == "file_not_found"


def test_broken_file_names_the_lines_and_stores_nothing(tenant: Tenant, s3: Any) -> None:
    lines = good_lines(2).splitlines()
    broken = b"\n".join([lines[0], b"{not json", lines[1], b'{"messages": "nope"}']) + b"\n"
    with pytest.raises(openai.BadRequestError) as refused:
        tenant.client().files.create(file=("train.jsonl", io.BytesIO(broken)), purpose="fine-tune")
    err = refused.value
    print("broken upload:", err.message)
    assert err.code == "invalid_file_format" and err.param == "file"
    assert "train.jsonl line 2" in err.message and "line 4" in err.message
    assert s3_keys(s3, tenant.namespace) == []


def test_purpose_must_be_fine_tune(tenant: Tenant) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        tenant.client().files.create(file=("a.jsonl", io.BytesIO(good_lines())), purpose="assistants")
    assert refused.value.param == "purpose"


def test_file_over_the_size_limit_is_413(tenant: Tenant, s3: Any) -> None:
    big = good_lines(1) * (300 * 1024 // len(good_lines(1)) + 1)  # over the tier's 256 KiB limit
    with pytest.raises(openai.APIStatusError) as refused:
        tenant.client().files.create(file=("big.jsonl", io.BytesIO(big)), purpose="fine-tune")
    assert refused.value.status_code == 413 and refused.value.code == "file_too_large"
    assert s3_keys(s3, tenant.namespace) == []


def test_no_rights_in_the_namespace_is_403_and_nothing_in_s3(tenant: Tenant, admin: Admin, s3: Any) -> None:
    outsider = admin.token(
        tenant.namespace, "no-rights"
    )  # a ServiceAccount of that namespace, no RoleBinding
    with pytest.raises(openai.PermissionDeniedError) as denied:
        tenant.client(outsider).files.create(file=("t.jsonl", io.BytesIO(good_lines())), purpose="fine-tune")
    print("403:", denied.value.message)
    assert denied.value.code == "permission_denied"
    assert "no-rights" in denied.value.message and tenant.namespace in denied.value.message
    assert "create" in denied.value.message and "finetunejobs" in denied.value.message
    with pytest.raises(openai.PermissionDeniedError):
        tenant.client(outsider).files.list()
    assert s3_keys(s3, tenant.namespace) == []


def test_project_header_chooses_the_namespace(tenant: Tenant, admin: Admin, s3: Any) -> None:
    """A user of namespace A working in A through `project=`; refused in B where it has no rights."""
    other = f"{tenant.namespace}-b"
    admin.create("/api/v1/namespaces", {"metadata": {"name": other}})
    try:
        in_own = tenant.client(project=tenant.namespace).files.create(
            file=("t.jsonl", io.BytesIO(good_lines())), purpose="fine-tune"
        )
        assert any(in_own.id in k for k in s3_keys(s3, tenant.namespace))
        with pytest.raises(openai.PermissionDeniedError) as denied:
            tenant.client(project=other).files.create(
                file=("t.jsonl", io.BytesIO(good_lines())), purpose="fine-tune"
            )
        assert other in denied.value.message
        assert s3_keys(s3, other) == []
        with pytest.raises(openai.BadRequestError) as bad:
            tenant.client(project="Not_A_Namespace").files.list()
        assert bad.value.param == "OpenAI-Project"
    finally:
        admin.request("DELETE", f"/api/v1/namespaces/{other}")
