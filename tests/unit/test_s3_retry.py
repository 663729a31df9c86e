"""S3Store against moto's server with faults injected by the ``CXR_MQ_FAULTS`` botocore hook:
transient faults (5xx, throttling, connection resets) are retried until the operation
succeeds; a permanent fault fails that one operation at once with a clear error, and the
store keeps working."""
from __future__ import annotations

import time

import pytest

from cxr_mq.storage.base import ObjectNotFound, StoreError, sha256_bytes
from cxr_mq.storage.s3 import FAULTS_ENV, S3Store, parse_faults

DATA = b"ciphertext-ish bytes " * 1000


def _store(s3_settings, monkeypatch, faults: str | None, **kwargs) -> S3Store:
    if faults:
        monkeypatch.setenv(FAULTS_ENV, faults)
    else:
        monkeypatch.delenv(FAULTS_ENV, raising=False)
    return S3Store(s3_settings["bucket"], s3_settings["kms_key_id"],
                   endpoint_url=s3_settings["endpoint_url"], region=s3_settings["region"], **kwargs)


@pytest.mark.parametrize("fault", ["503", "slowdown", "500", "reset"])
def test_transient_faults_on_put_and_get_are_retried(s3_settings, monkeypatch, fault):
    # three faults each: botocore's own retries absorb them
    store = _store(s3_settings, monkeypatch, f"s3:PutObject:{fault}:3;s3:GetObject:{fault}:3")
    info = store.put_bytes("rounds/000001/updates/h1", DATA)
    assert store.get_bytes(info.key, sha256=info.sha256) == DATA
    assert store.faults.injected == 6
    assert sum(store.retries.values()) >= 6
    assert store.describe(info.key)["sse"] == "aws:kms"


def test_faults_beyond_botocores_retries_are_retried_by_the_operation(s3_settings, monkeypatch,
                                                                      tmp_path):
    # seven faults: more than botocore's five attempts, so the whole operation is redone
    store = _store(s3_settings, monkeypatch, "s3:*:reset:4;s3:*:503:3", max_backoff=0.5)
    source = tmp_path / "update.bin"
    source.write_bytes(DATA)
    info = store.put_file("rounds/000001/updates/h2", source)
    assert store.faults.injected == 7
    target = tmp_path / "copy.bin"
    assert store.download(info.key, target, sha256=sha256_bytes(DATA)).sha256 == info.sha256
    assert target.read_bytes() == DATA


def test_a_permanent_fault_fails_one_operation_fast_and_the_store_goes_on(s3_settings, monkeypatch):
    store = _store(s3_settings, monkeypatch, "s3:*:403:1:updates/h3")
    store.put_bytes("rounds/000001/updates/h1", DATA)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.put_bytes("rounds/000001/updates/h3", DATA)
    assert time.monotonic() - started < 3.0, "a permanent fault must not be retried"
    assert caught.value.transient is False
    assert "rounds/000001/updates/h3" in str(caught.value)
    assert "AccessDenied" in str(caught.value)
    assert store.faults.injected == 1
    # the fault is spent: the same operation now works, and so does everything else
    store.put_bytes("rounds/000001/updates/h3", DATA)
    assert store.list("rounds/000001/updates/") == ["rounds/000001/updates/h1",
                                                    "rounds/000001/updates/h3"]


@pytest.mark.parametrize("name", ["tmp503xk", "u500", "bucket-504"])
def test_a_permanent_fault_uploading_a_file_whose_path_holds_a_5xx_is_not_retried(
        s3_settings, monkeypatch, tmp_path, name):
    # put_file's error (boto3's S3UploadFailedError) names the file, bucket and key: a path
    # such as /tmp/tmp503xk once made AccessDenied look like a 503 (a hospital retried the
    # round it had to give up, and its update was accepted in a CI run)
    store = _store(s3_settings, monkeypatch, "s3:PutObject:403:1:updates/h3")
    source = tmp_path / name / "update-503.bin"
    source.parent.mkdir()
    source.write_bytes(DATA)
    with pytest.raises(StoreError) as caught:
        store.put_file("rounds/000503/updates/h3", source)
    assert caught.value.transient is False
    assert "AccessDenied" in str(caught.value) and "rounds/000503/updates/h3" in str(caught.value)
    assert store.faults.injected == 1
    with pytest.raises(ObjectNotFound):
        store.get_bytes("rounds/000503/updates/h3")
    # and a transient fault on the same upload path is still retried to success
    store2 = _store(s3_settings, monkeypatch, "s3:PutObject:503:6:updates/h3", max_backoff=0.3)
    info = store2.put_file("rounds/000503/updates/h3", source)
    assert store2.faults.injected == 6 and store2.get_bytes(info.key) == DATA


def test_a_fault_that_never_clears_fails_with_a_transient_error(s3_settings, monkeypatch):
    store = _store(s3_settings, monkeypatch, "s3:GetObject:503:*", attempts=2, max_backoff=0.2)
    store.client.meta.events.unregister("before-send.s3", store.faults)
    info = store.put_bytes("rounds/000001/updates/h1", DATA)
    store.client.meta.events.register("before-send.s3", store.faults)
    with pytest.raises(StoreError) as caught:
        store.get_bytes(info.key)
    assert caught.value.transient is True
    assert "after retries" in str(caught.value) and info.key in str(caught.value)
    assert store.faults.injected == 10  # 2 operation attempts x 5 botocore attempts (1 + 4 retries)


def test_missing_objects_are_not_retried(s3_settings, monkeypatch):
    store = _store(s3_settings, monkeypatch, None)
    started = time.monotonic()
    with pytest.raises(ObjectNotFound):
        store.get_bytes("rounds/000009/updates/nobody")
    assert time.monotonic() - started < 3.0


def test_fault_spec_parsing():
    rules = parse_faults("s3:GetObject:503:3; s3:*:403:*:updates/h2 ;other:thing")
    assert [(r.operation, r.fault, r.remaining, r.key_contains) for r in rules] == [
        ("GetObject", "503", 3, ""), ("*", "403", -1, "updates/h2")]
    with pytest.raises(StoreError, match="CXR_MQ_FAULTS"):
        parse_faults("s3:GetObject:teapot:1")
