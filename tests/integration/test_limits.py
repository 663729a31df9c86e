"""Limits that cannot be crossed (issue 10 items 3, 5, 6), each mounted as an attack over the
real RabbitMQ and moto's S3/KMS server: the refusal carries its reason into ``cxr-mq status``
and the round goes on with the honest updates.

Every forged message is well signed by the party it claims to come from (a dishonest hospital
holds its own identity key, a curious aggregator its own) and every hostile object lives where
the real one would, bound to its round and hospital: the refusals below are the codec's and
the hospitals' own checks, not the signatures'.

Hospitals run with ``--synthetic`` (a seeded update instead of TensorFlow training;
encryption, upload, messages, aggregation and decryption are the real code) on a model of
20,000 parameters (three compact chunks), which keeps these multi-process tests fast.
"""
from __future__ import annotations

import hashlib
import io
import re
import time
import uuid

import boto3
import numpy as np
import pytest

from cxr_mq import bound, crypto, identity, messages, rounds
from cxr_mq.crypto import wire
from cxr_mq.rounds import COMPLETE, RoundState
from cxr_mq.storage.s3 import S3Store
from cxr_mq.transport.base import ORIGIN_HEADER, REASON_HEADER, Topology
from cxr_mq.transport.rabbitmq import RabbitMQBroker

from .cluster import Cluster

pytestmark = pytest.mark.integration

HOSPITALS = ("h1", "h2", "h3", "h4")  # synthetic sample counts 148, 118, 144, 79
PARAMS = ("--synthetic-params", "20000")


def _bucket(endpoint: str) -> dict:
    region = "us-east-1"
    key_id = boto3.client("kms", endpoint_url=endpoint, region_name=region).create_key(
        Description="cxr-mq limits")["KeyMetadata"]["KeyId"]
    bucket = f"cxr-limits-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=region).create_bucket(Bucket=bucket)
    return {"endpoint_url": endpoint, "bucket": bucket, "kms_key_id": key_id, "region": region}


def _start(tmp, amqp_url: str, endpoint: str, before_workers=None) -> Cluster:
    # compact: this module is about limits on messages and objects, not the codec profile (the threshold
    # profile's ceremony and committee are test_round.py's and test_threshold_rounds.py's)
    cluster = Cluster(tmp, amqp_url, _bucket(endpoint), f"t{uuid.uuid4().hex[:10]}", HOSPITALS,
                      synthetic=True, profile="compact")
    cluster.init_keys()
    if before_workers:
        before_workers(cluster)
    cluster.start_all()
    for name in ("aggregator", *HOSPITALS):
        cluster.wait_for_event(name, "worker_started", timeout=120)
    return cluster


def _stop(cluster: Cluster) -> None:
    cluster.stop_all()
    try:
        broker = RabbitMQBroker(cluster.amqp_url, Topology(cluster.namespace), reconnect_for=10)
        broker.delete_topology(cluster.hospitals)
        broker.close()
    except Exception:  # noqa: BLE001
        pass


@pytest.fixture(scope="module")
def shared(tmp_path_factory, amqp_url, moto_endpoint, aws_env):
    cluster = _start(tmp_path_factory.mktemp("limits"), amqp_url, moto_endpoint)
    yield cluster
    _stop(cluster)


@pytest.fixture
def federation(shared: Cluster):
    """The shared federation with every hospital running and an empty dead-letter queue."""
    for name in ("aggregator", *HOSPITALS):
        if not shared.running(name):
            mark = shared.mark(name)
            (shared.start_aggregator() if name == "aggregator" else shared.start_hospital(name))
            shared.wait_for_event(name, "worker_started", after=mark, timeout=120)
    shared.dead_letters()
    return shared


def _round_args(quorum: int = 4, min_clients: int = 3, deadline: float = 600) -> tuple:
    """Every round here ends at its quorum: the deadline is only a backstop, far enough away
    that a round kept open on purpose (h4 stopped while the forgeries are refused, each one
    waited for, then h4 started again) does not close without h4 on a loaded host."""
    return ("--quorum", str(quorum), "--min-clients", str(min_clients), "--deadline", str(deadline),
            *PARAMS)


def _wait(predicate, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _accepted(cluster: Cluster, round_no: int, hospitals) -> dict:
    return _wait(lambda: (s := cluster.state(round_no)) and set(hospitals) <= {a["hospital"] for a in s["accepted"]}
                 and s, f"round {round_no}: {hospitals} accepted")


def _dead_letters(cluster: Cluster, count: int) -> list[dict]:
    taken: list[dict] = []
    _wait(lambda: taken.extend(cluster.dead_letters()) or len(taken) >= count, f"{count} dead letters", 90)
    time.sleep(1.0)
    taken += cluster.dead_letters()
    assert len(taken) == count, [(d["routing_key"], d["headers"].get(REASON_HEADER)) for d in taken]
    return taken


def _codec_stream(obj: bytes) -> bytes:
    """The codec's stream inside an uploaded object (after its bound header)."""
    src = io.BytesIO(obj)
    bound.read_header(src)
    return src.read()


def _bound(round_no: int, hospital: str, stream: bytes) -> bytes:
    out = io.BytesIO()
    bound.write_header(out, round_no, hospital)
    return out.getvalue() + stream


def _signed(cluster: Cluster, message: dict, signer: str) -> bytes:
    return messages.encode(identity.sign({**message, "signer": signer}, cluster.identities[signer]))


def _sum(public, n_params: int, streams, distinct: bool = True) -> bytes:
    total = public.new_sum(n_params, distinct_updates=distinct)
    for stream in streams:
        total.add(io.BytesIO(stream))
    out = io.BytesIO()
    total.write(out)
    return out.getvalue()


def _chunks_at(public, stream: bytes) -> int:
    """Offset of the first chunk frame (after the magic and the header frame)."""
    src = io.BytesIO(stream)
    public.read_header(src)
    return src.tell()


def _row(cluster: Cluster, round_no: int) -> dict:
    return {row["round"]: row for row in cluster.status()}[round_no]


# -- the aggregator: hostile uploads ----------------------------------------------------------
def test_hostile_uploads_are_refused_with_reasons_while_the_round_completes(federation):
    cluster = federation
    assert cluster.terminate("h4") == 0  # the round stays open while the forgeries arrive
    round_no = cluster.open_round(*_round_args())
    _accepted(cluster, round_no, ["h1", "h2", "h3"])
    public = crypto.load_context(cluster.get("keys/public-context"))
    template = cluster.update_message(round_no, "h1")
    n_params = template["n_params"]
    h1, h2 = (_codec_stream(cluster.get(rounds.update_key(round_no, h))) for h in ("h1", "h2"))
    at, frame = _chunks_at(public, h1), public.frame_bytes()
    assert len(h1) == at + 3 * frame  # three chunks
    repeated = bytearray(h1)  # chunk 1 carries chunk 0's seed record
    repeated[at + frame + 4:at + frame + 4 + public.SEED_BYTES] = h1[at + 4:at + 4 + public.SEED_BYTES]
    huge_frame = bytearray(h1)
    huge_frame[at:at + 4] = b"\xff\xff\xff\xff"
    header = io.BytesIO()  # the 153-byte upload whose header claims 2^20 updates
    wire.write_header(header, crypto.UpdateHeader(public.profile, public.fingerprint, n_params,
                                                  public.n_chunks(n_params), 1 << 20))
    tiny = header.getvalue() + bytes(153 - len(header.getvalue()))
    assert len(tiny) == 153
    cases = {  # name: (codec stream, the reason it must be refused with)
        "two-updates": (_sum(public, n_params, [h1, h2]),
                        r"^bad ciphertext: the stream holds 2 updates, expected exactly 1$"),
        "repeated-seed": (bytes(repeated), r"^bad ciphertext: a seed record appears twice"),
        "h1-again": (h1, r"^bad ciphertext: a seed record of this stream is in the sum already"),
        "claims-2^20": (tiny, rf"^bad ciphertext: the stream holds {1 << 20} updates, expected exactly 1$"),
        "huge-frame": (bytes(huge_frame), r"^bad ciphertext: chunk 0: frame of 4294967295 bytes"),
    }
    key = rounds.update_key(round_no, "h4")  # the one place h4's update may live
    for name, (stream, pattern) in cases.items():  # one at a time: they share h4's key
        blob = _bound(round_no, "h4", stream)
        cluster.put(key, blob)
        body = _signed(cluster, {**template, "hospital": "h4", "key": key, "size": len(blob),
                                 "sha256": hashlib.sha256(blob).hexdigest(), "sent_at": time.time()}, "h4")
        cluster.publish_raw("update_ready", body)
        (letter,) = _dead_letters(cluster, 1)
        assert letter["body"] == body
        assert re.search(pattern, letter["headers"][REASON_HEADER]), (name, letter["headers"])
        assert letter["headers"][ORIGIN_HEADER] == f"{cluster.namespace}.aggregator"
    assert cluster.running("aggregator")
    reasons = [r["reason"] for r in _row(cluster, round_no)["refused"]]
    for _, pattern in cases.values():
        assert sum(bool(re.search(pattern, r)) for r in reasons) == 1, (pattern, reasons)
    text = cluster.cli("status").stdout
    assert "refused h4: bad ciphertext: the stream holds 2 updates, expected exactly 1" in text

    # the round goes on: h4's honest update completes it, and nothing forged is in the sum
    cluster.start_hospital("h4")
    state = cluster.wait_finished(round_no, timeout=120)
    assert state["status"] == COMPLETE and sorted(a["hospital"] for a in state["accepted"]) == list(HOSPITALS)
    assert cluster.get(state["model_key"]) == cluster.fault_free_aggregate(round_no, HOSPITALS)
    for hospital in HOSPITALS:  # every hospital decrypted it (its checks passed)
        cluster.wait_for_event(hospital, "global_model_applied", round=round_no, timeout=60)


# -- hospitals: aggregates they must not decrypt ----------------------------------------------
def test_hospitals_refuse_to_decrypt_an_aggregate_that_is_not_what_model_ready_says(federation):
    """A curious aggregator (or anyone who can publish model_ready) asks the hospitals to
    decrypt one hospital's update: alone, summed three times, or inside an aggregate that
    names one contributor more than it sums. Every hospital refuses before decrypting, with
    the reason."""
    cluster = federation
    round_no = cluster.open_round(*_round_args())
    state = cluster.wait_finished(round_no, timeout=120)
    assert state["status"] == COMPLETE
    for hospital in HOSPITALS:
        cluster.wait_for_event(hospital, "global_model_applied", round=round_no, timeout=60)
    public = crypto.load_context(cluster.get("keys/public-context"))
    outcome = RoundState.load(_store(cluster), round_no).outcome_message()
    h1 = _codec_stream(cluster.get(rounds.update_key(round_no, "h1")))
    updates = [_codec_stream(cluster.get(rounds.update_key(round_no, h))) for h in ("h1", "h2", "h3")]
    cases = {
        "alone": (h1, ["h1"], r"names 1 contributor\(s\); this hospital decrypts only aggregates of 3 to 4"),
        "thrice": (_sum(public, state["n_params"], [h1] * 3, distinct=False), ["h1", "h2", "h3"],
                   r"the aggregate was not decrypted: chunks 0\.\.2: a seed record appears twice"),
        "names-one-more": (_sum(public, state["n_params"], updates), list(HOSPITALS),  # h4 named, not summed
                           r"the aggregate was not decrypted: the aggregate sums 3 updates, expected 4"),
    }
    key, real = state["model_key"], cluster.get(state["model_key"])
    assert key == rounds.aggregate_key(round_no)  # the one place the round's aggregate may live
    try:
        for name, (blob, contributors, pattern) in cases.items():  # they share the aggregate's key
            cluster.put(key, blob)
            body = _signed(cluster, {**outcome, "sha256": hashlib.sha256(blob).hexdigest(),
                                     "contributors": contributors}, cluster.aggregator_id)
            cluster.publish_raw("model_ready", body)
            letters = _dead_letters(cluster, len(HOSPITALS))
            assert all(d["body"] == body for d in letters)
            assert sorted(d["headers"][ORIGIN_HEADER] for d in letters) == sorted(
                f"{cluster.namespace}.hospital.{h}" for h in HOSPITALS), name
            assert all(re.search(pattern, d["headers"][REASON_HEADER]) for d in letters), (
                name, [d["headers"][REASON_HEADER] for d in letters])
    finally:
        cluster.put(key, real)  # the next round's base
    refused = _row(cluster, round_no)["refused_by_hospitals"]
    assert len(refused) == len(cases) * len(HOSPITALS)
    assert {r["message"] for r in refused} == {"model_ready"}
    assert all(cluster.running(h) for h in HOSPITALS)
    # and they go on: the next round completes
    next_round = cluster.open_round(*_round_args())
    assert cluster.wait_finished(next_round, timeout=120)["status"] == COMPLETE


def _store(cluster: Cluster) -> S3Store:
    s3 = cluster.s3
    return S3Store(bucket=s3["bucket"], kms_key_id=s3["kms_key_id"], endpoint_url=s3["endpoint_url"],
                   region=s3["region"])


# -- the controller: the min_clients floor ----------------------------------------------------
def test_start_round_refuses_min_clients_below_the_floor(federation):
    cluster = federation
    before = rounds.list_rounds(_store(cluster))
    for args in (("--min-clients", "1"), ("--quorum", "2")):
        result = cluster.cli("start-round", *args, *PARAMS, check=False)
        assert result.returncode == 2, result
        assert re.search(r"--min-clients [12] is below the floor of 3 \(min_clients_floor\)", result.stderr), (
            result.stderr)
    assert rounds.list_rounds(_store(cluster)) == before  # no round was opened


# -- hospitals: a sum that would wrap ---------------------------------------------------------
def _diverged_model(cluster: Cluster) -> None:
    """A federation whose last model diverged: weights of about 1.1e5, so that h1 (148
    samples) would encrypt n * |w| above what 3 contributors may sum, h3 (144) not."""
    store = _store(cluster)
    secret = crypto.load_context_file(cluster.keys_dir / "secret.ctx")
    n_params, limit = 20_000, secret.update_limit(3)
    weights = np.full(n_params, limit / 146)
    weights[1::2] *= -1
    streams = []
    for _ in range(3):  # an aggregate of three updates, as a complete round left it
        out = io.BytesIO()
        secret.encrypt_update(weights, 1, out, max_contributors=3)
        streams.append(out.getvalue())
    public = crypto.load_context(cluster.get("keys/public-context"))
    info = store.put_bytes(rounds.aggregate_key(1), _sum(public, n_params, streams))
    rounds.write_json(store, rounds.round_key(1), {"round": 1, "quorum": 3, "min_clients": 3})
    RoundState(round=1, quorum=3, min_clients=3, deadline=0.0, n_params=n_params,
               key_fingerprint=secret.fingerprint, status=COMPLETE, model_key=info.key,
               model_sha256=info.sha256, total_samples=3, announced=True).save(store)


def test_a_sum_that_would_wrap_is_refused_before_encrypting(tmp_path, amqp_url, moto_endpoint, aws_env):
    cluster = _start(tmp_path, amqp_url, moto_endpoint, before_workers=_diverged_model)
    try:
        code, result = cluster.start_round(*_round_args(quorum=3, min_clients=3))
        assert code == 0 and result["round"] == 2, result
        assert result["contributors"] == ["h2", "h3", "h4"], result
        (letter,) = _dead_letters(cluster, 1)
        reason = letter["headers"][REASON_HEADER]
        assert re.fullmatch(r"round 2: hospital h1 refused: n_samples \* \|weight\| reaches [0-9.e+]+; the "
                            r"compact profile takes at most 1\.67772e\+07 per update in a round of at most 3 "
                            r"contributors \(a larger update could make their sum wrap modulo q\)", reason), reason
        assert letter["headers"][ORIGIN_HEADER] == f"{cluster.namespace}.hospital.h1"
        # refused before encrypting: nothing uploaded; dead-lettered: trained once, not again
        assert rounds.update_key(2, "h1") not in cluster.objects()
        assert len(cluster.find_events("h1", "training_started", round=2)) == 1
        (refusal,) = _row(cluster, 2)["refused_by_hospitals"]
        assert (refusal["hospital"], refusal["message"], refusal["reason"]) == ("h1", "round_start", reason)
        assert cluster.running("h1")
    finally:
        _stop(cluster)
