"""A lease in the object store, so that of several aggregators exactly one is active.

The lease is one small object (``aggregator/lease``): who holds it and until when. It is
taken and renewed only with conditional writes: created with ``If-None-Match: *``, renewed
or taken over with ``If-Match`` on the version read, so two contenders can never both win
the same version. The holder renews it every ``ttl / 3`` seconds on a thread of its own (a
long aggregation must not let it lapse); a standby polls it and takes it over once it has
expired. A holder that finds it has lost the lease (it was paused beyond the TTL and a
standby took over) is told through ``on_lost`` and must stop at once; the conditional writes
of the round records catch anything it writes meanwhile.

Expiry compares the holder's wall clock (written in the lease) with the standby's: the
machines' clocks must agree to well within the TTL (NTP does).
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

from .log import get_logger
from .storage.base import ObjectNotFound, ObjectStore, PreconditionFailed, StoreError

LEASE_KEY = "aggregator/lease"
DEFAULT_TTL = 10.0


class Lease:
    def __init__(self, store: ObjectStore, holder: str, ttl: float = DEFAULT_TTL,
                 key: str = LEASE_KEY, clock: Callable[[], float] = time.time):
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.store, self.holder, self.ttl, self.key, self.clock = store, holder, ttl, key, clock
        self._etag: str | None = None
        self._expires_at = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._log = get_logger(component="lease", holder=holder)

    # -- taking it ----------------------------------------------------------------------------
    def _read(self) -> tuple[dict | None, str | None]:
        try:
            body, etag = self.store.get_versioned(self.key)
        except ObjectNotFound:
            return None, None
        return json.loads(body), etag

    def _write(self, condition: dict) -> None:
        now = self.clock()
        record = {"holder": self.holder, "expires_at": now + self.ttl, "renewed_at": now,
                  "ttl": self.ttl}
        info = self.store.put_bytes(self.key, json.dumps(record, sort_keys=True).encode(),
                                    **condition)
        self._etag, self._expires_at = info.etag, record["expires_at"]

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it or its holder let it expire."""
        current, etag = self._read()
        try:
            if current is None:
                self._write({"if_none_match": True})
            elif current["holder"] == self.holder or current["expires_at"] < self.clock():
                self._write({"if_match": etag})
            else:
                return False
        except PreconditionFailed:
            return False  # another contender won this version
        self._log.info("lease_acquired", previous=(current or {}).get("holder"), ttl=self.ttl)
        return True

    def wait_acquire(self, stop: threading.Event, poll: float = 1.0) -> bool:
        """Block (as a standby) until the lease is ours or ``stop`` is set."""
        announced = False
        while not stop.is_set():
            try:
                if self.try_acquire():
                    return True
            except StoreError as exc:
                self._log.warning("lease_unreadable", error=str(exc))
            if not announced:
                current, _ = self._read_quietly()
                self._log.info("standing_by", active=(current or {}).get("holder"))
                announced = True
            stop.wait(poll)
        return False

    def _read_quietly(self):
        try:
            return self._read()
        except StoreError:
            return None, None

    # -- keeping it ---------------------------------------------------------------------------
    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ``ttl / 3`` seconds on a background thread; call ``on_lost(reason)``
        once if another holder took over or the lease lapsed while the store was unreachable."""
        def renew_loop():
            while not self._stop.wait(self.ttl / 3):
                try:
                    self._write({"if_match": self._etag})
                except PreconditionFailed:
                    self._lose(on_lost, "another aggregator took the lease over")
                    return
                except StoreError as exc:
                    self._log.warning("lease_renewal_failed", error=str(exc))
                    if self.clock() >= self._expires_at:
                        self._lose(on_lost, "the lease expired while the store was unreachable")
                        return
        self._thread = threading.Thread(target=renew_loop, name="lease", daemon=True)
        self._thread.start()

    def _lose(self, on_lost, reason: str) -> None:
        self.lost.set()
        self._log.error("lease_lost", reason=reason)
        on_lost(reason)

    def release(self) -> None:
        """Stop renewing and let a standby take over now (it sees the lease expired)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._etag is None or self.lost.is_set():
            return
        record = {"holder": self.holder, "expires_at": 0.0, "renewed_at": self.clock(),
                  "ttl": self.ttl, "released": True}
        try:
            self.store.put_bytes(self.key, json.dumps(record, sort_keys=True).encode(),
                                 if_match=self._etag)
            self._log.info("lease_released")
        except StoreError as exc:  # it expires by itself
            self._log.warning("lease_not_released", error=str(exc))
