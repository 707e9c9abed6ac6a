"""storage.py and manifest.py against moto's S3 server, local paths, pvc:// and an offline HF cache."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
from finetune_trainer import manifest, storage
from finetune_trainer.exitcodes import ExitCode, classify
from finetune_trainer.logs import JsonFormatter, RedactingFilter, redact

from .conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, S3Bucket, build_tokenizer, make_hf_cache_snapshot


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


# --- S3 -----------------------------------------------------------------------------------------------------


def test_s3_roundtrip_list_stat_delete(s3: S3Bucket, tmp_path: Path) -> None:
    src = _tree(
        tmp_path / "src", {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01" * 10, "sub/deep/c.json": b"{}"}
    )
    uploaded = storage.upload_dir(src, s3.uri("run/model"))
    assert uploaded == ["a.txt", "sub/b.bin", "sub/deep/c.json"]
    assert s3.keys("run/") == ["run/model/a.txt", "run/model/sub/b.bin", "run/model/sub/deep/c.json"]

    assert [f.relpath for f in storage.list_files(s3.uri("run/model"))] == uploaded
    assert storage.list_dirs(s3.uri("run/model")) == ["sub"]
    assert storage.exists(s3.uri("run/model/a.txt")) and storage.exists(s3.uri("run/model"))
    assert not storage.exists(s3.uri("run/model/zzz")) and not storage.exists(s3.uri("run/other"))

    info = storage.stat(s3.uri("run/model/sub/b.bin"))
    assert info.size == 20 and info.etag == s3.client.head_object(
        Bucket=s3.bucket, Key="run/model/sub/b.bin"
    )["ETag"].strip('"')

    out = storage.download_dir(s3.uri("run/model"), tmp_path / "dst")
    assert (out / "sub/b.bin").read_bytes() == b"\x00\x01" * 10
    assert storage.read_text(s3.uri("run/model/a.txt")) == "alpha"

    assert storage.delete_prefix(s3.uri("run/model/sub")) == 2
    assert s3.keys("run/") == ["run/model/a.txt"]
    with pytest.raises(storage.NotFound):
        storage.read_bytes(s3.uri("run/model/sub/b.bin"))
    with pytest.raises(storage.NotFound):
        storage.download_file(s3.uri("run/missing"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_s3_client_uses_the_environment(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    client = storage.s3_client()
    assert client.meta.endpoint_url == s3.endpoint  # AWS_ENDPOINT_URL, as for MinIO
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 2}
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    assert storage.s3_client().meta.config.retries["mode"] == "standard"


def test_s3_large_file_uses_multipart(s3: S3Bucket, tmp_path: Path) -> None:
    big = tmp_path / "weights.safetensors"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    storage.upload_file(big, s3.uri("m/weights.safetensors"), multipart_threshold=5 * 1024 * 1024)
    etag = storage.stat(s3.uri("m/weights.safetensors")).etag
    assert etag is not None and etag.endswith("-3"), etag  # 3 parts of 5 MiB
    back = storage.download_file(s3.uri("m/weights.safetensors"), tmp_path / "back")
    assert storage.sha256_file(back) == storage.sha256_file(big)


def test_s3_versioned_object_reports_version_id(s3: S3Bucket) -> None:
    s3.client.put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    storage.write_text(s3.uri("data/train.jsonl"), "{}\n")
    info = storage.stat(s3.uri("data/train.jsonl"))
    assert info.version_id and info.version_id != "null"


def test_s3_create_only_write_refuses_to_overwrite(s3: S3Bucket) -> None:
    storage.write_text(s3.uri("x/MANIFEST.json"), "first", create_only=True)
    with pytest.raises(storage.AlreadyExists):
        storage.write_text(s3.uri("x/MANIFEST.json"), "second", create_only=True)
    assert storage.read_text(s3.uri("x/MANIFEST.json")) == "first"


def test_s3_conditional_put_is_what_closes_the_race(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate the race: both writers' HEAD said "absent"; the server's If-None-Match must stop the second.
    storage.write_text(s3.uri("y/MANIFEST.json"), "winner", create_only=True)
    monkeypatch.setattr(storage, "exists_object", lambda uri: False)
    with pytest.raises(storage.AlreadyExists):
        storage.write_text(s3.uri("y/MANIFEST.json"), "loser", create_only=True)
    assert storage.read_text(s3.uri("y/MANIFEST.json")) == "winner"


def test_unreachable_s3_is_transient(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(Exception) as err:
        storage.read_bytes("s3://bucket/key")
    code, message = classify(err.value)
    assert code == ExitCode.TRANSIENT and FAKE_SECRET_KEY not in message


def test_access_denied_is_a_config_error(s3: S3Bucket) -> None:
    with pytest.raises(Exception) as err:
        storage.read_bytes("s3://no-such-bucket-ftj/key")
    code, message = classify(err.value)
    assert code == ExitCode.INVALID_CONFIG and "credentialsSecret" in message


# --- manifests ----------------------------------------------------------------------------------------------


def test_commit_dir_writes_manifest_last_and_is_create_only(s3: S3Bucket, tmp_path: Path) -> None:
    src = _tree(tmp_path / "ckpt", {"model.safetensors": b"w" * 100, "trainer_state.json": b'{"step": 5}'})
    written: list[str] = []
    real_upload, real_write = storage.upload_file, storage.write_bytes

    def spy_upload(path: Path, uri: str, **kw: object) -> None:
        written.append(uri)
        real_upload(path, uri, **kw)

    def spy_write(uri: str, data: bytes, **kw: object) -> None:
        written.append(uri)
        real_write(uri, data, **kw)

    storage.upload_file, storage.write_bytes = spy_upload, spy_write  # type: ignore[assignment]
    try:
        m = manifest.commit_dir(
            src,
            s3.uri("run/checkpoints/step-00000005"),
            kind="checkpoint",
            step=5,
            dataset={"train": {"uri": "s3://b/t.jsonl", "etag": "e1", "versionId": "v1"}},
            base_model={"uri": "hf://org/m", "revision": "abc"},
            hyperparameters={"learningRate": 2e-4},
        )
    finally:
        storage.upload_file, storage.write_bytes = real_upload, real_write  # type: ignore[assignment]
    assert written[-1].endswith("/MANIFEST.json") and len(written) == 3

    stored = manifest.read_manifest(s3.uri("run/checkpoints/step-00000005"))
    assert stored == m
    assert {f.path: f.size for f in stored.files} == {"model.safetensors": 100, "trainer_state.json": 11}
    assert stored.file("model.safetensors").sha256 == storage.sha256_file(src / "model.safetensors")
    assert stored.step == 5 and stored.base_model["revision"] == "abc"
    assert stored.dataset["train"]["versionId"] == "v1"
    assert stored.libraries["transformers"] and stored.libraries["python"]
    raw = json.loads(storage.read_text(s3.uri("run/checkpoints/step-00000005/MANIFEST.json")))
    assert raw["baseModel"] == {"uri": "hf://org/m", "revision": "abc"}

    (src / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(manifest.AlreadyCommitted):
        manifest.commit_dir(src, s3.uri("run/checkpoints/step-00000005"), kind="checkpoint", step=5)
    # The committed directory was not touched.
    assert storage.read_bytes(s3.uri("run/checkpoints/step-00000005/model.safetensors")) == b"w" * 100


def test_readers_ignore_uncommitted_directories(s3: S3Bucket, tmp_path: Path) -> None:
    src = _tree(tmp_path / "c", {"state.json": b"{}"})
    ckpts = s3.uri("run/checkpoints")
    manifest.commit_dir(src, f"{ckpts}/step-00000010", kind="checkpoint", step=10)
    manifest.commit_dir(src, f"{ckpts}/step-00000020", kind="checkpoint", step=20)
    # A newer checkpoint whose upload died before the manifest: must be ignored.
    storage.upload_dir(src, f"{ckpts}/step-00000030")
    assert manifest.find_committed(ckpts) == [f"{ckpts}/step-00000010", f"{ckpts}/step-00000020"]
    uri, found = manifest.latest_committed(ckpts)
    assert uri == f"{ckpts}/step-00000020" and found.step == 20
    assert manifest.read_manifest(f"{ckpts}/step-00000030") is None
    with pytest.raises(manifest.NotCommitted):
        manifest.download_committed(f"{ckpts}/step-00000030", tmp_path / "x")
    assert manifest.latest_committed(s3.uri("run/nothing-here")) is None


def test_commit_replaces_leftovers_of_an_uncommitted_attempt(s3: S3Bucket, tmp_path: Path) -> None:
    dest = s3.uri("run/model/adapter")
    storage.write_text(f"{dest}/stale-from-crashed-attempt.bin", "x")
    manifest.commit_dir(_tree(tmp_path / "a", {"adapter_config.json": b"{}"}), dest, kind="adapter")
    assert s3.keys("run/model/adapter/") == [
        "run/model/adapter/MANIFEST.json",
        "run/model/adapter/adapter_config.json",
    ]


def test_download_committed_verifies_sha256(s3: S3Bucket, tmp_path: Path) -> None:
    dest = s3.uri("run/model/merged")
    manifest.commit_dir(
        _tree(tmp_path / "m", {"config.json": b'{"a": 1}', "w.bin": b"0123"}), dest, kind="merged"
    )
    got = manifest.download_committed(dest, tmp_path / "ok")
    assert (tmp_path / "ok/w.bin").read_bytes() == b"0123" and got.kind == "merged"
    assert manifest.verify_local(tmp_path / "ok", got) == []

    storage.write_bytes(f"{dest}/w.bin", b"3210")  # same size, different content
    with pytest.raises(manifest.IntegrityError) as err:
        manifest.download_committed(dest, tmp_path / "bad")
    assert "w.bin" in str(err.value) and classify(err.value)[0] == ExitCode.TRANSIENT


def test_concurrent_commits_have_one_winner(tmp_path: Path) -> None:
    dest = str(tmp_path / "store" / "checkpoints" / "step-00000001")
    src = _tree(tmp_path / "c", {"f": b"1"})
    outcomes: list[str] = []

    def commit() -> None:
        try:
            storage.write_text(
                f"{dest}/MANIFEST.json", manifest.build_manifest(src, kind="c").to_json(), create_only=True
            )
            outcomes.append("won")
        except storage.AlreadyExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=commit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    assert not [p for p in Path(dest).iterdir() if p.name != "MANIFEST.json"]  # no temp files left


# --- local, pvc:// ------------------------------------------------------------------------------------------


def test_local_and_pvc_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTJ_PVC_ROOT", str(tmp_path / "mnt"))
    assert storage.parse("pvc://models/llama/7b").path == tmp_path / "mnt/models/llama/7b"
    monkeypatch.setenv("FTJ_PVC_SHARED_DATA_V2", str(tmp_path / "elsewhere"))
    assert storage.parse("pvc://shared-data.v2/x.jsonl").path == tmp_path / "elsewhere/x.jsonl"
    src = _tree(tmp_path / "src", {"config.json": b"{}", "tok/tokenizer.json": b"[]"})
    storage.upload_dir(src, "pvc://models/llama")
    assert (tmp_path / "mnt/models/llama/tok/tokenizer.json").read_bytes() == b"[]"
    assert storage.fetch_model("pvc://models/llama").path == tmp_path / "mnt/models/llama"
    assert storage.list_dirs("pvc://models") == ["llama"]

    local = str(tmp_path / "run")
    manifest.commit_dir(src, f"{local}/data", kind="dataset")
    assert manifest.find_committed(local) == [f"{local}/data"]
    assert storage.stat(f"{local}/data/config.json").etag == "sha256:" + storage.sha256_file(
        src / "config.json"
    )
    assert storage.read_text(f"file://{local}/data/config.json") == "{}"
    assert storage.delete_prefix(f"{local}/data") == 3 and not storage.exists(f"{local}/data")


@pytest.mark.parametrize(
    "bad",
    [
        "s3://",
        "s3:///key",
        "s3://b/../x",
        "pvc://",
        "pvc://c/../../etc",
        "http://example.com/x",
        "hf://onlyorg",
        "gs://b/k",
    ],
)
def test_malformed_uris_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        storage.parse(bad)


# --- hf:// --------------------------------------------------------------------------------------------------


def test_hf_model_from_offline_cache(hf_offline_cache: Path, tmp_path: Path) -> None:
    src = build_tokenizer(tmp_path / "tok")
    (src / "config.json").write_text('{"model_type": "llama"}')
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_hf_cache_snapshot(hf_offline_cache, "acme/tiny-llm", src, commit=commit)

    got = storage.fetch_model("hf://acme/tiny-llm")
    assert got.revision == commit and (got.path / "config.json").read_text() == '{"model_type": "llama"}'
    assert storage.fetch_model("hf://acme/tiny-llm@main").revision == commit
    assert storage.read_text("hf://acme/tiny-llm/config.json") == '{"model_type": "llama"}'

    assert (got.path / "tokenizer.json").is_file() and (got.path / "tokenizer_config.json").is_file()

    assert storage.exists("hf://acme/tiny-llm") and storage.exists("hf://acme/tiny-llm/config.json")
    assert not storage.exists("hf://acme/tiny-llm/nope.json") and not storage.exists("hf://acme/not-cached")
    with pytest.raises(storage.NotFound, match="offline Hugging Face cache"):
        storage.fetch_model("hf://acme/not-cached")


def test_hf_dataset_file_from_offline_cache(hf_offline_cache: Path, tmp_path: Path) -> None:
    data = _tree(tmp_path / "ds", {"train.jsonl": b'{"prompt": "a", "completion": "b"}\n'})
    make_hf_cache_snapshot(hf_offline_cache, "acme/qa", data, commit="f" * 40, repo_type="dataset")
    info = storage.stat("hf://datasets/acme/qa/train.jsonl")
    assert info.version_id == "f" * 40 and info.size == data.joinpath("train.jsonl").stat().st_size
    assert storage.read_text("hf://datasets/acme/qa/train.jsonl").startswith('{"prompt"')
    with pytest.raises(storage.UnsupportedOperation):
        storage.write_text("hf://acme/qa/x", "no")


# --- credentials never logged ------------------------------------------------------------------------------


def test_log_lines_never_carry_credentials(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz0123")
    record = logging.LogRecord(
        "t",
        logging.INFO,
        __file__,
        1,
        "creds %s %s token=%s url=%s",
        (
            FAKE_ACCESS_KEY,
            FAKE_SECRET_KEY,
            os.environ["HF_TOKEN"],
            "https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeef1234&X-Amz-Credential=AKIA",
        ),
        None,
        None,
    )
    assert RedactingFilter().filter(record)
    line = JsonFormatter().format(record)
    for secret in (FAKE_ACCESS_KEY, FAKE_SECRET_KEY, "hf_abcdefghijklmnopqrstuvwxyz0123", "deadbeef1234"):
        assert secret not in line
    assert line.count("***") >= 4
    assert redact("Authorization: Bearer sk-live-123456789") == "Authorization: Bearer ***"
    assert redact("plain words stay") == "plain words stay"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_delete_committed_removes_the_manifest_first(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base = request.getfixturevalue("s3").uri("run") if where == "s3" else str(tmp_path / "store")
    src = _tree(tmp_path / "c", {"a.bin": b"1", "sub/b.bin": b"2"})
    for step in (1, 2):
        manifest.commit_dir(src, f"{base}/checkpoints/step-{step:08d}", kind="checkpoint", step=step)
    order: list[str] = []
    real = storage.delete_file
    storage.delete_file = lambda uri: order.append(uri) or real(uri)  # type: ignore[assignment]
    try:
        assert manifest.delete_committed(f"{base}/checkpoints/step-00000001") == 2
    finally:
        storage.delete_file = real  # type: ignore[assignment]
    assert order == [f"{base}/checkpoints/step-00000001/MANIFEST.json"]
    assert manifest.find_committed(f"{base}/checkpoints") == [f"{base}/checkpoints/step-00000002"]
    assert not storage.list_files(f"{base}/checkpoints/step-00000001")
    # delete_prefix on a single object deletes just that object.
    assert storage.delete_prefix(f"{base}/checkpoints/step-00000002/MANIFEST.json") == 1
    assert manifest.find_committed(f"{base}/checkpoints") == []
    assert [f.relpath for f in storage.list_files(f"{base}/checkpoints/step-00000002")] == [
        "a.bin",
        "sub/b.bin",
    ]


# --- hostile keys and manifest paths ------------------------------------------------------------------------

# (relative key below the prefix, what the refusal names). "{outside}" is an absolute directory outside dest.
HOSTILE_KEYS = [
    ("{outside}/owned.tiktoken", "absolute path"),  # models/evil//tmp/x/owned.tiktoken
    ("../../outside/owned.txt", "'..' segment"),
    ("sub/../../../owned.txt", "'..' segment"),
    ("./owned.txt", "'.' segment"),
    ("sub//owned.txt", "empty path segment"),
    ("..\\..\\owned.txt", "backslash"),
    ("nul\x00.txt", "NUL or control character"),
    ("x" * 300 + "/owned.txt", "longer than 255 bytes"),
    ("/".join(["d" * 200] * 6) + "/owned.txt", "longer than 1024 bytes"),
]


def _hostile(rel: str, outside: Path) -> str:
    return rel.replace("{outside}", str(outside))


def _nothing_written(outside: Path, dest: Path) -> None:
    assert not list(outside.rglob("*")), list(outside.rglob("*"))
    assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()]


@pytest.mark.parametrize(("rel", "reason"), HOSTILE_KEYS, ids=[r for _, r in HOSTILE_KEYS])
def test_hostile_s3_keys_are_refused_by_every_download(
    s3: S3Bucket, tmp_path: Path, rel: str, reason: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    key = "models/evil/" + _hostile(rel, outside)
    s3.client.put_object(Bucket=s3.bucket, Key="models/evil/config.json", Body=b"{}")
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=b"owned")
    assert key in s3.keys("models/evil/")  # moto stored the key as given
    for download in (
        lambda dest: storage.download_dir(s3.uri("models/evil"), dest),
        lambda dest: storage.fetch_model(s3.uri("models/evil"), dest=dest),
    ):
        dest = tmp_path / "dest"
        with pytest.raises(storage.UnsafePath, match=reason) as refused:
            download(dest)
        assert "refusing to write" in str(refused.value) and str(dest) in str(refused.value)
        assert classify(refused.value)[0] == ExitCode.INVALID_DATA  # permanent: no retries
        _nothing_written(outside, dest)


@pytest.mark.parametrize("where", ["s3", "pvc"])
@pytest.mark.parametrize(("rel", "reason"), HOSTILE_KEYS[:6], ids=[r for _, r in HOSTILE_KEYS[:6]])
def test_hostile_manifest_paths_are_refused(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    rel: str,
    reason: str,
) -> None:
    """A committed MANIFEST whose entry is absolute, climbs out or is malformed writes nothing anywhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    if where == "s3":
        base = request.getfixturevalue("s3").uri("run/adapter")
    else:
        monkeypatch.setenv("FTJ_PVC_ROOT", str(tmp_path / "pvcs"))
        base = "pvc://claim/run/adapter"
    src = _tree(tmp_path / "src", {"adapter.bin": b"weights"})
    manifest.commit_dir(src, base, kind="adapter")
    doc = json.loads(storage.read_text(manifest.manifest_uri(base)))
    doc["files"].append({"path": _hostile(rel, outside), "size": 5, "sha256": "0" * 64})
    storage.delete_file(manifest.manifest_uri(base))
    storage.write_text(manifest.manifest_uri(base), json.dumps(doc))
    dest = tmp_path / "dest"
    with pytest.raises(storage.UnsafePath, match=reason):
        manifest.download_committed(base, dest)
    _nothing_written(outside, dest)
    problems = manifest.verify_local(dest, manifest.Manifest.from_json(json.dumps(doc)))
    assert any(reason in p for p in problems)


def test_a_symlink_in_the_destination_cannot_carry_a_download_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTJ_PVC_ROOT", str(tmp_path / "pvcs"))
    _tree(tmp_path / "pvcs" / "claim" / "model", {"sub/owned.txt": b"owned", "config.json": b"{}"})
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(storage.UnsafePath, match="outside the destination"):
        storage.download_dir("pvc://claim/model", dest)
    assert not list(outside.iterdir())


def test_fetch_cli_refuses_a_hostile_prefix(s3: S3Bucket, tmp_path: Path) -> None:
    """The init container's `fetch` (and so every stage that stages a model) fails with a clear error."""
    from finetune_trainer import cli
    from finetune_trainer.exitcodes import InvalidConfigError

    outside = tmp_path / "outside"
    outside.mkdir()
    s3.client.put_object(Bucket=s3.bucket, Key=f"models/evil/{outside}/owned.tiktoken", Body=b"owned")
    with pytest.raises(InvalidConfigError, match=r"refusing to write .* absolute path"):
        cli.fetch(s3.uri("models/evil"), str(tmp_path / "dest"))
    _nothing_written(outside, tmp_path / "dest")


def test_s3_folder_markers_are_not_files(s3: S3Bucket, tmp_path: Path) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="models/ok/config.json", Body=b"{}")
    s3.client.put_object(Bucket=s3.bucket, Key="models/ok/sub/", Body=b"")
    assert [f.relpath for f in storage.list_files(s3.uri("models/ok"))] == ["config.json"]
    assert (storage.download_dir(s3.uri("models/ok"), tmp_path / "d") / "config.json").is_file()
