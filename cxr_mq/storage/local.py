"""A local-directory object store with the same contract as S3 (for the demo and tests).

Each object is a file under ``root`` (``/`` in a key makes subdirectories) with a sidecar
``<file>.cxr-meta.json`` holding the sha256 computed on put. Writes go to a temporary file in
the same directory and are renamed into place, so a reader sees the old object or the new
one, never half of one. The sidecar records the size and mtime of the file it describes; if
a crash or a concurrent writer leaves it out of step, :meth:`describe` rehashes the file
instead of trusting it. Reads always hash what they return, so an expected hash is checked
against the bytes themselves, not against the sidecar.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .base import (HASH_CHUNK, ObjectInfo, ObjectNotFound, ObjectStore, PreconditionFailed,
                   StoreError, check_hash, sha256_file)

META_SUFFIX = ".cxr-meta.json"
TEMP_PREFIX = ".cxr-tmp-"
LOCK_NAME = TEMP_PREFIX + "lock"  # listed never (temp prefix), held only across check + rename


class LocalStore(ObjectStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- writing ----------------------------------------------------------------------------

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        target = self._path(key)
        digest = hashlib.sha256()

        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as src:
                for block in iter(lambda: src.read(HASH_CHUNK), b""):
                    digest.update(block)
                    out.write(block)

        return self._commit(key, target, copy, digest)

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False,
                  if_match: str | None = None) -> ObjectInfo:
        target = self._path(key)
        condition = None
        if if_none_match or if_match is not None:
            condition = (if_none_match, if_match, hashlib.sha256(data).hexdigest())
        return self._commit(key, target, lambda out: out.write(data), hashlib.sha256(data),
                            condition)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self):
        with open(self.root / LOCK_NAME, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_condition(self, key: str, target: Path, condition) -> None:
        """Raise PreconditionFailed unless the write may go ahead (called under the lock)."""
        if_none_match, if_match, new_sha256 = condition
        current = sha256_file(target) if target.is_file() else None
        if current is not None and current == new_sha256:
            return  # the same content again: as a retried S3 request that had landed
        if if_none_match and current is not None:
            raise PreconditionFailed(f"{key}: exists already (if_none_match)")
        if if_match is not None and current != if_match:
            raise PreconditionFailed(f"{key}: changed since read (if_match {if_match[:12]}…)")

    def _commit(self, key: str, target: Path, write: Callable[[BinaryIO], object],
                digest, condition=None) -> ObjectInfo:
        """Write through ``write`` into a temp file (``digest`` fed along the way), then rename."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StoreError(f"{key}: a parent of this key is already an object") from exc
        if target.is_dir():
            raise StoreError(f"{key}: this key is already a prefix of other objects")
        tmp = _temp_path(target.parent)
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            stat = tmp.stat()
            info = ObjectInfo(key=key, sha256=digest.hexdigest(), size=stat.st_size,
                              etag=digest.hexdigest())
            meta = {"sha256": info.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            meta_tmp = _temp_path(target.parent)
            try:
                meta_tmp.write_text(json.dumps(meta))
                with self._locked():  # every rename, so no write slips between check and rename
                    if condition:
                        self._check_condition(key, target, condition)
                    # Data first: a crash in between leaves a stale sidecar, which describe()
                    # detects by size/mtime, rather than a sidecar describing absent content.
                    os.replace(tmp, target)
                    os.replace(meta_tmp, _meta_path(target))
            finally:
                meta_tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"{key}: could not write to {self.root}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return info

    # -- reading ----------------------------------------------------------------------------

    def download(self, key: str, path: str | Path, sha256: str | None = None) -> ObjectInfo:
        source = self._existing(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(dest.parent)
        try:
            digest, size = hashlib.sha256(), 0
            with open(source, "rb") as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(HASH_CHUNK), b""):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
            check_hash(key, digest.hexdigest(), sha256)
            os.replace(tmp, dest)
        except FileNotFoundError as exc:  # removed between the check and the read
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StoreError(f"{key}: could not download to {dest}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(key=key, sha256=digest.hexdigest(), size=size)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        try:
            data = self._existing(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        check_hash(key, hashlib.sha256(data).hexdigest(), sha256)
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the directory the prefix pins down; the match itself is a plain string
        # prefix, as on S3 (``rounds/1`` matches ``rounds/10/...``).
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        if not start.is_dir() or not _within(self.root, start.resolve()):
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if name.endswith(META_SUFFIX) or name.startswith(TEMP_PREFIX):
                    continue
                key = (rel / name).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        target = self._path(key)
        try:
            target.unlink(missing_ok=True)
            _meta_path(target).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"{key}: could not delete from {self.root}: {exc}") from exc

    def describe(self, key: str) -> dict:
        target = self._existing(key)
        try:
            stat = target.stat()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        sha256 = self._recorded_sha256(target, stat) or sha256_file(target)
        return {"key": key, "size": stat.st_size, "sha256": sha256, "sse": "none",
                "last_modified": stat.st_mtime}

    def _recorded_sha256(self, target: Path, stat: os.stat_result) -> str | None:
        try:
            meta = json.loads(_meta_path(target).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("size") != stat.st_size or meta.get("mtime_ns") != stat.st_mtime_ns:
            return None
        return meta.get("sha256")

    # -- keys -------------------------------------------------------------------------------

    def _existing(self, key: str) -> Path:
        target = self._path(key)
        if not target.is_file():
            raise ObjectNotFound(key)
        return target

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not key:
            raise StoreError(f"invalid key {key!r}: empty")
        if "\x00" in key or key.startswith("/"):
            raise StoreError(f"invalid key {key!r}: must be a relative path without NUL")
        parts = key.split("/")
        for part in parts:
            if part in ("", ".", ".."):
                raise StoreError(f"invalid key {key!r}: empty, '.' or '..' segment")
            if part.startswith(TEMP_PREFIX) or part.endswith(META_SUFFIX):
                raise StoreError(f"invalid key {key!r}: reserved name")
        target = self.root.joinpath(*parts)
        if not _within(self.root, target.resolve()):  # e.g. through a symlink
            raise StoreError(f"invalid key {key!r}: escapes the store root")
        return target


def _meta_path(target: Path) -> Path:
    return target.with_name(target.name + META_SUFFIX)


def _temp_path(directory: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    os.close(fd)
    return Path(name)


def _within(root: Path, path: Path) -> bool:
    return path == root or root in path.parents

