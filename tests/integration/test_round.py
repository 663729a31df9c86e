"""The spine: an aggregator and three hospitals as OS processes run two encrypted FedAvg
rounds over the real RabbitMQ and moto's S3 server under the default (threshold) profile: the
key ceremony through the hospital workers (``keys init``), the committee decrypting each round
(the session's ``two_rounds`` federation, which the report tests read too)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cxr_mq import crypto, rounds, threshold_flow
from cxr_mq.transport.base import Topology
from cxr_mq.transport.rabbitmq import RabbitMQBroker

from .cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path, amqp_url, s3_settings, namespace):
    """A single-key (compact) federation: its tests are about the secret context and
    SCAFFOLD's arithmetic, not the profile (the default profile is ``two_rounds``')."""
    c = Cluster(tmp_path, amqp_url, s3_settings, namespace, profile="compact", audit=True)
    yield c
    c.stop_all()
    broker = RabbitMQBroker(amqp_url, Topology(namespace))
    broker.delete_topology(c.hospitals)
    broker.close()


def _local_samples(cluster: Cluster, round_no: int, hospital: str) -> int:
    """A hospital's sample count: in update_ready under a single-key profile; under the
    threshold profile it travels only encrypted, so from the hospital's own log."""
    if cluster.profile != "threshold":
        return _update_message(cluster, round_no, hospital)["n_samples"]
    return cluster.find_events(hospital, "update_encrypted", round=round_no)[-1]["local_samples"]


def _fedavg_from_hospitals(cluster: Cluster, round_no: int, record: dict) -> np.ndarray:
    """Plaintext sample-weighted FedAvg of the weights each hospital kept locally."""
    total, weighted = 0, None
    for hospital in record["contributors"]:
        weights = np.load(cluster.tmp / "work" / hospital / f"update-{round_no:06d}.npy").astype(np.float64)
        n = _local_samples(cluster, round_no, hospital)
        weighted = weights * n if weighted is None else weighted + weights * n
        total += n
    if cluster.profile != "threshold":
        assert total == record["total_samples"]
    return weighted / total


def _update_message(cluster: Cluster, round_no: int, hospital: str) -> dict:
    from cxr_mq import messages
    return messages.decode(cluster.get(rounds.update_message_key(round_no, hospital)))


def test_two_encrypted_rounds_over_rabbitmq_and_s3(two_rounds, amqp_url):
    cluster, keys = two_rounds.cluster, two_rounds.keys
    (code1, first), (code2, second) = two_rounds.first, two_rounds.second
    work = cluster.tmp / "work"

    # `keys init` with no profile flag ran the key ceremony through the three running hospital
    # workers, T a majority; each keeps its committee share and adopted the public key
    assert cluster.profile == "threshold"
    assert keys["profile"] == "threshold" and keys["threshold"] == 2 and keys["parties"] == ["h1", "h2", "h3"]
    for hospital in cluster.hospitals:
        share = work / hospital / f"committee-{keys['ceremony_id']}.share"
        assert share.stat().st_mode & 0o777 == 0o600
        adopted = cluster.find_events(hospital, "public_context_taken", ceremony=keys["ceremony_id"])
        assert adopted and adopted[0]["fingerprint"] == keys["fingerprint"][:16], adopted
    assert not (cluster.keys_dir / "secret.ctx").exists()  # no party holds a secret key file

    assert code1 == 0, first
    assert first["status"] == "complete"
    assert sorted(first["contributors"]) == ["h1", "h2", "h3"]
    assert code2 == 0, second
    assert second["round"] == first["round"] + 1
    # round 2 starts from round 1's result
    assert second["base_model_key"] == first["model_key"]
    assert first["model_key"] == rounds.aggregate_key(first["round"])

    store = cluster.store()
    for record in (first, second):
        r = record["round"]
        # the committee decrypted the round: T active members gave partials, everyone decrypted
        assert record["committee"]["decrypted"], record
        outcomes = threshold_flow.outcomes(store, r)
        assert {h: o["decrypted"] for h, o in outcomes.items()} == {h: True for h in cluster.hospitals}
        active = json.loads(cluster.get(threshold_flow.committee_key(r, "active")))
        assert len(active) == 2 and all(cluster.get(threshold_flow.committee_key(r, "partials", m)) for m in active)
        # the count is not in clear: update_ready says 1, the encrypted stream holds it
        assert {_update_message(cluster, r, h)["n_samples"] for h in cluster.hospitals} == {1}
        # every hospital applied the same model: the FedAvg of the updates they encrypted
        sha = hashlib.sha256(cluster.get(record["model_key"])).hexdigest()
        applied = [np.load(work / h / f"base-{sha}.npy") for h in cluster.hospitals]
        expected = _fedavg_from_hospitals(cluster, r, record)
        assert applied[0].shape == expected.shape
        assert np.max(np.abs(applied[0] - expected)) < 1e-6
        assert all(np.array_equal(applied[0], other) for other in applied[1:])

    # round 2's hospitals took round 1's decrypted aggregate as their base model (that they
    # train from it is checked exactly in tests/unit/test_hospital.py)
    state2 = json.loads(cluster.get(rounds.round_key(second["round"])))
    assert state2["base_model_encrypted"] is True and state2["codec_profile"] == "threshold"
    assert state2["base_total_samples"] == first["total_samples"]

    # everything in the bucket is SSE-KMS encrypted
    client = cluster.s3_client()
    keys_in_bucket = cluster.objects()
    assert rounds.update_key(1, "h2") in keys_in_bucket
    for key in keys_in_bucket:
        head = client.head_object(Bucket=cluster.s3["bucket"], Key=key)
        assert head.get("ServerSideEncryption") == "aws:kms", key

    # the bucket's public context is the ceremony's collective key, holding no secret
    public = crypto.load_context(cluster.get("keys/public-context"))
    assert public.profile == "threshold" and public.has_secret_key is False
    assert public.fingerprint == keys["fingerprint"]
    # keys init again, as every automated rollout runs it: --if-absent leaves the key alone
    again = json.loads(cluster.cli("keys", "init", "--if-absent").stdout)
    assert again == {"existing": "keys/public-context", "profile": "threshold", "fingerprint": keys["fingerprint"]}
    assert [k for k in cluster.objects() if k.endswith("/params")] == [f"keys/ceremony/{keys['ceremony_id']}/params"]

    # each hospital decrypted and evaluated round 2's global model
    for hospital in cluster.hospitals:
        evaluated = cluster.wait_for_event(hospital, "global_model_evaluated", round=second["round"])
        assert 0.0 <= evaluated["accuracy"] <= 1.0

    # every worker stops cleanly on SIGTERM, and no message is left anywhere
    codes = cluster.stop_all()
    assert codes == {"aggregator": 0, "h1": 0, "h2": 0, "h3": 0}, codes
    broker = RabbitMQBroker(amqp_url, Topology(cluster.namespace))
    try:
        queues = [broker.topology.aggregator_queue, broker.topology.dead_letter_queue]
        queues += [broker.topology.hospital_queue(h) for h in cluster.hospitals]
        assert {q: broker.queue_depth(q) for q in queues} == {q: 0 for q in queues}
    finally:
        broker.close()


def test_aggregator_refuses_a_secret_context(cluster: Cluster):
    cluster.init_keys()
    result = cluster.cli("aggregator", "--public-context", str(cluster.keys_dir / "secret.ctx"),
                         check=False, timeout=120)
    assert result.returncode == 2
    assert "secret key" in result.stderr.lower()
