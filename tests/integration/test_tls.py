"""AMQPS to the broker: CA verification, host-name checking, client certificates, and a plain
connection refused where TLS is required (issue 10 item 7).

One private RabbitMQ node for the module (``rabbit_node.RabbitNode``: own node name, ports,
data directory) with an AMQPS listener on 127.0.0.1 and 127.0.0.2, serving a certificate for
``localhost``/127.0.0.1 signed by a CA this module makes, and requiring a client certificate
from that CA. The machine's shared broker is never touched.
"""
from __future__ import annotations

import threading
import uuid

import pytest

from cxr_mq.config import load_settings
from cxr_mq.runtime import make_broker
from cxr_mq.transport.base import Delivery, TransportError

from .rabbit_node import RabbitNode, available
from .tls_certs import make_pki

pytestmark = pytest.mark.integration
WAIT = 15.0


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory):
    if not available():
        pytest.skip("rabbitmq-server is not installed")
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    node = RabbitNode(tmp_path_factory.mktemp("tls-node"), tls=pki)
    try:
        node.start()
        yield node, pki
    finally:
        node.stop(timeout=30)
        node.kill()


def _env(node, pki, host="localhost", ca=None, client_cert=True, scheme="amqps", required=True):
    port = node.tls_port if scheme == "amqps" else node.port
    env = {"CXR_MQ_AMQP_URL": f"{scheme}://guest:guest@{host}:{port}/%2F",
           "CXR_MQ_AMQP_CA_FILE": str(ca or pki.ca),
           "CXR_MQ_AMQP_TLS_REQUIRED": "true" if required else "false",
           "CXR_MQ_NAMESPACE": f"t{uuid.uuid4().hex[:10]}"}
    if client_cert:
        env.update(CXR_MQ_AMQP_CERT_FILE=str(pki.client_cert), CXR_MQ_AMQP_KEY_FILE=str(pki.client_key))
    return env


def _broker(env, **options):
    broker = make_broker(load_settings(env=env, config_path=None))
    broker._reconnect_for = options.get("reconnect_for", 20.0)
    return broker


def test_worker_connects_over_tls_and_a_message_round_trips(tls_node):
    node, pki = tls_node
    env = _env(node, pki)
    consumer, publisher = _broker(env), _broker(env)
    got: list[Delivery] = []
    arrived, stop = threading.Event(), threading.Event()

    def handler(delivery: Delivery) -> None:
        got.append(delivery)
        arrived.set()
    try:
        consumer.declare_topology(["h1"])
        consumer.consume(consumer.topology.hospital_queue("h1"), handler)
        thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        thread.start()
        publisher.publish("round_start", b"over tls", message_id="m1")
        assert arrived.wait(WAIT), "the message never came back over the TLS connection"
        assert got[0].body == b"over tls" and got[0].message_id == "m1"
        # the broker sees TLS connections that presented the client certificate
        listing = node.ctl("list_connections", "ssl", "peer_cert_subject").stdout
        rows = [line for line in listing.splitlines() if "cxr-mq-test-client" in line]
        assert len(rows) >= 2 and all(line.split("\t")[0] == "true" for line in rows), listing
        stop.set()
        thread.join(WAIT)
        publisher.delete_topology(["h1"])
    finally:
        stop.set()
        consumer.close()
        publisher.close()


@pytest.mark.parametrize("case, expected", [
    ("wrong CA", "self-signed certificate in certificate chain"),
    ("wrong host name", "certificate is not valid for '127.0.0.2'"),
])
def test_a_broker_that_fails_verification_is_refused_at_once(tls_node, case, expected):
    node, pki = tls_node
    env = (_env(node, pki, ca=pki.other_ca) if case == "wrong CA"
           else _env(node, pki, host="127.0.0.2"))  # same node, an address its certificate lacks
    broker = _broker(env, reconnect_for=600.0)  # refused at once, not retried for 10 minutes
    try:
        with pytest.raises(TransportError, match="broker certificate refused") as info:
            broker.declare_topology()
        assert expected in str(info.value)
    finally:
        broker.close()


def test_a_plain_url_is_refused_before_connecting_where_tls_is_required(tls_node):
    node, pki = tls_node
    # the node's plain listener would accept this connection: the client refuses it first
    env = _env(node, pki, scheme="amqp", host="127.0.0.1", client_cert=False)
    with pytest.raises(TransportError, match=r"TLS is required .* plain amqp:// .*use amqps://"):
        make_broker(load_settings(env=env, config_path=None))
    # without the requirement (and no CA set) the same URL connects: the refusal above is ours
    env = {k: v for k, v in env.items() if k not in ("CXR_MQ_AMQP_CA_FILE",)}
    env["CXR_MQ_AMQP_TLS_REQUIRED"] = "false"
    broker = _broker(env)
    try:
        broker.declare_topology()
        broker.delete_topology()
    finally:
        broker.close()
