"""S3 object store over boto3: SSE-KMS on every put, managed (multipart) transfers, sha256
metadata on every object and checked on every read, retries on transient faults.

Two layers of retry: botocore's own (``standard`` mode, per request) and tenacity around each
whole operation, so that a multipart transfer that fails part-way is redone from the start
rather than surfacing a transient 5xx to the worker. A fault that is not transient (access
denied, a missing bucket, a bad request) is not retried: the one operation fails at once with a
:class:`StoreError` whose ``transient`` attribute is ``False``, and the caller decides (the
aggregator refuses that update, a hospital gives up that round); the worker goes on.

Test hook: ``CXR_MQ_FAULTS`` (read when a store is built; never set in production) injects S3
faults through a botocore ``before-send`` handler, so the fault-injection tests exercise the
real retry path of a worker process. See :func:`parse_faults` for the syntax.

Audit hook: ``CXR_MQ_S3_AUDIT=<file>`` appends one JSON line per S3 API call the process makes
(``{"op": "PutObject", "bucket": ..., "key": ...}``, ``prefix`` for listings), as botocore is
about to send it. The deployment's IAM policies are checked against what each role really does
with it (``tests/integration/iam.py``); it is off unless set.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions as bex
from boto3.s3.transfer import S3UploadFailedError, TransferConfig
from botocore.awsrequest import AWSResponse
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from ..log import get_logger
from .base import (ObjectInfo, ObjectNotFound, ObjectStore, PreconditionFailed, StoreError,
                   check_hash, sha256_bytes, sha256_file)

TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                   "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# 412: the condition does not hold; 409: a concurrent conditional write is in flight (AWS
# asks the caller to retry, i.e. to re-read and decide again, which is what a loser does)
PRECONDITION_CODES = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
MULTIPART_THRESHOLD = 8 * 1024 * 1024
FAULTS_ENV = "CXR_MQ_FAULTS"
AUDIT_ENV = "CXR_MQ_S3_AUDIT"


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, bex.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


_ERROR_CODE_IN_MESSAGE = re.compile(r"An error occurred \(([^)]*)\)")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError,
                        bex.ReadTimeoutError, bex.ConnectTimeoutError, ConnectionError)):
        return True
    if isinstance(exc, S3UploadFailedError):
        # boto3 raises it inside ``except ClientError``: the client error it replaces is its
        # context, and that error's code decides. Never search the whole message for a code:
        # it holds the file's path, the bucket and the key (a temporary file named
        # ``/tmp/tmpx503ab`` made a permanent AccessDenied look like a 503, so a hospital
        # retried a round it had to give up).
        inner = exc.__cause__ or exc.__context__
        if inner is not None and inner is not exc:
            return is_transient(inner)
        found = _ERROR_CODE_IN_MESSAGE.search(str(exc))
        return bool(found) and found.group(1) in TRANSIENT_CODES
    if isinstance(exc, bex.ResponseStreamingError):
        return True
    return _error_code(exc) in TRANSIENT_CODES


# -- fault injection (test hook) ------------------------------------------------------------
_FAULT_RESPONSES = {  # fault name -> (HTTP status, S3 error code)
    "500": (500, "InternalError"), "503": (503, "ServiceUnavailable"),
    "slowdown": (503, "SlowDown"), "throttle": (503, "SlowDown"),
    "403": (403, "AccessDenied"),
}


@dataclass
class FaultRule:
    operation: str  # botocore operation name (GetObject, PutObject, HeadObject, ...) or "*"
    fault: str  # 500, 503, slowdown/throttle, 403 (permanent), reset (connection reset)
    remaining: int  # how many requests to fault; -1 for every one
    key_contains: str = ""

    def matches(self, operation: str, url: str) -> bool:
        return (self.remaining != 0 and self.operation in ("*", operation)
                and self.key_contains in url)


def parse_faults(spec: str) -> list[FaultRule]:
    """``s3:<operation|*>:<fault>:<count|*>[:<key substring>]``, rules separated by ``;``.

    E.g. ``s3:GetObject:503:3`` (the next three GetObject requests get a 503),
    ``s3:*:reset:2`` (two connection resets), ``s3:*:403:1:updates/h2`` (one AccessDenied on
    any request whose URL contains ``updates/h2``). Rules not starting with ``s3:`` are ignored.
    """
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        fields = part.split(":", 4)
        if fields[0] != "s3":
            continue
        if len(fields) < 4 or (fields[2] not in _FAULT_RESPONSES and fields[2] != "reset"):
            raise StoreError(f"{FAULTS_ENV}: cannot parse {part!r} "
                             "(want s3:<operation|*>:<500|503|slowdown|403|reset>:<count|*>[:<key>])")
        count = -1 if fields[3] in ("*", "-1") else int(fields[3])
        rules.append(FaultRule(fields[1], fields[2], count, fields[4] if len(fields) > 4 else ""))
    return rules


class _RawBody:
    def __init__(self, data: bytes):
        self._data = data

    def stream(self, **_):
        yield self._data


class FaultInjector:
    """A botocore ``before-send`` handler answering matching requests with a fault."""

    def __init__(self, rules: list[FaultRule], log):
        self.rules, self._log, self._lock = rules, log, threading.Lock()
        self.injected = 0

    def __call__(self, request, event_name: str, **_):
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            rule = next((r for r in self.rules if r.matches(operation, request.url)), None)
            if rule is None:
                return None
            if rule.remaining > 0:
                rule.remaining -= 1
            self.injected += 1
        self._log.warning("s3_fault_injected", op=operation, fault=rule.fault, url=request.url)
        if rule.fault == "reset":
            raise bex.ConnectionClosedError(endpoint_url=request.url)
        status, code = _FAULT_RESPONSES[rule.fault]
        body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                f"<Message>injected by {FAULTS_ENV}</Message></Error>").encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"},
                           _RawBody(b"" if request.method == "HEAD" else body))


class _AuditLog:
    """A botocore ``before-parameter-build`` handler writing each call's operation and object to a file
    (one ``O_APPEND`` write per line, so processes may share the file)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, model=None, params=None, **_):
        params = params or {}
        entry = {"op": getattr(model, "name", "unknown"), "bucket": params.get("Bucket")}
        if "Key" in params:
            entry["key"] = params["Key"]
        if "Prefix" in params:
            entry["prefix"] = params["Prefix"]
        if "ServerSideEncryption" in params:  # what a bucket policy's SSE conditions see
            entry["sse"] = params["ServerSideEncryption"]
        if "SSEKMSKeyId" in params:
            entry["sse_kms_key_id"] = params["SSEKMSKeyId"]
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


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
        self.retries: dict[str, int] = {}  # transient faults seen, by operation (for metrics)
        self._retries_lock = threading.Lock()
        self.client.meta.events.register("needs-retry.s3", self._count_fault)
        self.faults = None
        if os.environ.get(FAULTS_ENV):
            rules = parse_faults(os.environ[FAULTS_ENV])
            if rules:
                self.faults = FaultInjector(rules, self._log)
                self.client.meta.events.register("before-send.s3", self.faults)
                self._log.warning("s3_fault_injection_enabled", rules=os.environ[FAULTS_ENV])
        if os.environ.get(AUDIT_ENV):
            self.client.meta.events.register("before-parameter-build.s3", _AuditLog(os.environ[AUDIT_ENV]))

    def _count(self, operation: str) -> None:
        with self._retries_lock:
            self.retries[operation] = self.retries.get(operation, 0) + 1

    def _count_fault(self, response=None, caught_exception=None, operation=None, **_):
        """Count the transient faults botocore sees (it retries them itself)."""
        name = getattr(operation, "name", "unknown")
        if caught_exception is not None:
            if is_transient(caught_exception):
                self._count(name)
        elif response is not None:
            status = response[0].status_code if response[0] is not None else 0
            code = str((response[1] or {}).get("Error", {}).get("Code", ""))
            if status >= 500 or code in TRANSIENT_CODES:
                self._count(name)
        return None

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
            if _error_code(exc) in PRECONDITION_CODES:
                raise PreconditionFailed(f"s3://{self.bucket}/{key}: conditional write lost "
                                         f"({_error_code(exc)})") from None
            transient = is_transient(exc)
            error = StoreError(f"s3 {what} s3://{self.bucket}/{key} failed"
                               f"{' after retries' if transient else ' (not retryable)'}: {exc}")
            error.transient = transient
            self._log.error("s3_operation_failed", op=what, key=key, transient=transient,
                            error=str(exc))
            raise error from exc

    def _sse(self, sha256: str) -> dict:
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self._kms_key_id,
                "Metadata": {"sha256": sha256}}

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        digest, size = sha256_file(path), os.path.getsize(path)
        self._call("put", key, lambda: self.client.upload_file(
            str(path), self.bucket, key, ExtraArgs=self._sse(digest), Config=self._transfer))
        return ObjectInfo(key, digest, size)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> ObjectInfo:
        digest = sha256_bytes(data)
        condition = {"IfNoneMatch": "*"} if if_none_match else {}
        if if_match is not None:
            condition["IfMatch"] = if_match
        try:
            response = self._call("put", key, lambda: self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, **condition, **self._sse(digest)))
        except ObjectNotFound:  # If-Match on a key that is gone: S3 answers 404
            raise PreconditionFailed(f"s3://{self.bucket}/{key}: conditional write lost "
                                     "(object gone since read)") from None
        except PreconditionFailed:
            # a retried request whose first attempt landed (its response was lost) meets its
            # own write: the object holds exactly this content, so the write succeeded
            try:
                current, etag = self.get_versioned(key)
            except ObjectNotFound:
                raise PreconditionFailed(f"s3://{self.bucket}/{key}: conditional write lost "
                                         "(object changed since read)") from None
            if sha256_bytes(current) != digest:
                raise
            return ObjectInfo(key, digest, len(data), etag)
        return ObjectInfo(key, digest, len(data), response.get("ETag"))

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        def fetch():
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), response["ETag"]
        return self._call("get", key, fetch)

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

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def describe(self, key: str) -> dict:
        head = self._call("head", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        return {"size": head["ContentLength"], "sha256": head.get("Metadata", {}).get("sha256"),
                "sse": head.get("ServerSideEncryption", "none"),
                "kms_key_id": head.get("SSEKMSKeyId")}
