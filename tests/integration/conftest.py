"""Fixtures shared by integration modules: one two-round federation over the real RabbitMQ and
moto's S3, run once per session for every test that only looks at what it left behind (the
spine test's checks, ``cxr-mq report``, the report page in a browser)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from cxr_mq.transport.base import Topology
from cxr_mq.transport.rabbitmq import RabbitMQBroker

from tests.conftest import new_bucket, new_namespace
from .cluster import Cluster

# --max-samples: the threshold encoding's weight-1 count, close to the largest hospital's (48
# images) for precision
ROUND_ARGS = ("--quorum", "3", "--image-size", "32", "--epochs", "1", "--deadline", "300",
              "--max-samples", "60")


@dataclass
class TwoRounds:
    cluster: Cluster
    keys: dict                  # what `keys init` printed
    first: tuple[int, dict]     # (exit code, `start-round --wait --json` output)
    second: tuple[int, dict]


@pytest.fixture(scope="session")
def two_rounds(tmp_path_factory, amqp_url, moto_endpoint, aws_env):
    """An aggregator and three hospitals as OS processes under the default (threshold)
    profile: ``keys init`` runs the key ceremony through the hospitals, then two encrypted
    FedAvg rounds (the second with server learning rate 1.5 and no class balancing), the
    committee decrypting each, every hospital having evaluated round 2's model. Tests that
    stop the workers may; the store stays."""
    cluster = Cluster(tmp_path_factory.mktemp("two-rounds"), amqp_url, new_bucket(moto_endpoint),
                      new_namespace(), audit=True)  # test_iam_policies.py checks the S3 calls
    try:
        cluster.make_data()
        keys = cluster.init_keys()  # the hospitals start, then the ceremony runs through them
        cluster.start_all()
        first = cluster.start_round(*ROUND_ARGS)
        second = cluster.start_round(*ROUND_ARGS, "--server-lr", "1.5", "--balance", "none")
        if first[0] == 0 and second[0] == 0:
            for hospital in cluster.hospitals:
                cluster.wait_for_event(hospital, "global_model_evaluated", round=second[1]["round"])
        yield TwoRounds(cluster, keys, first, second)
    finally:
        cluster.stop_all()
        broker = RabbitMQBroker(amqp_url, Topology(cluster.namespace))
        try:
            broker.delete_topology(cluster.hospitals)
        finally:
            broker.close()
