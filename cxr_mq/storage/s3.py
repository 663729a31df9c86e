"""S3 object store over boto3: SSE-KMS on every put, managed (multipart) transfers, sha256
metadata on every object and checked on every read, retries on transient faults.

Two layers of retry: botocore's own (``standard`` mode, per request) and tenacity around each
whole operation, so that a multipart transfer that fails part-way is redone from the start
rather than surfacing a transient 5xx to the worker.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions as bex
from boto3.s3.transfer import S3UploadFailedError, TransferConfig
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from ..log import get_logger
from .base import (ObjectInfo, ObjectNotFound, ObjectStore, StoreError, check_hash, sha256_bytes,
                   sha256_file)

TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                   "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
MULTIPART_THRESHOLD = 8 * 1024 * 1024


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, bex.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError,
                        bex.ReadTimeoutError, bex.ConnectTimeoutError, ConnectionError)):
        return True
    if isinstance(exc, S3UploadFailedError):
        return any(code in str(exc) for code in TRANSIENT_CODES) or "reset" in str(exc).lower()
    if isinstance(exc, bex.ResponseStreamingError):
        return True
    return _error_code(exc) in TRANSIENT_CODES


class S3Store(ObjectStore):
    def __init__(self, bucket: str, kms_key_id: str, endpoint_url: str | None = None,
                 region: str | None = None, attempts: int = 5, max_backoff: float = 8.0,
                 multipart_threshold: int = MULTIPART_THRESHOLD):
        if not kms_key_id:
            raise StoreError("S3 store needs a KMS key id: every object is written with SSE-KMS")
        self.bucket = bucket
        self._kms_key_id = kms_key_id
        config = botocore.config.Config(retries={"max_attempts": 4, "mode": "standard"},
                                        connect_timeout=5, read_timeout=60,
                                        max_pool_connections=16)
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=multipart_threshold, max_concurrency=4)
        self._attempts = attempts
        self._max_backoff = max_backoff
        self._log = get_logger(component="s3", bucket=bucket)

    def _call(self, what: str, key: str, operation):
        retrying = Retrying(retry=retry_if_exception(is_transient), reraise=True,
                            stop=stop_after_attempt(self._attempts),
                            wait=wait_exponential_jitter(initial=0.2, max=self._max_backoff),
                            before_sleep=lambda rs: self._log.warning(
                                "s3_retry", op=what, key=key, attempt=rs.attempt_number,
                                error=repr(rs.outcome.exception())))
        try:
            return retrying(operation)
        except (bex.BotoCoreError, bex.ClientError, S3UploadFailedError, OSError) as exc:
            if _error_code(exc) in NOT_FOUND_CODES:
                raise ObjectNotFound(f"s3://{self.bucket}/{key}: no such object") from None
            raise StoreError(f"s3 {what} s3://{self.bucket}/{key} failed: {exc}") from exc

    def _sse(self, sha256: str) -> dict:
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self._kms_key_id,
                "Metadata": {"sha256": sha256}}

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        digest, size = sha256_file(path), os.path.getsize(path)
        self._call("put", key, lambda: self.client.upload_file(
            str(path), self.bucket, key, ExtraArgs=self._sse(digest), Config=self._transfer))
        return ObjectInfo(key, digest, size)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        digest = sha256_bytes(data)
        self._call("put", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, **self._sse(digest)))
        return ObjectInfo(key, digest, len(data))

    def download(self, key: str, path: str | Path, sha256: str | None = None) -> ObjectInfo:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._call("get", key, lambda: self.client.download_file(
                self.bucket, key, tmp, Config=self._transfer))
            digest = sha256_file(tmp)
            check_hash(f"s3://{self.bucket}/{key}", digest, sha256)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return ObjectInfo(key, digest, path.stat().st_size)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        data = self._call("get", key, lambda: self.client.get_object(
            Bucket=self.bucket, Key=key)["Body"].read())
        check_hash(f"s3://{self.bucket}/{key}", sha256_bytes(data), sha256)
        return data

    def exists(self, key: str) -> bool:
        try:
            self.describe(key)
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        def collect():
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            return keys
        return sorted(self._call("list", prefix, collect))

    def describe(self, key: str) -> dict:
        head = self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        return {"size": head["ContentLength"], "sha256": head.get("Metadata", {}).get("sha256"),
                "sse": head.get("ServerSideEncryption", "none"),
                "kms_key_id": head.get("SSEKMSKeyId")}
