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
