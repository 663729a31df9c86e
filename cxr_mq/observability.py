"""Prometheus metrics for the workers (opt-in: ``--metrics-port`` serves them).

One :class:`Metrics` object per process, registered in prometheus-client's default registry
(the one ``start_http_server`` serves): that registry is process-wide by prometheus-client's
own design, so this is the one deliberate piece of global state besides the logger. Workers
in one process (the demo) share it and are told apart by the ``role`` label.

The transports keep plain counters of their own (``RabbitMQBroker.reconnects``,
``S3Store.retries``) and know nothing of Prometheus; :meth:`Metrics.watch` exports them at
scrape time, so a broker or store never has to be handed a metrics object.

Refusal reasons are free text (they go into dead-letter headers and ``cxr-mq status``); for
a label they are reduced to a small fixed set of codes by :func:`reason_code`.
"""
from __future__ import annotations

import re
import threading
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# first match wins; the patterns follow the reasons RoundPolicy, the aggregator and the
# message codec give
_REASON_CODES = (
    ("unknown_round", r"^unknown round"),
    ("closed_round", r"^round \d+ is closed"),
    ("deadline_passed", r"deadline has passed"),
    ("unknown_sender", r"^unknown sender"),
    ("key_fingerprint", r"key fingerprint mismatch|uses key .* holds"),
    ("wrong_shape", r"^wrong shape|n_params mismatch"),
    ("conflicting_duplicate", r"duplicate hospital"),
    ("sha256_mismatch", r"sha256 mismatch|does not match the expected"),
    ("object_missing", r"object missing|no such object"),
    ("object_unreadable", r"object unreadable"),
    ("bad_ciphertext", r"bad ciphertext"),
    ("oversized", r"^oversized message"),
    ("not_msgpack", r"^not (a )?msgpack"),
    ("unknown_schema", r"^unknown schema"),
    ("invalid_message", r" v\d+ invalid at "),
    ("wrong_queue", r" is not for "),
)


def reason_code(reason: str) -> str:
    """A refusal reason reduced to a bounded label value."""
    for code, pattern in _REASON_CODES:
        if re.search(pattern, reason):
            return code
    return "other"


class _WatchedCounters:
    """Exports transport-owned counters (``reconnects``, ``retries``) at scrape time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._brokers: list[tuple[str, weakref.ref]] = []
        self._stores: list[tuple[str, weakref.ref]] = []

    def add_broker(self, role: str, broker) -> None:
        with self._lock:
            self._brokers.append((role, weakref.ref(broker)))

    def add_store(self, role: str, store) -> None:
        with self._lock:
            self._stores.append((role, weakref.ref(store)))

    def describe(self):
        return []  # values are only known at scrape time

    def collect(self):
        reconnects = CounterMetricFamily("cxr_broker_reconnects", "Broker reconnections after a "
                                         "lost connection or channel", labels=["role"])
        retries = CounterMetricFamily("cxr_s3_retries", "S3 operations retried after a "
                                      "transient fault", labels=["role", "op"])
        totals: dict = {}
        s3: dict = {}
        with self._lock:
            for role, ref in self._brokers:
                broker = ref()
                if broker is not None:
                    totals[role] = totals.get(role, 0) + getattr(broker, "reconnects", 0)
            for role, ref in self._stores:
                store = ref()
                for op, count in dict(getattr(store, "retries", {}) or {}).items():
                    s3[(role, op)] = s3.get((role, op), 0) + count
        for role, value in sorted(totals.items()):
            reconnects.add_metric([role], value)
        for (role, op), value in sorted(s3.items()):
            retries.add_metric([role, op], value)
        yield reconnects
        yield retries


class Metrics:
    """Counters and histograms for rounds, updates, refusals, bytes, durations, reconnects."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rounds = Counter("cxr_rounds", "Rounds finished, by outcome (aggregator) or rounds "
                              "taken part in (hospital)", ["role", "outcome"], registry=r)
        self.open_rounds = Gauge("cxr_open_rounds", "Rounds the aggregator is collecting updates "
                                 "for", ["role"], registry=r)
        self.updates_accepted = Counter("cxr_updates_accepted", "Updates added into a round's "
                                        "sum", ["role"], registry=r)
        self.updates_duplicate = Counter("cxr_updates_duplicate", "Redelivered or republished "
                                         "updates recognised and counted once", ["role"], registry=r)
        self.updates_published = Counter("cxr_updates_published", "update_ready messages "
                                         "published (first time or republished)", ["role"],
                                         registry=r)
        self.refused = Counter("cxr_messages_refused", "Messages dead-lettered, by reason code",
                               ["role", "reason"], registry=r)
        self.bytes = Counter("cxr_bytes", "Bytes moved to or from the object store",
                             ["role", "direction"], registry=r)
        self.duration = Histogram("cxr_duration_seconds", "Durations of a worker's phases "
                                  "(train, encrypt, upload, aggregate, finalize, round)",
                                  ["role", "phase"], buckets=DURATION_BUCKETS, registry=r)
        self.handler_errors = Counter("cxr_handler_errors", "Messages requeued after a "
                                      "transient handler error", ["role"], registry=r)
        self._watched = _WatchedCounters()
        r.register(self._watched)

    def watch(self, role: str, broker=None, store=None) -> None:
        if broker is not None:
            self._watched.add_broker(role, broker)
        if store is not None:
            self._watched.add_store(role, store)

    def refusal(self, role: str, reason: str) -> None:
        self.refused.labels(role=role, reason=reason_code(reason)).inc()


_process_metrics: Metrics | None = None
_process_lock = threading.Lock()


def process_metrics() -> Metrics:
    """The process's metrics, in the default registry that ``start_http_server`` serves."""
    global _process_metrics
    with _process_lock:
        if _process_metrics is None:
            _process_metrics = Metrics(REGISTRY)
        return _process_metrics
