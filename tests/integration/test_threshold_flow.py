"""The threshold ceremony and committee through a real S3 API (moto's server, SSE-KMS), each
party with its own registered identity: the steps the workers will run, played in process.

Rounds survive dropouts (any t live members decrypt), end undecryptable below t and recover
in the next round; forged or re-addressed committee objects are refused."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cxr_mq import identity, threshold_flow as flow
from cxr_mq.crypto import load_context
from cxr_mq.crypto.ceremony import CeremonyParams
from cxr_mq.crypto.committee import Ledger
from cxr_mq.crypto.threshold import RoundEncoding
from cxr_mq.storage.s3 import S3Store

PARTIES = ("h1", "h2", "h3", "h4", "h5")


@pytest.fixture()
def federation(s3_settings, tmp_path):
    store = S3Store(bucket=s3_settings["bucket"], kms_key_id=s3_settings["kms_key_id"],
                    endpoint_url=s3_settings["endpoint_url"], region=s3_settings["region"])
    ids = {p: identity.provision(store, p, "hospital") for p in PARTIES}
    authority = identity.provision(store, "keys", "controller")
    registry = identity.Registry(store)
    params = CeremonyParams("fed", PARTIES, 3, "c-1")
    flow.open_ceremony(store, params, authority)
    for party in PARTIES:
        assert flow.deal(store, "c-1", ids[party], registry)
    assert not flow.deal(store, "c-1", ids["h1"], registry)  # redelivered: no second secret
    assert flow.dealt(store, "c-1", params) == list(PARTIES)
    codec = flow.finalize_ceremony(store, "c-1", registry, authority)
    shares = {p: flow.receive(store, "c-1", ids[p], registry) for p in PARTIES}
    assert {s.committee for s in shares.values()} == {codec.committee_key.fingerprint()}
    ledgers = {p: Ledger(tmp_path / "ledger" / p) for p in PARTIES}
    return store, ids, registry, codec, shares, ledgers


def _round(federation, round_no, contributors, alive):
    """Contributors upload; the aggregate is summed; the live members volunteer."""
    store, ids, registry, codec, shares, ledgers = federation
    public = load_context(store.get_bytes(flow.ceremony_key("c-1", "public")))
    enc = RoundEncoding("fed", round_no, 5, 1000, 4.0)
    rng = np.random.default_rng(round_no)
    weights = {h: rng.uniform(-1, 1, 6000) for h in contributors}
    total = public.new_sum(6000)
    for h in contributors:
        buf = io.BytesIO()
        flow.encrypt_and_upload(store, public, weights[h], 800, buf, enc, ids[h])
        total.add(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    total.write(out)
    for h in alive:
        flow.volunteer(store, round_no, ids[h])
    return out.getvalue(), np.mean([weights[h] for h in contributors], axis=0)


def test_round_completes_after_dropouts_and_every_survivor_gets_the_model(federation):
    store, ids, registry, codec, shares, ledgers = federation
    contributors = ("h1", "h2", "h3", "h4")
    # h2 and h4 die once their updates are in: h1, h3, h5 are alive (n - t = 2 dropped)
    aggregate, expected = _round(federation, 1, contributors, alive=("h5", "h1", "h3"))
    active = flow.choose_active(store, 1, shares["h5"], registry, ids["h5"])
    assert active == ("h1", "h3", "h5")
    assert flow.choose_active(store, 1, shares["h1"], registry, ids["h1"]) == active  # decided once
    request = flow.build_request(store, codec, 1, contributors, aggregate, active)
    for member in active:
        flow.answer(store, request, shares[member], ids[member], registry, ledgers[member], min_clients=3)
    for survivor in ("h1", "h3", "h5"):
        key_sum = flow.collect(store, request, ids[survivor], registry)
        avg, samples = codec.decrypt_aggregate(io.BytesIO(aggregate), key_sum, min_updates=3)
        assert samples == 3200 and np.max(np.abs(avg - expected)) < 1e-6
    # a reader of the bucket, with every object, is no recipient of any partial
    outsider = identity.provision(store, "reader", "hospital")
    with pytest.raises(flow.FlowError, match="not sealed to reader"):
        flow.collect(store, request, outsider, registry)


def test_below_threshold_the_round_is_undecryptable_and_the_next_completes(federation):
    store, ids, registry, codec, shares, ledgers = federation
    aggregate, _ = _round(federation, 2, ("h1", "h2", "h3"), alive=("h1", "h3"))
    assert flow.choose_active(store, 2, shares["h1"], registry, ids["h1"]) is None
    # a live member forging a third "ready" for a dead one does not make a quorum
    forged = json.loads(store.get_bytes(flow.committee_key(2, "ready", "h1") + ".sig"))
    forged["key"] = flow.committee_key(2, "ready", "h2")
    store.put_bytes(flow.committee_key(2, "ready", "h2") + ".sig",
                    json.dumps(identity.sign(forged, ids["h1"])).encode())
    store.put_bytes(flow.committee_key(2, "ready", "h2"), b"ready")
    assert flow.choose_active(store, 2, shares["h3"], registry, ids["h3"]) is None
    aggregate, expected = _round(federation, 3, ("h1", "h2", "h3"), alive=("h1", "h2", "h3"))
    active = flow.choose_active(store, 3, shares["h2"], registry, ids["h2"])
    request = flow.build_request(store, codec, 3, ("h1", "h2", "h3"), aggregate, active)
    for member in active:
        flow.answer(store, request, shares[member], ids[member], registry, ledgers[member], min_clients=3)
    avg, _ = codec.decrypt_aggregate(io.BytesIO(aggregate), flow.collect(store, request, ids["h3"], registry))
    assert np.max(np.abs(avg - expected)) < 1e-6


def test_forged_committee_objects_are_refused(federation):
    store, ids, registry, codec, shares, ledgers = federation
    aggregate, _ = _round(federation, 4, ("h1", "h2", "h3"), alive=("h1", "h2", "h3"))
    active = flow.choose_active(store, 4, shares["h1"], registry, ids["h1"])
    request = flow.build_request(store, codec, 4, ("h1", "h2", "h3"), aggregate, active)
    flow.answer(store, request, shares["h1"], ids["h1"], registry, ledgers["h1"], min_clients=3)
    # h2's partial replaced by one h3 signed: refused by signer
    key = flow.committee_key(4, "partials", "h2")
    data = store.get_bytes(flow.committee_key(4, "partials", "h1"))
    flow.put_signed(store, key, data, ids["h3"])
    with pytest.raises(flow.FlowError, match="signed by 'h3', expected 'h2'"):
        flow.collect(store, request, ids["h1"], registry)
    # an altered object under a valid record: refused by hash
    store.put_bytes(flow.committee_key(4, "partials", "h1"), data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(flow.FlowError, match="not the one its signed record names"):
        flow.collect(store, request, ids["h1"], registry)
    # a ceremony share re-addressed to another recipient does not open
    sealed_key = flow.ceremony_key("c-1", "shares", "h1", "h2")
    store.put_bytes(sealed_key, store.get_bytes(flow.ceremony_key("c-1", "shares", "h1", "h3")))
    with pytest.raises(flow.FlowError, match="not the one"):
        flow.receive(store, "c-1", ids["h2"], registry)


def _survivors_decrypt(federation, round_no, contributors, aggregate, alive, wait=3.0):
    """Every live hospital runs decrypt_round in its own thread, as its worker would."""
    import threading
    import time

    store, ids, registry, codec, shares, ledgers = federation
    results = {}

    def hospital(h):
        try:
            results[h] = flow.decrypt_round(store, codec, shares[h], round_no, contributors, aggregate, ids[h],
                                            registry, ledgers[h], min_clients=3, deadline=time.time() + wait, poll=0.2)
        except flow.RoundUndecryptable as exc:
            results[h] = exc

    threads = [threading.Thread(target=hospital, args=(h,)) for h in alive]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_survivors_decrypt_in_parallel_and_below_t_the_reason_is_given(federation):
    contributors = ("h1", "h2", "h3", "h4")
    aggregate, expected = _round(federation, 5, contributors, alive=())
    results = _survivors_decrypt(federation, 5, contributors, aggregate, alive=("h1", "h3", "h4"), wait=60)
    for h in ("h1", "h3", "h4"):
        avg, total = results[h]
        assert total == 3200 and np.max(np.abs(avg - expected)) < 1e-6
    aggregate, _ = _round(federation, 6, contributors, alive=())
    results = _survivors_decrypt(federation, 6, contributors, aggregate, alive=("h1", "h3"), wait=2.0)
    for h in ("h1", "h3"):
        assert isinstance(results[h], flow.RoundUndecryptable)
        assert "only 2 of the 3 committee members" in str(results[h])
