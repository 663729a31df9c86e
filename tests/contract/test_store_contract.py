"""One object-store contract, run against the local directory store and S3 (moto's server).

Every object carries its sha256 and every read can verify it; the local store must behave
like S3 wherever a worker could tell the difference.
"""
from __future__ import annotations

import os
import random

import pytest

from cxr_mq.storage.base import (IntegrityError, ObjectInfo, ObjectNotFound, StoreError,
                                 sha256_bytes, sha256_file)

BIG = 8 * 1024 * 1024 + 123_457  # above the 8 MiB multipart threshold, not a multiple of it
WRONG = "0" * 64


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        from cxr_mq.storage.local import LocalStore

        made = LocalStore(tmp_path / "store")
    else:
        from cxr_mq.storage.s3 import S3Store

        settings = request.getfixturevalue("s3_settings")
        made = S3Store(bucket=settings["bucket"], endpoint_url=settings["endpoint_url"],
                       kms_key_id=settings["kms_key_id"], region=settings["region"])
    made.kind = request.param
    return made


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "work"
    path.mkdir()
    return path


def random_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def test_put_bytes_returns_sha256_and_size(store):
    data = b"encrypted update \x00\x01\x02"
    info = store.put_bytes("rounds/r1/updates/h1", data)
    assert info == ObjectInfo("rounds/r1/updates/h1", sha256_bytes(data), len(data))
    assert store.exists("rounds/r1/updates/h1")


def test_put_file_returns_sha256_and_size(store, workdir):
    source = workdir / "update.bin"
    source.write_bytes(random_bytes(100_000))
    info = store.put_file("rounds/r1/updates/h2", source)
    assert info == ObjectInfo("rounds/r1/updates/h2", sha256_file(source), 100_000)


def test_empty_object_round_trips(store):
    info = store.put_bytes("empty", b"")
    assert info.size == 0 and info.sha256 == sha256_bytes(b"")
    assert store.get_bytes("empty", sha256=info.sha256) == b""


def test_get_bytes_round_trip_with_and_without_hash(store):
    data = random_bytes(4096)
    info = store.put_bytes("models/m1", data)
    assert store.get_bytes("models/m1") == data
    assert store.get_bytes("models/m1", sha256=info.sha256) == data


def test_download_round_trip(store, workdir):
    data = random_bytes(50_000)
    info = store.put_bytes("models/m2", data)
    dest = workdir / "m2.bin"
    got = store.download("models/m2", dest, sha256=info.sha256)
    assert dest.read_bytes() == data
    assert (got.sha256, got.size) == (info.sha256, len(data))
    assert os.listdir(workdir) == ["m2.bin"], "download left temporary files behind"


def test_wrong_hash_on_get_bytes_raises_integrity_error(store):
    store.put_bytes("models/m3", b"the real content")
    with pytest.raises(IntegrityError):
        store.get_bytes("models/m3", sha256=WRONG)


def test_wrong_hash_on_download_raises_and_leaves_no_file(store, workdir):
    store.put_bytes("models/m4", random_bytes(10_000))
    dest = workdir / "m4.bin"
    with pytest.raises(IntegrityError):
        store.download("models/m4", dest, sha256=WRONG)
    assert not dest.exists()
    assert os.listdir(workdir) == [], "a partial or temporary file was left behind"


def test_integrity_error_is_a_store_error(store):
    store.put_bytes("k", b"v")
    with pytest.raises(StoreError):
        store.get_bytes("k", sha256=WRONG)


def test_missing_key_raises_object_not_found(store, workdir):
    assert not store.exists("rounds/none/aggregate")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("rounds/none/aggregate")
    with pytest.raises(ObjectNotFound):
        store.describe("rounds/none/aggregate")
    with pytest.raises(ObjectNotFound):
        store.download("rounds/none/aggregate", workdir / "aggregate.bin")
    assert os.listdir(workdir) == [], "a failed download left a file behind"


def test_list_by_prefix_is_sorted_string_prefix(store):
    keys = ["rounds/r2/updates/h1", "rounds/r10/round", "models/base", "rounds/r1/updates/h2",
            "rounds/r1/updates/h1", "rounds/r1/round"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(keys)
    assert store.list("rounds/") == sorted(k for k in keys if k.startswith("rounds/"))
    assert store.list("rounds/r1/") == ["rounds/r1/round", "rounds/r1/updates/h1",
                                         "rounds/r1/updates/h2"]
    # a prefix is a string prefix, not a directory: r1 also matches r10
    assert store.list("rounds/r1") == ["rounds/r1/round", "rounds/r1/updates/h1",
                                        "rounds/r1/updates/h2", "rounds/r10/round"]
    assert store.list("rounds/r1/updates/h") == ["rounds/r1/updates/h1", "rounds/r1/updates/h2"]
    assert store.list("nothing/") == []


def test_delete_removes_one_object_and_is_idempotent(store):
    for key in ("rounds/r1/updates/h1", "rounds/r1/updates/h1.msg", "rounds/r1/aggregate"):
        store.put_bytes(key, key.encode())
    store.delete("rounds/r1/updates/h1")
    store.delete("rounds/r1/updates/h1")  # gone already: not an error, as on S3
    store.delete("rounds/r1/updates/never-there")
    assert store.list("rounds/r1/") == ["rounds/r1/aggregate", "rounds/r1/updates/h1.msg"]
    assert not store.exists("rounds/r1/updates/h1")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("rounds/r1/updates/h1")


def test_describe_reports_size_sha256_and_encryption(store):
    data = random_bytes(2048)
    info = store.put_bytes("rounds/r1/aggregate", data)
    meta = store.describe("rounds/r1/aggregate")
    assert meta["size"] == len(data)
    assert meta["sha256"] == info.sha256
    assert meta["sse"] == ("aws:kms" if store.kind == "s3" else "none")


def assert_encrypted_at_rest(store, key: str, write_path: str) -> None:
    """On S3 every write path must ask for SSE-KMS with the configured key."""
    meta = store.describe(key)
    if store.kind == "local":
        assert meta["sse"] == "none"
        return
    assert meta["sse"] == "aws:kms", f"{write_path} wrote {key} without SSE-KMS (sse={meta['sse']!r})"
    assert meta["kms_key_id"] and meta["kms_key_id"].endswith(store._kms_key_id), \
        f"{write_path} wrote {key} under KMS key {meta['kms_key_id']!r}, not the configured one"


@pytest.mark.parametrize("write_path", ["put_bytes", "put_bytes if_none_match", "put_bytes if_match", "put_file"])
def test_every_write_path_encrypts_with_the_kms_key(store, workdir, write_path):
    data = random_bytes(10_000, seed=5)
    if write_path == "put_bytes":
        store.put_bytes("rounds/r1/updates/h3", data)
    elif write_path == "put_bytes if_none_match":
        store.put_bytes("rounds/r1/updates/h3", data, if_none_match=True)
    elif write_path == "put_bytes if_match":
        etag = store.put_bytes("rounds/r1/updates/h3", b"first").etag
        store.put_bytes("rounds/r1/updates/h3", data, if_match=etag)
    else:
        source = workdir / "small.bin"
        source.write_bytes(data)
        store.put_file("rounds/r1/updates/h3", source)
    assert_encrypted_at_rest(store, "rounds/r1/updates/h3", write_path)


def test_large_file_round_trips(store, workdir):
    """Above the multipart threshold on S3: the whole-object sha256 must still hold, and the
    multipart upload must be SSE-KMS encrypted like a single put."""
    source = workdir / "big.bin"
    source.write_bytes(random_bytes(BIG, seed=11))
    expected = sha256_file(source)
    info = store.put_file("rounds/r1/updates/big", source)
    assert (info.sha256, info.size) == (expected, BIG)
    assert store.describe("rounds/r1/updates/big")["sha256"] == expected
    assert_encrypted_at_rest(store, "rounds/r1/updates/big", "put_file (multipart upload)")

    dest = workdir / "big.out"
    got = store.download("rounds/r1/updates/big", dest, sha256=expected)
    assert (got.sha256, got.size) == (expected, BIG)
    assert sha256_file(dest) == expected


def test_overwrite_replaces_content_and_hash(store):
    first = store.put_bytes("rounds/r1/round", b"version one")
    second = store.put_bytes("rounds/r1/round", b"version two, longer")
    assert first.sha256 != second.sha256
    assert store.get_bytes("rounds/r1/round", sha256=second.sha256) == b"version two, longer"
    meta = store.describe("rounds/r1/round")
    assert (meta["sha256"], meta["size"]) == (second.sha256, len(b"version two, longer"))
    assert store.list("rounds/r1/") == ["rounds/r1/round"]
    with pytest.raises(IntegrityError):
        store.get_bytes("rounds/r1/round", sha256=first.sha256)


# -- the local store's own guarantees (S3 has no filesystem to escape) --------------------------

@pytest.fixture
def local(tmp_path):
    from cxr_mq.storage.local import LocalStore

    return LocalStore(tmp_path / "store")


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/etc/passwd", "a//b", "./a",
                                 "", "a/..", "x.cxr-meta.json"])
def test_local_store_rejects_keys_escaping_root_or_reserved(local, key):
    with pytest.raises(StoreError):
        local.put_bytes(key, b"x")
    assert not (local.root.parent / "outside").exists()


def test_local_store_rejects_symlink_escape(local, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (local.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError):
        local.put_bytes("link/x", b"x")
    assert list(outside.iterdir()) == []


def test_local_store_list_hides_sidecars_and_temp_files(local):
    local.put_bytes("a/b", b"1")
    (local.root / "a" / ".cxr-tmp-leftover").write_bytes(b"crash debris")
    assert local.list() == ["a/b"]
    assert sorted(p.name for p in (local.root / "a").iterdir()) == [
        ".cxr-tmp-leftover", "b", "b.cxr-meta.json"]


def test_local_store_describe_notices_a_stale_sidecar(local):
    """If a crash or another writer left the sidecar out of step, describe rehashes."""
    local.put_bytes("k", b"old")
    (local.root / "k").write_bytes(b"new content")
    assert local.describe("k")["sha256"] == sha256_bytes(b"new content")
    assert local.get_bytes("k", sha256=sha256_bytes(b"new content")) == b"new content"


# -- conditional writes (S3's If-None-Match: * and If-Match) ------------------------------------
def test_if_none_match_creates_once_and_refuses_a_second_writer(store):
    from cxr_mq.storage.base import PreconditionFailed

    first = store.put_bytes("rounds/000001/round", b"controller A", if_none_match=True)
    assert first.etag
    with pytest.raises(PreconditionFailed, match="rounds/000001/round"):
        store.put_bytes("rounds/000001/round", b"controller B", if_none_match=True)
    assert store.get_bytes("rounds/000001/round") == b"controller A"
    # the same content again is a retried write that had landed, not a lost race
    assert store.put_bytes("rounds/000001/round", b"controller A", if_none_match=True).sha256 == first.sha256


def test_if_match_replaces_only_the_version_that_was_read(store):
    from cxr_mq.storage.base import PreconditionFailed

    store.put_bytes("rounds/000001/state", b"v1")
    data, etag = store.get_versioned("rounds/000001/state")
    assert data == b"v1"
    second = store.put_bytes("rounds/000001/state", b"v2", if_match=etag)
    assert store.get_versioned("rounds/000001/state") == (b"v2", second.etag)
    with pytest.raises(PreconditionFailed):  # a writer still holding v1's etag lost
        store.put_bytes("rounds/000001/state", b"v2 from a stale writer", if_match=etag)
    assert store.get_bytes("rounds/000001/state") == b"v2"
    with pytest.raises(PreconditionFailed):
        store.put_bytes("rounds/000001/missing", b"x", if_match=etag)
    assert not store.exists("rounds/000001/missing")


def test_concurrent_if_none_match_writers_exactly_one_wins(store):
    from concurrent.futures import ThreadPoolExecutor

    from cxr_mq.storage.base import PreconditionFailed

    def attempt(writer: int) -> bool:
        try:
            store.put_bytes("rounds/000007/round", f"writer {writer}".encode(), if_none_match=True)
            return True
        except PreconditionFailed:
            return False
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(attempt, range(8)))
    assert won.count(True) == 1
    assert store.get_bytes("rounds/000007/round") == f"writer {won.index(True)}".encode()
