"""The aggregator worker in one process: embedded broker, local store, fake clock, real CKKS.

Each test names what broke: an update acked before it is durable, an update counted twice,
a refusal that does not dead-letter with its reason, a round that does not finish (or
finishes wrongly), a restarted aggregator that loses or double-counts what it accepted.
"""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from cxr_mq import bound, messages, rounds
from cxr_mq.rounds import ABORTED, COMPLETE, OPEN
from cxr_mq.transport.base import Requeue

N_PARAMS = 1000


def _weights(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, N_PARAMS)


def _fedavg(*pairs) -> np.ndarray:
    return sum(w * n for w, n in pairs) / sum(n for _, n in pairs)


def _accepted(fed, round_no=1) -> list[str]:
    state = fed.state(round_no)
    return [] if state is None else [a["hospital"] for a in state.accepted]


def test_an_update_is_durable_before_its_ack(fed):
    seen_at_ack = []

    def before_ack(delivery):
        if delivery.routing_key == "update_ready":
            seen_at_ack.append(_accepted(fed))
    agg = fed.aggregator(before_ack=before_ack)
    fed.open_round(quorum=3)
    for i, hospital in enumerate(("h1", "h2")):
        fed.publish(fed.upload_update(1, hospital, _weights(i), 10))
    fed.drain(agg)
    assert seen_at_ack == [["h1"], ["h1", "h2"]], (
        f"update_ready was acked while the stored round state listed {seen_at_ack}: the "
        f"aggregator must save the accepted update durably before the ack, or a crash loses it")


def test_a_crash_between_save_and_ack_counts_the_update_once(fed):
    """Killed after the durable save but before the ack: the broker redelivers, the
    restarted aggregator restores its sum from the store and counts the update once."""
    crashed = []

    def crash_before_ack(delivery):
        if delivery.routing_key == "update_ready":
            crashed.append(delivery)
            first.broker.abort()  # the process dies: nothing is acked on the way out
            raise Requeue()
    first = fed.aggregator(before_ack=crash_before_ack)
    fed.open_round(quorum=2)
    w1, w2 = _weights(1), _weights(2)
    fed.publish(fed.upload_update(1, "h1", w1, 30))
    first.broker.run(threading.Event())  # returns once the connection is gone
    assert crashed and _accepted(fed) == ["h1"], \
        f"the aggregator died after accepting h1 and before the ack; the store records {_accepted(fed)}"
    second = fed.aggregator()  # a new process: state restored from the store
    fed.publish(fed.upload_update(1, "h2", w2, 10))
    fed.drain(second)
    state = fed.state()
    assert [a["hospital"] for a in state.accepted] == ["h1", "h2"], (
        f"after the crash and redelivery the round accepted {[a['hospital'] for a in state.accepted]}")
    assert state.status == COMPLETE and state.total_samples == 40
    assert np.max(np.abs(fed.decrypt_aggregate() - _fedavg((w1, 30), (w2, 10)))) < 1e-6, \
        "the restored aggregate is not the FedAvg of h1 and h2 each counted once"


def test_a_duplicate_update_is_acked_and_not_counted_again(fed):
    agg = fed.aggregator()
    fed.open_round(quorum=2)
    w1, w2 = _weights(1), _weights(2)
    update = fed.upload_update(1, "h1", w1, 30)
    fed.publish(update)
    fed.publish(update)  # a hospital republishing after a restart, or a redelivery
    fed.drain(agg)
    assert _accepted(fed) == ["h1"], f"one update from h1 was counted as {_accepted(fed)}"
    assert fed.dead_letters() == [], "a duplicate of a counted update is not a refusal"
    fed.publish(fed.upload_update(1, "h2", w2, 10))
    fed.publish(update)  # and late, once the round is complete
    fed.drain(agg)
    state = fed.state()
    assert state.status == COMPLETE and state.total_samples == 40
    assert fed.dead_letters() == []
    assert np.max(np.abs(fed.decrypt_aggregate() - _fedavg((w1, 30), (w2, 10)))) < 1e-6


def test_same_hospital_with_different_content_is_refused(fed):
    agg = fed.aggregator()
    fed.open_round(quorum=3)
    fed.publish(fed.upload_update(1, "h1", _weights(1), 30))
    fed.drain(agg)
    fed.publish(fed.upload_update(1, "h1", _weights(9), 30))  # at its key: the only place it may be
    fed.drain(agg)
    assert _accepted(fed) == ["h1"]
    assert [d["reason"] for d in fed.dead_letters()] == ["duplicate hospital 'h1' with different content"]


def _refusal_cases():
    """(name, how to make the bad update_ready from a good one, expected reason fragment)."""
    return [
        ("unknown round", lambda fed, good: {**good, "round": 7}, "unknown round 7"),
        ("not a participant", lambda fed, good: {**good, "hospital": "mallory"},
         "unknown sender 'mallory': not a participant"),
        ("other key", lambda fed, good: {**good, "key_fingerprint": "f" * 64}, "key fingerprint mismatch"),
        ("wrong shape", lambda fed, good: {**good, "n_params": N_PARAMS + 1}, "wrong shape"),
        ("hash mismatch", lambda fed, good: {**good, "sha256": "0" * 64}, "sha256 mismatch"),
        ("missing object", lambda fed, good: {**good, "hospital": "h2", "key": rounds.update_key(1, "h2")},
         "update object missing"),
        ("another hospital's key", lambda fed, good: {**good, "hospital": "h2"},
         "wrong object key 'rounds/000001/updates/h1'"),
        ("another hospital's object", lambda fed, good: {**good, **_copied(fed, good)},
         "unbound update: object is bound to round 1 hospital 'h1', not round 1 hospital 'h2'"),
        ("garbage ciphertext", lambda fed, good: {
            **good, **_garbage(fed)}, "bad ciphertext"),
    ]


def _garbage(fed) -> dict:
    buf = io.BytesIO()
    bound.write_header(buf, 1, "h2")  # bound as it should be, but no ciphertext after it
    info = fed.store.put_bytes("rounds/000001/updates/h2", buf.getvalue() + b"not a ciphertext" * 10)
    return {"hospital": "h2", "key": info.key, "sha256": info.sha256, "size": info.size}


def _copied(fed, good) -> dict:
    """h1's object, copied to h2's key by h2, which claims it as its own."""
    info = fed.store.put_bytes(rounds.update_key(1, "h2"), fed.store.get_bytes(good["key"]))
    return {"hospital": "h2", "key": info.key, "sha256": info.sha256, "size": info.size}


@pytest.mark.parametrize("name,make_bad,reason", _refusal_cases(), ids=[c[0] for c in _refusal_cases()])
def test_a_bad_update_is_dead_lettered_with_its_reason_and_the_round_goes_on(fed, name, make_bad, reason):
    agg = fed.aggregator()
    fed.open_round(quorum=2)
    good = fed.upload_update(1, "h1", _weights(1), 30)
    fed.publish(messages.validate(make_bad(fed, dict(good))))
    fed.drain(agg)
    dead = fed.dead_letters()
    assert len(dead) == 1 and reason in (dead[0]["reason"] or ""), \
        f"{name}: expected one dead letter with {reason!r}, got {[d['reason'] for d in dead]}"
    assert dead[0]["queue"] == fed.topology.aggregator_queue
    assert _accepted(fed) == [], f"{name}: the bad update was counted"
    if name != "unknown round":
        assert [r["reason"] for r in fed.state().refused] == [dead[0]["reason"]], \
            f"{name}: the refusal is not in the round's durable record"
    # the worker keeps going: good updates still complete the round
    fed.publish(good)
    fed.publish(fed.upload_update(1, "h3", _weights(3), 10))
    fed.drain(agg)
    assert fed.state().status == COMPLETE and _accepted(fed) == ["h1", "h3"]


def test_late_and_closed_round_updates_are_refused(fed):
    agg = fed.aggregator()
    fed.open_round(quorum=1, deadline=30)
    fed.publish(fed.upload_update(1, "h1", _weights(1), 5))
    fed.drain(agg)
    assert fed.state().status == COMPLETE
    fed.publish(fed.upload_update(1, "h2", _weights(2), 5))
    fed.open_round(round_no=2, quorum=2, deadline=30)
    fed.drain(agg)
    fed.now += 31
    fed.publish(fed.upload_update(2, "h1", _weights(1), 5))
    fed.drain(agg)
    reasons = [d["reason"] for d in fed.dead_letters()]
    assert reasons[0] == "round 1 is closed (complete)", reasons
    assert any(r in reasons[1] for r in ("round 2 deadline has passed", "round 2 is closed (aborted)")), reasons


def test_malformed_message_is_dead_lettered_and_recorded(fed):
    agg = fed.aggregator()
    fed.publish({"schema": "update_ready"}, body=b"\xc1 not msgpack")
    fed.drain(agg)
    dead = fed.dead_letters()
    assert len(dead) == 1 and dead[0]["reason"].startswith("not msgpack"), dead
    unrouted = rounds.read_json(fed.store, rounds.UNROUTED_REFUSALS_KEY)
    assert unrouted and unrouted["refused"][0]["reason"] == dead[0]["reason"]


def test_quorum_completes_the_round_and_announces_the_fedavg(fed):
    agg = fed.aggregator()
    fed.open_round(quorum=3)
    pairs = [(_weights(i), n) for i, n in enumerate((12, 30, 7))]
    for hospital, (w, n) in zip(fed.hospitals, pairs):
        fed.publish(fed.upload_update(1, hospital, w, n))
    fed.drain(agg)
    state = fed.state()
    assert state.status == COMPLETE, f"quorum of 3 reached but the round is {state.status}"
    ready = [m for m in fed.announced("h2") if m["schema"] == "model_ready"]
    assert len(ready) == 1, f"expected one model_ready on h2's queue, got {fed.announced('h2')}"
    assert ready[0]["contributors"] == ["h1", "h2", "h3"] and ready[0]["total_samples"] == 49
    assert (ready[0]["key"], ready[0]["sha256"]) == (state.model_key, state.model_sha256)
    assert np.max(np.abs(fed.decrypt_aggregate() - _fedavg(*pairs))) < 1e-6


def test_deadline_completes_with_the_minimum_or_aborts_below_it(fed):
    agg = fed.aggregator()
    fed.open_round(round_no=1, quorum=3, min_clients=1, deadline=30)
    fed.open_round(round_no=2, quorum=3, min_clients=2, deadline=30)
    w = _weights(1)
    fed.publish(fed.upload_update(1, "h1", w, 10))
    fed.publish(fed.upload_update(2, "h1", w, 10))
    fed.drain(agg)
    assert fed.state(1).status == fed.state(2).status == OPEN, "a round finished before its quorum or deadline"
    fed.now += 31
    fed.drain(agg)  # the tick sees the deadline
    assert fed.state(1).status == COMPLETE, "deadline passed with the minimum: the round must complete"
    assert fed.state(2).status == ABORTED, "deadline passed below the minimum: the round must abort"
    assert "fewer than the minimum of 2" in fed.state(2).reason
    kinds = [(m["schema"], m["round"]) for m in fed.announced("h3")]
    assert ("model_ready", 1) in kinds and ("round_aborted", 2) in kinds, kinds
    assert np.max(np.abs(fed.decrypt_aggregate(1) - w)) < 1e-6


def test_a_restarted_aggregator_restores_open_rounds_and_announces_finished_ones(fed):
    first = fed.aggregator()
    fed.open_round(round_no=1, quorum=2)
    w1, w2 = _weights(1), _weights(2)
    fed.publish(fed.upload_update(1, "h1", w1, 30))
    fed.drain(first)
    first.broker.close()
    # a finished round whose announcement was never sent (crash after completing)
    state = fed.state(1)
    second = fed.aggregator()
    assert 1 in second.sums, "the open round's running sum was not rebuilt on start-up"
    fed.publish(fed.upload_update(1, "h2", w2, 10))
    fed.drain(second)
    assert fed.state(1).status == COMPLETE and state.accepted[0]["hospital"] == "h1"
    assert np.max(np.abs(fed.decrypt_aggregate(1) - _fedavg((w1, 30), (w2, 10)))) < 1e-6, \
        "the restored sum lost or double-counted h1's update"
    # completed but not announced: a restart announces it
    done = fed.state(1)
    done.announced = False
    done.save(fed.store)
    for h in fed.hospitals:
        fed.server.queue(fed.topology.hospital_queue(h)).messages.clear()
    second.broker.close()
    fed.aggregator()
    assert [m["schema"] for m in fed.announced("h1")] == ["model_ready"], \
        "a completed, unannounced round was not announced after a restart"


def test_a_round_naming_a_new_context_loads_it_from_the_store_and_an_unknown_one_is_aborted(fed):
    """A key ceremony (or a new ``keys init``) while the aggregator runs: the round that
    names the new context is summed under it, read from the store, without a restart; a
    round naming a context the store does not hold is aborted with the reason, and the
    aggregator goes on."""
    from cxr_mq import crypto

    agg = fed.aggregator()
    fed.open_round(round_no=1, quorum=1, min_clients=1, key_fingerprint="f" * 64)
    fed.drain(agg)
    state = fed.state(1)
    assert state.status == ABORTED and "the aggregator cannot add its updates: context ffffffffffffffff… is not " \
        "held here and the store has no usable public context" in state.reason
    assert [m["schema"] for m in fed.announced()] == ["round_start", "round_aborted"]

    pair = crypto.generate_keys("compact")
    fed.store.put_bytes("keys/public-context", pair.public)
    new = crypto.load_context(pair.secret)
    fed.open_round(round_no=2, quorum=2, key_fingerprint=new.fingerprint)
    for i, hospital in enumerate(("h1", "h2")):
        buf = io.BytesIO()
        bound.write_header(buf, 2, hospital)
        new.encrypt_update(_weights(i), 10 + i, buf)
        info = fed.store.put_bytes(rounds.update_key(2, hospital), buf.getvalue())
        fed.publish(fed.sign(messages.make(
            "update_ready", round=2, hospital=hospital, key=info.key, sha256=info.sha256, size=info.size,
            n_samples=10 + i, n_params=N_PARAMS, key_fingerprint=new.fingerprint, metrics={}, sent_at=fed.now)))
    fed.drain(agg)
    state = fed.state(2)
    assert state.status == COMPLETE, state.reason
    raw = fed.store.get_bytes(state.model_key, sha256=state.model_sha256)
    average = new.decrypt_aggregate(io.BytesIO(raw), state.total_samples)
    assert np.max(np.abs(average - _fedavg((_weights(0), 10), (_weights(1), 11)))) < 1e-6
    assert agg.codec.fingerprint == new.fingerprint

    fed.open_round(round_no=3, quorum=1, min_clients=1, key_fingerprint="e" * 64)  # the store holds another
    fed.drain(agg)
    assert fed.state(3).status == ABORTED
    assert f"and the store's public context (keys/public-context) is {new.fingerprint[:16]}…" in fed.state(3).reason
