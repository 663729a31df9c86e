"""The object-store interface every store implements (S3 via boto3, and a local directory).

Every object is addressed by its key and carries the sha256 of its content: the store
computes it on put and returns it, a message carries it, and every get with an expected
hash verifies it before the caller sees a byte. On S3 every put is SSE-KMS encrypted.
"""
from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

HASH_CHUNK = 1 << 20


class StoreError(Exception):
    """An object could not be stored or read (after retries); the message names the key.

    ``transient`` says whether trying the same operation later may succeed (S3 sets it per
    fault); workers requeue a transient failure and give up the one operation otherwise."""

    transient: bool = False


class ObjectNotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists (``if_none_match``) or changed since it was
    read (``if_match``). Another writer got there first; re-read and decide again."""


class IntegrityError(StoreError):
    """The object's content does not hash to what its message says."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    sha256: str
    size: int
    etag: str | None = field(default=None, compare=False)  # the version a conditional write can name (``if_match``)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_hash(key: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise IntegrityError(f"{key}: sha256 {actual} does not match the expected {expected}")


class ObjectStore(abc.ABC):
    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        """Upload a file (multipart when large). Returns its key, sha256 and size."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> ObjectInfo:
        """Write ``data``. With ``if_none_match`` only if ``key`` does not exist yet; with
        ``if_match`` only if its current etag is that one (S3's ``If-None-Match: *`` and
        ``If-Match``). A lost race raises :class:`PreconditionFailed`; the returned info
        carries the new etag. A retried write whose first attempt did land is not a lost
        race: if the object now holds exactly ``data``, the write succeeded."""

    @abc.abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's content and its etag (for a later ``if_match``)."""

    @abc.abstractmethod
    def download(self, key: str, path: str | Path, sha256: str | None = None) -> ObjectInfo:
        """Download to ``path``; with ``sha256``, raise IntegrityError (and remove the file) on
        mismatch. Raises ObjectNotFound for a missing key."""

    @abc.abstractmethod
    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing one that is not there is not an error (as on S3)."""

    @abc.abstractmethod
    def describe(self, key: str) -> dict:
        """Metadata: at least ``size``, ``sha256`` and ``sse`` (``aws:kms`` on S3, ``none`` locally)."""
