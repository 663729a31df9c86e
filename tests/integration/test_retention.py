"""Retention of individual updates and of plaintext updates (issue 10 items 9 and 10).

One federation (aggregator and three hospitals as OS processes, the real RabbitMQ, moto's S3
with KMS; the hospitals run ``--synthetic``: a seeded update in place of TensorFlow training,
everything else, encryption included, as in production) with the production defaults (and the hospitals' secret key KMS-wrapped at rest): individual updates are deleted once their
round is finished and announced, and hospitals keep no plaintext update (except ``h1``,
which keeps one round's worth, to show the opt-in and its pruning).
"""
from __future__ import annotations

import signal
import uuid

import numpy as np
import pytest

from cxr_mq import rounds
from cxr_mq.transport.base import Topology
from cxr_mq.transport.rabbitmq import RabbitMQBroker

from .cluster import Cluster

pytestmark = pytest.mark.integration

HOSPITALS = ("h1", "h2", "h3")
ROUND = ("--quorum", "3", "--min-clients", "3", "--deadline", "300", "--synthetic-params", "4096")
KEEP_ONE = {"CXR_MQ_KEEP_PLAINTEXT_UPDATES": "1"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, amqp_url, s3_settings_module):
    # compact: this module is about retention (with a KMS-wrapped secret key file), not the codec profile (the threshold
    # profile's ceremony and committee are test_round.py's and test_threshold_rounds.py's)
    cluster = Cluster(tmp_path_factory.mktemp("retention"), amqp_url, s3_settings_module,
                      f"t{uuid.uuid4().hex[:10]}", HOSPITALS, synthetic=True, retain=False, profile="compact")
    cluster.init_keys()
    # the hospitals' secret key is KMS-wrapped in place, as a deployment keeps it at rest
    secret = str(cluster.keys_dir / "secret.ctx")
    cluster.cli("keys", "wrap", secret, "--out", secret, "--force")
    yield cluster
    cluster.stop_all()
    broker = RabbitMQBroker(amqp_url, Topology(cluster.namespace), reconnect_for=10)
    try:
        broker.delete_topology(HOSPITALS)
    finally:
        broker.close()


@pytest.fixture(scope="module")
def s3_settings_module(moto_endpoint, aws_env):
    import boto3
    region = "us-east-1"
    key_id = boto3.client("kms", endpoint_url=moto_endpoint, region_name=region).create_key(
        Description="cxr-mq retention")["KeyMetadata"]["KeyId"]
    bucket = f"cxr-retention-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=region).create_bucket(Bucket=bucket)
    return {"endpoint_url": moto_endpoint, "bucket": bucket, "kms_key_id": key_id, "region": region}


def start(cluster: Cluster, name: str, env: dict | None = None, wait: bool = True) -> int:
    """(Re)start ``name`` with exactly ``env`` added; returns its event mark."""
    if cluster.running(name):
        assert cluster.terminate(name) == 0, f"{name} did not exit 0 on SIGTERM"
    mark = cluster.mark(name)
    env = {**(KEEP_ONE if name == "h1" else {}), **(env or {})}
    if name == "aggregator":
        cluster.start_aggregator(env=env)
    else:
        cluster.start_hospital(name, env=env)
    if wait:
        cluster.wait_for_event(name, "worker_started", after=mark, timeout=180)
    return mark


def ensure_running(cluster: Cluster, *names: str) -> None:
    """Workers running without test hooks, whatever an earlier test left."""
    for name in names:
        expected = KEEP_ONE if name == "h1" else {}
        if not cluster.running(name) or cluster.spawn_env.get(name) != expected:
            start(cluster, name, wait=False)
    for name in names:
        cluster.wait_for_event(name, "worker_started", after=0, timeout=180)


def update_objects(cluster: Cluster, round_no: int) -> list[str]:
    return sorted(k for k in cluster.objects() if k.startswith(rounds.updates_prefix(round_no)))


def plaintext_updates(cluster: Cluster, hospital: str) -> list[str]:
    return sorted(p.name for p in (cluster.tmp / "work" / hospital).glob("update-*.npy"))


def test_updates_are_deleted_after_the_round_and_restarts_stay_byte_identical(federation):
    cluster = federation
    ensure_running(cluster, "h1", "h3")
    # the aggregator dies after writing the aggregate (before the round is marked complete),
    # h2 after its update_ready is confirmed (before acking round_start): both restarts need
    # the update objects and the manifest, so nothing may be deleted yet
    start(cluster, "aggregator", {"CXR_MQ_FAULTS": "crash:aggregator.after_aggregate"})
    start(cluster, "h2", {"CXR_MQ_FAULTS": "crash:hospital.after_publish"})
    round_no = cluster.open_round(*ROUND)
    assert cluster.wait_exit("h2", timeout=300) == -signal.SIGKILL
    assert cluster.wait_exit("aggregator", timeout=300) == -signal.SIGKILL
    expected_updates = sorted([rounds.update_key(round_no, h) for h in HOSPITALS]
                              + [rounds.update_message_key(round_no, h) for h in HOSPITALS])
    assert update_objects(cluster, round_no) == expected_updates
    reference = cluster.fault_free_aggregate(round_no, HOSPITALS)

    # h2 answers the redelivered round_start from its manifest; the aggregator, restarted,
    # rebuilds the round from the update objects, announces, and dies before deleting
    h2_mark = start(cluster, "h2")
    cluster.wait_for_event("h2", "republishing_update", after=h2_mark, round=round_no)
    # (it restores, completes and announces the round while starting up)
    start(cluster, "aggregator", {"CXR_MQ_FAULTS": "crash:aggregator.after_announce"}, wait=False)
    assert cluster.wait_exit("aggregator", timeout=300) == -signal.SIGKILL
    state = cluster.state(round_no)
    assert state["announced"] and not state["updates_deleted"]
    assert update_objects(cluster, round_no) == expected_updates
    # restarted once more, it finishes the deletion it was cut short in
    mark = start(cluster, "aggregator")
    deleted = cluster.wait_for_event("aggregator", "updates_deleted", after=mark, round=round_no)
    assert deleted["objects"] == 6

    state = cluster.state(round_no)
    assert state["status"] == "complete" and state["updates_deleted"]
    assert sorted(a["hospital"] for a in state["accepted"]) == list(HOSPITALS)
    assert update_objects(cluster, round_no) == []
    # the aggregate stays, byte-identical to the fault-free sum of the (now deleted) updates
    assert cluster.get(state["model_key"]) == reference
    for hospital in HOSPITALS:
        cluster.wait_for_event(hospital, "global_model_applied", round=round_no, timeout=120)
    assert not cluster.find_events("h2", "training_started", after=h2_mark, round=round_no)
    assert cluster.dead_letters() == []


def test_retain_updates_keeps_them_and_plaintext_updates_are_opt_in_and_pruned(federation):
    cluster = federation
    ensure_running(cluster, "h1", "h2", "h3")
    start(cluster, "aggregator", {"CXR_MQ_RETAIN_UPDATES": "true"})
    # plaintext updates of an earlier round, as an older version left them
    for hospital in ("h1", "h2"):
        np.save(cluster.tmp / "work" / hospital / "update-000000.npy", np.zeros(3, np.float32))
    round_no = cluster.open_round(*ROUND)
    state = cluster.wait_finished(round_no)
    assert state["status"] == "complete" and not state["updates_deleted"]
    assert update_objects(cluster, round_no) == sorted(
        [rounds.update_key(round_no, h) for h in HOSPITALS]
        + [rounds.update_message_key(round_no, h) for h in HOSPITALS])
    assert cluster.get(state["model_key"]) == cluster.fault_free_aggregate(round_no, HOSPITALS)

    # h1 (keep_plaintext_updates = 1) keeps this round's plaintext, mode 0600, nothing older;
    # h2 and h3 (the default) keep none, and h2's leftover is gone
    assert plaintext_updates(cluster, "h1") == [f"update-{round_no:06d}.npy"]
    kept = cluster.tmp / "work" / "h1" / f"update-{round_no:06d}.npy"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert np.load(kept).size == cluster.update_message(round_no, "h1")["n_params"]
    assert plaintext_updates(cluster, "h2") == plaintext_updates(cluster, "h3") == []
