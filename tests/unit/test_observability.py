"""Refusal reasons map onto a small, fixed set of metric labels; transport counters are
exported at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from cxr_mq import messages
from cxr_mq.observability import Metrics, reason_code


def _reason(body: bytes) -> str:
    try:
        messages.decode(body)
    except messages.MessageError as exc:
        return str(exc)
    raise AssertionError("decoded")


def test_reason_codes():
    import msgpack

    assert reason_code("unknown round 7") == "unknown_round"
    assert reason_code("round 3 is closed (complete)") == "closed_round"
    assert reason_code("round 3 deadline has passed") == "deadline_passed"
    assert reason_code("unknown sender 'x': not a participant of round 1") == "unknown_sender"
    assert reason_code("key fingerprint mismatch: update has ab…, round uses cd…") == "key_fingerprint"
    assert reason_code("wrong shape: update has 3 parameters, model has 4") == "wrong_shape"
    assert reason_code("sha256 mismatch: s3://b/k: sha256 a does not match the expected b") == "sha256_mismatch"
    assert reason_code("update object unreadable: s3 get ... AccessDenied") == "object_unreadable"
    assert reason_code("bad ciphertext: truncated") == "bad_ciphertext"
    assert reason_code(_reason(b"\xc1")) == "not_msgpack"
    assert reason_code(_reason(msgpack.packb([1]))) == "not_msgpack"
    assert reason_code(_reason(msgpack.packb({"schema": "x", "version": 1}))) == "unknown_schema"
    assert reason_code(_reason(msgpack.packb({"schema": "update_ready", "version": 1}))) == "invalid_message"
    assert reason_code(_reason(b"\x00" * (messages.MAX_MESSAGE_BYTES + 1))) == "oversized"
    assert reason_code("something new") == "other"


class _Broker:
    reconnects = 3


class _Store:
    retries = {"GetObject": 2}


def test_transport_counters_are_exported_at_scrape_time():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    broker, store = _Broker(), _Store()
    metrics.watch("aggregator", broker=broker, store=store)
    metrics.refusal("aggregator", "unknown round 9")
    text = generate_latest(registry).decode()
    assert 'cxr_broker_reconnects_total{role="aggregator"} 3.0' in text
    assert 'cxr_s3_retries_total{op="GetObject",role="aggregator"} 2.0' in text
    assert 'cxr_messages_refused_total{reason="unknown_round",role="aggregator"} 1.0' in text
    broker.reconnects = 4
    assert 'cxr_broker_reconnects_total{role="aggregator"} 4.0' in generate_latest(registry).decode()
