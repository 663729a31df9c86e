"""Scale and availability (issue 13): the controller rides out broker restarts, round numbers
and round records are claimed with conditional writes, a standby aggregator takes over, and
a round survives losing the RabbitMQ node that leads its queues.

Hospitals here run with ``--synthetic`` (a seeded synthetic update instead of TensorFlow
training; encryption, upload, messages, aggregation and decryption are the real code), which
keeps these multi-process tests within their time budget. Broker restarts and clusters run
on RabbitMQ nodes of the test's own (``rabbit_node.py``); the shared broker is never touched.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import boto3
import pytest

from cxr_mq import controller, rounds, training
from cxr_mq.rounds import RoundState, StateConflict
from cxr_mq.transport.base import Topology
from cxr_mq.transport.embedded import EmbeddedBroker, EmbeddedServer

from .cluster import Cluster
from .rabbit_node import rabbit_node_factory  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

SYNTHETIC_PARAMS = "4096"


def _bucket(endpoint: str) -> dict:
    region = "us-east-1"
    key_id = boto3.client("kms", endpoint_url=endpoint, region_name=region).create_key(
        Description="cxr-mq scale")["KeyMetadata"]["KeyId"]
    bucket = f"cxr-scale-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=region).create_bucket(Bucket=bucket)
    return {"endpoint_url": endpoint, "bucket": bucket, "kms_key_id": key_id, "region": region}


def _store(kind: str, tmp_path, request):
    if kind == "local":
        from cxr_mq.storage.local import LocalStore
        return LocalStore(tmp_path / "store")
    from cxr_mq.storage.s3 import S3Store
    settings = request.getfixturevalue("s3_settings")
    return S3Store(bucket=settings["bucket"], endpoint_url=settings["endpoint_url"],
                   kms_key_id=settings["kms_key_id"], region=settings["region"])


class _ListedTogether:
    """A store whose ``list`` returns only once every controller has listed: all of them see
    the same rounds and pick the same next number, which is the race being tested."""

    def __init__(self, inner, parties: int):
        self._inner, self._barrier = inner, threading.Barrier(parties, timeout=60)
        self._first = threading.local()

    def list(self, prefix=""):
        keys = self._inner.list(prefix)
        if not getattr(self._first, "done", False):
            self._first.done = True
            self._barrier.wait()
        return keys

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Codec:
    """What ``open_round`` reads from the public context: its fingerprint and profile."""
    fingerprint, profile = "ab" * 32, "compact"


# -- item 2: no double rounds -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_controllers_open_distinct_rounds(kind, tmp_path, request):
    store = _store(kind, tmp_path, request)
    controllers = 4
    racing = _ListedTogether(store, controllers)
    server = EmbeddedServer()
    topology = Topology(f"t{uuid.uuid4().hex[:8]}")
    watcher = EmbeddedBroker(server, topology)
    watcher.declare_topology()
    request_ = controller.RoundRequest(quorum=1, min_clients=1, deadline_seconds=60,
                                       training=training.TrainingParams(), synthetic_params=64,
                                       min_clients_floor=1)  # rounds of one: only numbers matter here
    opened, errors = [], []

    def open_one():
        try:
            with EmbeddedBroker(server, topology) as broker:
                opened.append(controller.open_round(broker, racing, _Codec(), request_))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=open_one) for _ in range(controllers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    numbers = sorted(m["round"] for m in opened)
    assert numbers == [1, 2, 3, 4]  # all four listed no round and asked for round 1
    published = []
    while (delivery := watcher.get(topology.aggregator_queue, timeout=0.5)) is not None:
        from cxr_mq import messages
        published.append(messages.decode(delivery.body))
    assert sorted(m["round"] for m in published) == numbers  # each round published once
    for message in opened:  # each record is its own controller's, and its base model is there
        assert rounds.read_json(store, rounds.round_key(message["round"])) == message
        assert store.describe(message["base_model_key"])["sha256"] == message["base_model_sha256"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_stale_aggregator_cannot_overwrite_the_round_record(kind, tmp_path, request):
    store = _store(kind, tmp_path, request)
    first = RoundState(round=3, quorum=2, min_clients=2, deadline=time.time() + 60, n_params=8,
                       key_fingerprint="ab" * 32)
    first.save(store)
    with pytest.raises(StateConflict, match="round 3"):  # a second creator loses
        RoundState(**{**first.to_dict(), "quorum": 1}).save(store)
    active, stale = RoundState.load(store, 3), RoundState.load(store, 3)
    active.accepted.append({"hospital": "h1", "key": "k", "sha256": "0" * 64, "n_samples": 1})
    active.save(store)
    stale.status, stale.reason = "aborted", "deadline passed"
    with pytest.raises(StateConflict):
        stale.save(store)
    stored = RoundState.load(store, 3)
    assert stored.status == "open" and stored.contributors == ["h1"]
    stored.accepted.append({"hospital": "h2", "key": "k2", "sha256": "1" * 64, "n_samples": 1})
    stored.save(store)  # the re-read copy moves on
    assert RoundState.load(store, 3).contributors == ["h1", "h2"]


# -- item 1: the controller survives broker restarts ------------------------------------------
def _synthetic_federation(tmp_path, amqp_url: str, endpoint: str, hospitals=("h1", "h2")) -> Cluster:
    cluster = Cluster(tmp_path, amqp_url, _bucket(endpoint), f"t{uuid.uuid4().hex[:10]}",
                      hospitals, synthetic=True)
    cluster.env["CXR_MQ_MIN_CLIENTS_FLOOR"] = "1"  # two hospitals: rounds below the default floor of 3
    cluster.init_keys()
    return cluster


def _start_controller(cluster: Cluster, *args) -> tuple[subprocess.Popen, object]:
    out = open(cluster.tmp / "controller.out", "wb")
    err = open(cluster.tmp / "controller.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cxr_mq.cli", "start-round", "--wait", "--json",
                             "--synthetic-params", SYNTHETIC_PARAMS, *args],
                            env=cluster.env, stdout=out, stderr=err)
    out.close()
    err.close()
    return proc


def _controller_events(cluster: Cluster, event: str) -> list[dict]:
    found = []
    for line in (cluster.tmp / "controller.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def _wait_controller(cluster: Cluster, event: str, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_controller_events(cluster, event)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"controller never logged {event} x{count}:\n"
                         + (cluster.tmp / "controller.log").read_text()[-3000:])


def test_controller_wait_survives_broker_restart_and_sigkill(rabbit_node_factory, tmp_path,
                                                             moto_endpoint, aws_env):
    node = rabbit_node_factory()
    cluster = _synthetic_federation(tmp_path, node.url, moto_endpoint)
    try:
        cluster.start_aggregator()
        cluster.start_hospital("h1")
        for name in ("aggregator", "h1"):
            cluster.wait_for_event(name, "worker_started", timeout=120)
        proc = _start_controller(cluster, "--quorum", "2", "--deadline", "300")
        cluster.wait_for_event("aggregator", "update_accepted", hospital="h1", timeout=120)
        node.restart()  # graceful: the exclusive reply queue goes with the connection
        _wait_controller(cluster, "broker_reconnected", 1)
        node.crash()  # SIGKILL, then boot on the same data directory
        node.start()
        _wait_controller(cluster, "broker_reconnected", 2)
        cluster.start_hospital("h2")  # the round can complete only now
        assert proc.wait(timeout=180) == 0, (cluster.tmp / "controller.log").read_text()[-3000:]
        result = json.loads((cluster.tmp / "controller.out").read_text().strip().splitlines()[-1])
        assert result["status"] == "complete" and result["contributors"] == ["h1", "h2"]
        log = (cluster.tmp / "controller.log").read_text()
        assert "ACCESS_REFUSED" not in log and "amq.gen" not in log
        received = _controller_events(cluster, "round_outcome_received")
        assert len(received) == 1 and received[0]["round"] == result["round"]
        state = cluster.wait_finished(result["round"])
        assert sorted(a["hospital"] for a in state["accepted"]) == ["h1", "h2"]
        assert cluster.get(state["model_key"]) == cluster.fault_free_aggregate(result["round"],
                                                                               ["h1", "h2"])
    finally:
        cluster.stop_all()
