"""The aggregator checks every message first, in process: the embedded broker (which, like
RabbitMQ, stamps each message with its connection's user), a local store, real CKKS.

Each forgery is dead-lettered with its reason and listed by ``status`` under the round it
claims; the round completes on the honest updates, and their sum is exactly theirs."""
from __future__ import annotations

import io
import re
import threading
import time

import numpy as np
import pytest

from cxr_mq import bound, controller, identity, messages, rounds
from cxr_mq.storage.local import LocalStore
from cxr_mq.transport.base import REASON_HEADER, USER_HEADER, Topology
from cxr_mq.transport.embedded import EmbeddedBroker, EmbeddedServer
from workers.aggregator import AggregatorWorker

N_PARAMS = 64
HOSPITALS = ("h1", "h2")


@pytest.fixture
def federation(tmp_path, codecs):
    store = LocalStore(tmp_path / "store")
    parties = {name: identity.provision(store, name, role) for name, role in
               [("ctl", "controller"), ("agg", "aggregator"), ("h1", "hospital"), ("h2", "hospital")]}
    server, topology = EmbeddedServer(), Topology("t")
    admin = EmbeddedBroker(server, topology, user="admin")
    admin.declare_topology(HOSPITALS)
    worker = AggregatorWorker(EmbeddedBroker(server, topology, user="agg"), store, codecs[1],
                              hospitals=HOSPITALS, work_dir=str(tmp_path), retain_updates=True,
                              identity=parties["agg"],
                              verifier=identity.Verifier(identity.Registry(store)))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    logins = {name: EmbeddedBroker(server, topology, user=name) for name in parties}
    yield store, parties, logins, admin, worker
    worker.stop.set()
    thread.join(timeout=10)


def _round_start(store, ctl: identity.Identity, round_no: int, secret) -> dict:
    message = identity.sign(messages.make(
        "round_start", round=round_no, base_model_key=rounds.base_key(round_no),
        base_model_sha256="0" * 64, base_model_encrypted=False, base_total_samples=0, quorum=2,
        min_clients=2, deadline=time.time() + 120, training={"model": "small-cnn", "epochs": 1},
        key_fingerprint=secret.fingerprint, codec_profile=secret.profile, n_params=N_PARAMS,
        hospitals=list(HOSPITALS), issued_at=time.time()), ctl)
    rounds.write_json(store, rounds.round_key(round_no), message)
    return message


def _update(store, secret, ident: identity.Identity, round_no: int, seed: int) -> dict:
    out = io.BytesIO()
    bound.write_header(out, round_no, ident.id)
    secret.encrypt_update(np.random.default_rng(seed).normal(0, 0.1, N_PARAMS), 5 + seed, out)
    info = store.put_bytes(rounds.update_key(round_no, ident.id), out.getvalue())
    return identity.sign(messages.make(
        "update_ready", round=round_no, hospital=ident.id, key=info.key, sha256=info.sha256,
        size=info.size, n_samples=5 + seed, n_params=N_PARAMS, key_fingerprint=secret.fingerprint,
        metrics={}, sent_at=time.time()), ident)


def _dead_letters(admin: EmbeddedBroker, count: int) -> list:
    letters = []
    deadline = time.monotonic() + 20
    while len(letters) < count and time.monotonic() < deadline:
        got = admin.get(admin.topology.dead_letter_queue, timeout=0.5)
        if got is not None:
            letters.append(got)
    assert len(letters) == count, [d.headers.get(REASON_HEADER) for d in letters]
    return letters


def _wait(predicate, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(what)


def test_forgeries_are_refused_first_and_the_round_completes_on_honest_updates(federation, codecs):
    store, parties, logins, admin, worker = federation
    secret, public = codecs
    start = _round_start(store, parties["ctl"], 1, secret)
    logins["ctl"].publish("round_start", messages.encode(start))
    honest1 = _update(store, secret, parties["h1"], 1, seed=1)
    logins["h1"].publish("update_ready", messages.encode(honest1))
    _wait(lambda: (s := rounds.RoundState.load(store, 1)) is not None and len(s.accepted) == 1,
          "h1's honest update was not accepted")

    mallory = identity.Identity.generate("mallory")
    unsigned = {k: v for k, v in honest1.items() if k not in ("signer", "signature")}
    attacks = [  # (login, routing key, message, reason)
        ("h2", "update_ready", honest1, "broker user 'h2' published a update_ready signed by 'h1'"),
        ("h2", "update_ready", {**honest1, "signature": "00" * 64}, "bad signature on update_ready from 'h1'"),
        ("h1", "update_ready", {**honest1, "n_samples": 5000}, "bad signature on update_ready from 'h1'"),
        ("h2", "update_ready", unsigned, "unsigned update_ready: no signer or signature"),
        ("h2", "update_ready", identity.sign({**unsigned, "hospital": "mallory"}, mallory),
         "unknown sender 'mallory': no identity in the registry"),
        ("h1", "round_start", identity.sign({**start, "round": 2}, parties["h1"]),
         "wrong role: round_start from 'h1', registered as hospital; only the controller role may send it"),
        ("h2", "update_ready", identity.sign({**unsigned, "sent_at": time.time() - 90_000}, parties["h1"]),
         "broker user 'h2' published a update_ready signed by 'h1'"),  # login before age
        ("h1", "update_ready", identity.sign({**unsigned, "sent_at": time.time() - 90_000}, parties["h1"]),
         "stale update_ready from 'h1': signed 900\\d\\ds ago, more than 86400s"),  # a regex
    ]
    for login, key, message, _ in attacks:
        logins[login].publish(key, messages.encode(message))
    letters = _dead_letters(admin, len(attacks))
    for (login, key, message, reason), letter in zip(attacks, letters):
        assert letter.headers[USER_HEADER] == login
        assert re.fullmatch(reason, letter.headers[REASON_HEADER]), (reason, letter.headers)

    logins["h2"].publish("update_ready", messages.encode(_update(store, secret, parties["h2"], 1, seed=2)))
    _wait(lambda: rounds.RoundState.load(store, 1).announced, "the round did not complete")
    state = rounds.RoundState.load(store, 1)
    assert state.status == "complete" and state.contributors == ["h1", "h2"]
    assert state.total_samples == 6 + 7
    assert state.refused == []  # nothing unverified reaches the round's trusted record
    expected = public.new_sum(N_PARAMS)
    for hospital in HOSPITALS:
        stream = io.BytesIO(store.get_bytes(rounds.update_key(1, hospital)))
        bound.check_header(stream, 1, hospital)
        expected.add(stream)
    out = io.BytesIO()
    expected.write(out)
    assert store.get_bytes(state.model_key) == out.getvalue()
    # the outcome the aggregator published is its own, signed
    verifier = identity.Verifier(identity.Registry(store))
    queue = admin.temporary_queue(["model_ready"])
    worker._announce(state)  # announce again (as after a restart): idempotent for the hospitals
    outcome = controller.wait_for_round(admin, queue, 1, timeout=5, verifier=verifier)
    assert outcome["signer"] == "agg" and outcome["contributors"] == ["h1", "h2"]

    rows = {row["round"]: row for row in controller.status(store)}
    reasons = [r["reason"] for r in rows[1]["refused"]]
    for _, key, _, reason in attacks:
        if key == "update_ready":
            assert any(re.fullmatch(reason, r) for r in reasons), (reason, reasons)
    assert rows[2]["state"] == "unknown"  # the hospital-signed round_start claimed round 2
    assert rows[2]["refused"][0]["reason"].startswith("wrong role")


def test_a_forged_outcome_does_not_end_the_round_for_the_controller(federation, codecs):
    store, parties, logins, admin, _ = federation
    queue = admin.temporary_queue(["model_ready", "round_aborted"])
    forged = messages.make("round_aborted", round=1, reason="forged", contributors=[],
                           finished_at=time.time())
    ctl_verifier = identity.Verifier(identity.Registry(store))
    for login, message in [("h1", forged), ("h1", identity.sign(forged, parties["h1"])),
                           ("ctl", identity.sign(forged, parties["ctl"]))]:
        logins[login].publish("round_aborted", messages.encode(message))
    with pytest.raises(controller.RoundTimeout):
        controller.wait_for_round(admin, queue, 1, timeout=1.5, verifier=ctl_verifier)
    genuine = identity.sign(forged, parties["agg"])
    logins["agg"].publish("round_aborted", messages.encode(genuine))
    assert controller.wait_for_round(admin, queue, 1, timeout=5, verifier=ctl_verifier) == genuine


def test_bound_header_round_trip_and_refusals():
    out = io.BytesIO()
    bound.write_header(out, 7, "h1")
    out.write(b"codec stream")
    stream = io.BytesIO(out.getvalue())
    bound.check_header(stream, 7, "h1")
    assert stream.read() == b"codec stream"  # left at the codec's stream
    for round_no, hospital in [(8, "h1"), (7, "h2")]:
        with pytest.raises(bound.BindingError, match="object is bound to round 7 hospital 'h1'"):
            bound.check_header(io.BytesIO(out.getvalue()), round_no, hospital)
    for raw, reason in [(b"CKKS....", "no bound header"), (bound.BOUND_MAGIC + b"\xff\xff", "out of range"),
                        (bound.BOUND_MAGIC + b"\x00\x03abc", "unreadable")]:
        with pytest.raises(bound.BindingError, match=reason):
            bound.read_header(io.BytesIO(raw))
