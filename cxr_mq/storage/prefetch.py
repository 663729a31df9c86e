"""Fetch and hash-check objects ahead of their use, a few at a time, into local files.

The aggregator sums one update at a time; while it adds one, the next ones (whose
``update_ready`` messages the broker has already delivered) are downloaded and checked
against the sha256 their messages name. Only a copy whose hash matched is ever handed out,
and only for the same key and sha256; anything else (a failed check, a missing object, a
store error, a copy never asked for) is thrown away and the caller fetches the object itself,
so what is accepted, refused or retried, and why, stays exactly what it was without it.

Bounds: at most ``slots`` downloads run at once and at most ``slots + 1`` copies are kept
(the one about to be summed and ``slots`` behind it; the oldest beyond that is discarded):
disk holds at most ``slots + 1`` update-sized files besides the one being summed, memory what
``slots`` concurrent downloads buffer (the store streams to disk; see ``S3Store``'s transfer
settings).
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..log import get_logger
from .base import ObjectStore


class Prefetcher:
    def __init__(self, store: ObjectStore, work_dir: str | None, slots: int):
        if slots < 1:
            raise ValueError("a prefetcher needs at least one slot")
        self.store, self.work_dir, self.slots = store, work_dir, slots
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="prefetch")
        self._copies: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._log = get_logger(component="prefetch")
        self.used = self.discarded = 0  # copies handed out / thrown away (for tests and logs)

    def start(self, key: str, sha256: str, before: Callable[[], None] | None = None) -> None:
        """Begin fetching ``key`` (expected ``sha256``) unless it is already under way;
        ``before`` runs first on the fetching thread (e.g. the message's signature check: a
        message that fails it is not fetched)."""
        with self._lock:
            if (key, sha256) in self._copies:
                return
            while len(self._copies) > self.slots:
                self._discard(self._copies.popitem(last=False)[1])
            self._copies[(key, sha256)] = self._pool.submit(self._fetch, key, sha256, before)

    def _fetch(self, key: str, sha256: str, before) -> str:
        if before is not None:
            before()
        fd, path = tempfile.mkstemp(prefix="prefetch-", dir=self.work_dir)
        os.close(fd)
        try:
            self.store.download(key, path, sha256=sha256)  # raises on a hash mismatch
        except BaseException:
            _unlink(path)
            raise
        return path

    def take(self, key: str, sha256: str) -> str | None:
        """The local copy of ``key`` whose content hashed to ``sha256``, waiting for its
        download if need be (the caller then owns the file), or None if none was started or
        it failed: the caller fetches and checks the object itself."""
        with self._lock:
            future = self._copies.pop((key, sha256), None)
        if future is None:
            return None
        try:
            path = future.result()
        except Exception as exc:  # noqa: BLE001 - the caller's own fetch reports the reason
            self._log.info("prefetch_failed_fetching_again", key=key, error=repr(exc))
            return None
        self.used += 1
        return path

    def _discard(self, future: Future) -> None:
        self.discarded += 1
        if not future.cancel():
            future.add_done_callback(lambda f: f.exception() is None and _unlink(f.result()))

    def close(self) -> None:
        with self._lock:
            copies, self._copies = list(self._copies.values()), OrderedDict()
        for future in copies:
            self._discard(future)
        self._pool.shutdown(wait=True, cancel_futures=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
