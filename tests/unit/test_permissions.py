"""The per-party broker permissions allow what each role does and nothing else."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cxr_mq.cli import main
from cxr_mq.transport.base import Topology
from cxr_mq.transport.permissions import permissions_for

T = Topology("ns-1")


def test_hospital_reads_only_its_queue_and_publishes_only_updates():
    p = permissions_for("hospital", "h1", "ns-1")
    assert p.user == "h1"
    assert not p.allows("configure", T.hospital_queue("h1"))
    assert not p.allows("configure", T.control_exchange)
    assert p.allows("read", T.hospital_queue("h1"))
    for other in (T.hospital_queue("h10"), T.hospital_queue("h2"), T.aggregator_queue,
                  T.dead_letter_queue, "x" + T.hospital_queue("h1")):
        assert not p.allows("read", other), other
    assert p.allows("write", T.control_exchange) and p.allows("write", T.dead_letter_exchange)
    assert not p.allows("write", T.hospital_queue("h1"))
    assert p.allows_topic("write", T.control_exchange, "update_ready")
    for key in ("round_start", "model_ready", "round_aborted", "update_ready.x"):
        assert not p.allows_topic("write", T.control_exchange, key), key


def test_aggregator_and_controller():
    agg = permissions_for("aggregator", "agg", "ns-1")
    assert agg.allows("read", T.aggregator_queue) and not agg.allows("read", T.hospital_queue("h1"))
    assert not agg.allows("configure", T.aggregator_queue)
    assert {k for k in ("round_start", "update_ready", "model_ready", "round_aborted")
            if agg.allows_topic("write", T.control_exchange, k)} == {"model_ready", "round_aborted"}
    ctl = permissions_for("controller", "ctl", "ns-1")
    assert ctl.allows("configure", "amq.gen-Xy_12") and not ctl.allows("configure", T.aggregator_queue)
    assert ctl.allows("write", "amq.gen-Xy_12") and ctl.allows("read", T.control_exchange)
    assert not ctl.allows("read", T.aggregator_queue) and not ctl.allows("read", T.dead_letter_queue)
    assert [k for k in ("round_start", "update_ready") if ctl.allows_topic("write", T.control_exchange, k)] \
        == ["round_start"]
    assert ctl.allows_topic("read", T.control_exchange, "model_ready")
    assert not ctl.allows_topic("read", T.control_exchange, "update_ready")


def test_namespace_dots_are_literal():
    p = permissions_for("hospital", "h1", "a.b")
    assert p.allows("read", "a.b.hospital.h1") and not p.allows("read", "aXb.hospital.h1")


def test_cli_prints_json_and_rabbitmqctl_lines():
    runner = CliRunner()
    result = runner.invoke(main, ["broker", "permissions", "--role", "hospital", "--id", "h1",
                                  "--namespace", "ns-1", "--json"], env={"CXR_MQ_CONFIG": ""})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data == {**permissions_for("hospital", "h1", "ns-1").to_dict(), "vhost": "/",
                    "namespace": "ns-1"}
    lines = runner.invoke(main, ["broker", "permissions", "--role", "controller", "--id", "ctl"],
                          env={"CXR_MQ_CONFIG": ""}).output.splitlines()
    assert lines[0].startswith("rabbitmqctl set_permissions -p / ctl '^(amq\\.gen-.*)$'")
    assert lines[1].startswith("rabbitmqctl set_topic_permissions -p / ctl cxr.control '^(round_start|ceremony_start|ceremony_finalize)$'")


@pytest.mark.parametrize("args", [["--role", "nobody", "--id", "h1"], ["--role", "hospital", "--id", "../x"]])
def test_cli_refuses_bad_role_or_id(args):
    result = CliRunner().invoke(main, ["broker", "permissions", *args], env={"CXR_MQ_CONFIG": ""})
    assert result.exit_code == 2


def test_the_embedded_broker_enforces_them_as_rabbitmq_does():
    from cxr_mq.transport.base import TransportError
    from cxr_mq.transport.embedded import EmbeddedBroker, EmbeddedServer

    server, topo = EmbeddedServer(), Topology("ns-1")

    def login(role, party):
        return EmbeddedBroker(server, topo, user=party, permissions=permissions_for(role, party, "ns-1"))
    h1, agg, ctl = login("hospital", "h1"), login("aggregator", "agg"), login("controller", "ctl")
    with pytest.raises(TransportError, match="topology missing"):
        h1.declare_topology(["h1"])  # may not configure: checks passively, nothing is there yet
    EmbeddedBroker(server, topo, user="admin").declare_topology(["h1", "h2"])
    for party, hospitals in ((h1, ["h1"]), (agg, ["h1", "h2"]), (ctl, ["h1", "h2"])):
        party.declare_topology(hospitals)  # now the passive check passes
    with pytest.raises(TransportError, match="topology missing"):
        h1.declare_topology(["h3"])
    reply = ctl.temporary_queue(["model_ready", "round_aborted"])
    assert reply.startswith("amq.gen-")
    ctl.publish("round_start", b"x")
    h1.publish("update_ready", b"u")
    agg.publish("model_ready", b"m")
    assert h1.get(topo.hospital_queue("h1"), 1).body == b"x"
    assert agg.get(topo.aggregator_queue, 1).body == b"x"
    assert agg.get(topo.aggregator_queue, 1).user_id == "h1"
    assert ctl.get(reply, 1).user_id == "agg"
    refused = [
        lambda: h1.publish("model_ready", b"forged"),
        lambda: h1.publish("round_start", b"forged"),
        lambda: agg.publish("update_ready", b"forged"),
        lambda: h1.get(topo.aggregator_queue, 0),
        lambda: h1.get(topo.hospital_queue("h2"), 0),
        lambda: h1.consume(topo.hospital_queue("h2"), lambda d: None),
        lambda: agg.get(topo.dead_letter_queue, 0),
        lambda: h1.temporary_queue(["update_ready"]),
        lambda: ctl.temporary_queue(["update_ready"]),  # may bind only to outcomes
        lambda: ctl.delete_topology(["h1"]),
    ]
    for attempt in refused:
        with pytest.raises(TransportError, match="403 ACCESS_REFUSED"):
            attempt()
