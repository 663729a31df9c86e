"""The spine: an aggregator and three hospitals as OS processes run two encrypted FedAvg
rounds over the real RabbitMQ and moto's S3 server (the session's ``two_rounds`` federation,
which the report tests read too)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cxr_mq import crypto, rounds
from cxr_mq.transport.base import Topology
from cxr_mq.transport.rabbitmq import RabbitMQBroker

from .cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path, amqp_url, s3_settings, namespace):
    c = Cluster(tmp_path, amqp_url, s3_settings, namespace)
    yield c
    c.stop_all()
    broker = RabbitMQBroker(amqp_url, Topology(namespace))
    broker.delete_topology(c.hospitals)
    broker.close()


def _fedavg_from_hospitals(cluster: Cluster, round_no: int, record: dict) -> np.ndarray:
    """Plaintext sample-weighted FedAvg of the weights each hospital kept locally."""
    total, weighted = 0, None
    for hospital in record["contributors"]:
        weights = np.load(cluster.tmp / "work" / hospital / f"update-{round_no:06d}.npy").astype(np.float64)
        message = json.loads(json.dumps(_update_message(cluster, round_no, hospital)))
        n = message["n_samples"]
        weighted = weights * n if weighted is None else weighted + weights * n
        total += n
    assert total == record["total_samples"]
    return weighted / total


def _update_message(cluster: Cluster, round_no: int, hospital: str) -> dict:
    from cxr_mq import messages
    return messages.decode(cluster.get(rounds.update_message_key(round_no, hospital)))


def test_two_encrypted_rounds_over_rabbitmq_and_s3(two_rounds, amqp_url):
    cluster, keys = two_rounds.cluster, two_rounds.keys
    (code1, first), (code2, second) = two_rounds.first, two_rounds.second
    assert code1 == 0, first
    assert first["status"] == "complete"
    assert sorted(first["contributors"]) == ["h1", "h2", "h3"]
    assert code2 == 0, second
    assert second["round"] == first["round"] + 1
    # round 2 starts from round 1's result
    assert second["base_model_key"] == first["model_key"]
    assert first["model_key"] == rounds.aggregate_key(first["round"])

    secret = crypto.load_context_file(cluster.keys_dir / "secret.ctx")
    for record in (first, second):
        aggregate = cluster.get(record["model_key"])
        decrypted = secret.decrypt_aggregate(io.BytesIO(aggregate), record["total_samples"])
        expected = _fedavg_from_hospitals(cluster, record["round"], record)
        assert decrypted.shape == expected.shape
        assert np.max(np.abs(decrypted - expected)) < 1e-6

    # round 2's hospitals took round 1's decrypted aggregate as their base model (that they
    # train from it is checked exactly in tests/unit/test_hospital.py)
    state2 = json.loads(cluster.get(rounds.round_key(second["round"])))
    assert state2["base_model_encrypted"] is True
    assert state2["base_total_samples"] == first["total_samples"]
    first_model = secret.decrypt_aggregate(io.BytesIO(cluster.get(first["model_key"])),
                                           first["total_samples"]).astype(np.float32)
    for hospital in second["contributors"]:
        base = np.load(cluster.tmp / "work" / hospital / f"base-{state2['base_model_sha256']}.npy")
        assert np.array_equal(base, first_model), f"{hospital}'s round-2 base is not round 1's model"

    # everything in the bucket is SSE-KMS encrypted
    client = cluster.s3_client()
    keys_in_bucket = cluster.objects()
    assert rounds.update_key(1, "h2") in keys_in_bucket
    for key in keys_in_bucket:
        head = client.head_object(Bucket=cluster.s3["bucket"], Key=key)
        assert head.get("ServerSideEncryption") == "aws:kms", key

    # the aggregator's context (the bucket's public context) holds no secret key
    public = crypto.load_context(cluster.get("keys/public-context"))
    assert public.has_secret_key is False
    assert public.fingerprint == keys["fingerprint"] == secret.fingerprint

    # each hospital decrypted and evaluated round 2's global model
    for hospital in cluster.hospitals:
        evaluated = cluster.wait_for_event(hospital, "global_model_evaluated", round=second["round"])
        assert 0.0 <= evaluated["accuracy"] <= 1.0

    # evaluate and predict decrypt round 2's model with the secret context
    secret_arg = ["--secret-context", str(cluster.keys_dir / "secret.ctx")]
    evaluated = json.loads(cluster.cli("evaluate", "--round", str(second["round"]), "--data",
                                       str(cluster.data_dirs["h1"]), "--json", *secret_arg).stdout)
    assert evaluated["round"] == second["round"]
    confusion = np.array(evaluated["confusion_matrix"])
    assert confusion.sum() == evaluated["n"] > 0
    assert evaluated["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
    image = sorted(cluster.data_dirs["h2"].glob("*.png"))[0]
    predicted = json.loads(cluster.cli("predict", str(image), "--json", *secret_arg).stdout)
    assert predicted[0]["round"] == second["round"]
    assert abs(sum(predicted[0]["probabilities"].values()) - 1.0) < 1e-4
    no_secret = cluster.cli("evaluate", "--data", str(cluster.data_dirs["h1"]),
                            "--secret-context", str(cluster.keys_dir / "public.ctx"), check=False)
    assert no_secret.returncode == 2 and "no secret key" in no_secret.stderr

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
