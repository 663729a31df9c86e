"""Nobody forges, replays or redirects an update: attacks over the real RabbitMQ and moto's
S3/KMS, with one broker user per party (least privilege) as a deployment has them.

The test creates its parties' broker users on the shared broker, with names of its own
(``<party>-<suffix>``; the user name is the party id), and deletes them afterwards. The
aggregator, the controller and two hospitals are real processes, each with its own login
and identity. The third hospital is played by the test: a dishonest but registered member,
with its own broker login and its own identity key, which mounts the attacks and also sends
an honest update (encrypted for real with the secret context), so each round completes on
honest updates only. Every attack must be dead-lettered with its reason, shown by
``cxr-mq status``, and change nothing in the sum.
"""
from __future__ import annotations

import io
import json
import re
import secrets
import subprocess
import time
import uuid

import numpy as np
import pika
import pika.exceptions as pex
import pytest

from cxr_mq import bound, crypto, identity, messages, rounds
from cxr_mq.transport.base import REASON_HEADER, USER_HEADER, Topology
from cxr_mq.transport.permissions import permissions_for
from cxr_mq.transport.rabbitmq import RabbitMQBroker

from .cluster import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAINING = ("--image-size", "32", "--epochs", "1")


def _rabbitmqctl_eval(expression: str) -> None:
    """One ``rabbitmqctl eval`` for several user operations (each separate call costs a VM
    start, about a second)."""
    subprocess.run(["rabbitmqctl", "eval", expression], check=True, capture_output=True, timeout=60)


def _bin(text: str) -> str:
    return '<<"' + text.replace("\\", "\\\\").replace('"', '\\"') + '">>'


class BrokerUsers:
    """Per-party users on the shared broker, each with ``cxr-mq broker permissions``."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.passwords: dict[str, str] = {}

    def create(self, parties: dict[str, str]) -> None:
        calls = []
        for party, role in parties.items():
            password = secrets.token_hex(16)
            perms = permissions_for(role, party, self.namespace)
            calls += [
                f"rabbit_auth_backend_internal:add_user({_bin(party)}, {_bin(password)}, <<\"cxr-test\">>)",
                f"rabbit_auth_backend_internal:set_permissions({_bin(party)}, <<\"/\">>, "
                f"{_bin(perms.configure)}, {_bin(perms.write)}, {_bin(perms.read)}, <<\"cxr-test\">>)",
                f"rabbit_auth_backend_internal:set_topic_permissions({_bin(party)}, <<\"/\">>, "
                f"{_bin(perms.topic_exchange)}, {_bin(perms.topic_write)}, {_bin(perms.topic_read)}, "
                "<<\"cxr-test\">>)"]
            self.passwords[party] = password
        _rabbitmqctl_eval(", ".join(calls) + ".")

    def url(self, base: str, party: str) -> str:
        params = pika.URLParameters(base)
        return f"amqp://{party}:{self.passwords[party]}@{params.host}:{params.port}/%2F"

    def delete(self) -> None:
        if self.passwords:
            _rabbitmqctl_eval(", ".join(
                f"rabbit_auth_backend_internal:delete_user({_bin(p)}, <<\"cxr-test\">>)"
                for p in self.passwords) + ".")


@pytest.fixture
def federation(tmp_path, amqp_url, s3_settings):
    sfx = uuid.uuid4().hex[:8]
    h1, h2, h3 = (f"{h}-{sfx}" for h in ("h1", "h2", "h3"))
    namespace = f"t{sfx}"
    # compact: this module is about broker users and identities, not the codec profile (the threshold
    # profile's ceremony and committee are test_round.py's and test_threshold_rounds.py's)
    cluster = Cluster(tmp_path, amqp_url, s3_settings, namespace, hospitals=(h1, h2, h3),
                      controller_id=f"ctl-{sfx}", aggregator_id=f"agg-{sfx}", profile="compact")
    users = BrokerUsers(namespace)
    try:
        # the admin (guest) declares the topology; nobody else may
        declared = json.loads(cluster.cli("broker", "declare").stdout)
        assert declared["queues"][-1] == Topology(namespace).hospital_queue(h3)
        users.create({cluster.controller_id: "controller", cluster.aggregator_id: "aggregator",
                      h1: "hospital", h2: "hospital", h3: "hospital"})
        cluster.env["CXR_MQ_SHARED_BROKER_USERS"] = ""  # strict: every login is its own party
        cluster.env["CXR_MQ_MIN_CLIENTS_FLOOR"] = "1"  # round 2 takes h3 alone: below the default floor
        cluster.init_keys()
        cluster.make_data(n=24)
        cluster.users = users
        cluster.env_for = lambda party: {**cluster.env, "CXR_MQ_AMQP_URL": users.url(amqp_url, party)}
        cluster.start_aggregator(env={"CXR_MQ_AMQP_URL": users.url(amqp_url, cluster.aggregator_id)})
        for hospital in (h1, h2):
            cluster.start_hospital(hospital, env={"CXR_MQ_AMQP_URL": users.url(amqp_url, hospital)})
        yield cluster
    finally:
        cluster.stop_all()
        try:
            admin = RabbitMQBroker(amqp_url, Topology(namespace), reconnect_for=10)
            admin.delete_topology(cluster.hospitals)
            admin.close()
        finally:
            users.delete()


def _open_round(cluster: Cluster, *args) -> int:
    result = cluster.cli("start-round", "--json", *args, env=cluster.env_for(cluster.controller_id))
    return json.loads(result.stdout.strip().splitlines()[-1])["round"]


def _publish(cluster: Cluster, party: str, body: bytes, routing_key: str = "update_ready",
             user_id: str | None = "login") -> None:
    cluster.publish_raw(routing_key, body, url=cluster.users.url(cluster.amqp_url, party),
                        user_id=user_id)


def _wait_accepted(cluster: Cluster, round_no: int, hospitals, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.state(round_no)
        if state and set(hospitals) <= {a["hospital"] for a in state["accepted"]}:
            return
        time.sleep(0.3)
    raise AssertionError(f"{hospitals} not accepted in round {round_no}: {cluster.state(round_no)}\n"
                         f"{cluster.log('aggregator')[-3000:]}")


def _dead_letters(cluster: Cluster, count: int, timeout: float = 60) -> dict[bytes, dict]:
    taken: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(taken) < count:
        taken += cluster.dead_letters()
        time.sleep(0.3)
    time.sleep(0.5)
    taken += cluster.dead_letters()
    assert len(taken) == count, [d["headers"].get(REASON_HEADER) for d in taken]
    return {d["body"]: d for d in taken}


def _honest_update(cluster: Cluster, round_no: int, hospital: str) -> bytes:
    """What an honest hospital sends: a bound, encrypted update at its own key, signed."""
    record = json.loads(cluster.get(rounds.round_key(round_no)))
    codec = crypto.load_context_file(cluster.keys_dir / "secret.ctx")
    weights = np.random.default_rng(round_no).normal(0, 0.05, record["n_params"]).astype(np.float32)
    out = io.BytesIO()
    bound.write_header(out, round_no, hospital)
    codec.encrypt_update(weights, 7, out)
    key = rounds.update_key(round_no, hospital)
    cluster.put(key, out.getvalue())
    import hashlib
    update = messages.make("update_ready", round=round_no, hospital=hospital, key=key,
                           sha256=hashlib.sha256(out.getvalue()).hexdigest(),
                           size=len(out.getvalue()), n_samples=7, n_params=record["n_params"],
                           key_fingerprint=codec.fingerprint, metrics={}, sent_at=time.time())
    update = identity.sign(update, cluster.identities[hospital])
    cluster.put(rounds.update_message_key(round_no, hospital), messages.encode(update))
    return messages.encode(update)


def test_forged_replayed_redirected_and_impersonating_updates_are_refused(federation):
    cluster = federation
    h1, h2, h3 = cluster.hospitals
    mallory = identity.Identity.generate(f"mallory-{h3.split('-')[1]}")  # keys nobody registered

    # round 1: h1 and h2 train for real; h3 (the attacker) is a participant too
    round1 = _open_round(cluster, "--quorum", "3", "--deadline", "600", *TRAINING)
    _wait_accepted(cluster, round1, [h1, h2])
    h1_body = cluster.get(rounds.update_message_key(round1, h1))
    h1_msg = messages.decode(h1_body)
    fresh = {**h1_msg, "sent_at": time.time()}

    # the object of h1, copied by h3 (say from a leaky bucket) to h3's own key
    copy = cluster.get(h1_msg["key"])
    cluster.put(rounds.update_key(round1, h3), copy)
    attacks = {  # body published with h3's own login -> the reason it must be refused with
        # publishing as h1 with one's own login: h1's signed message, user_id h3
        h1_body: rf"^broker user '{h3}' published a update_ready signed by '{h1}'$",
        # forged signature: h1's fields, signed by h3's key but claiming signer h1
        messages.encode({**identity.sign(fresh, cluster.identities[h3]), "signer": h1}):
            rf"^bad signature on update_ready from '{h1}'$",
        # unsigned
        messages.encode({k: v for k, v in fresh.items() if k not in ("signer", "signature")}):
            r"^unsigned update_ready: no signer or signature$",
        # unknown sender
        messages.encode(identity.sign({**fresh, "hospital": mallory.id,
                                       "key": rounds.update_key(round1, mallory.id)}, mallory)):
            rf"^unknown sender '{mallory.id}': no identity in the registry$",
        # naming another hospital's object, signed by h3 under its own name
        messages.encode(identity.sign({**fresh, "hospital": h3}, cluster.identities[h3])):
            rf"^wrong object key '{re.escape(h1_msg['key'])}': hospital '{h3}''s update",
        # h1's object copied to h3's key and claimed, signed by h3: bound to h1
        messages.encode(identity.sign({**fresh, "hospital": h3, "key": rounds.update_key(round1, h3)},
                                      cluster.identities[h3])):
            rf"^unbound update: object is bound to round {round1} hospital '{h1}', not round "
            rf"{round1} hospital '{h3}'$",
    }
    for body in attacks:
        _publish(cluster, h3, body)
    # the broker itself refuses a user_id that is not the login, and anything beyond the
    # hospital's least privilege
    with pytest.raises(pex.ChannelClosedByBroker) as refused:
        _publish(cluster, h3, h1_body, user_id=h1)
    assert refused.value.reply_code == 406 and "user_id" in refused.value.reply_text
    for what, attempt in [
            ("publish model_ready", lambda ch: ch.basic_publish(
                f"{cluster.namespace}.control", "model_ready", b"x")),
            ("read the aggregator's queue", lambda ch: ch.basic_get(f"{cluster.namespace}.aggregator")),
            ("read h1's queue", lambda ch: ch.basic_get(f"{cluster.namespace}.hospital.{h1}")),
            ("declare a queue", lambda ch: ch.queue_declare(f"{cluster.namespace}.mine"))]:
        conn = pika.BlockingConnection(pika.URLParameters(cluster.users.url(cluster.amqp_url, h3)))
        try:
            with pytest.raises(pex.ChannelClosedByBroker) as denied:
                ch = conn.channel()
                ch.confirm_delivery()  # a publish waits for the broker's answer
                attempt(ch)
            assert denied.value.reply_code == 403, (what, denied.value)
        finally:
            if conn.is_open:
                conn.close()

    dead = _dead_letters(cluster, len(attacks))
    for body, pattern in attacks.items():
        assert re.search(pattern, dead[body]["headers"][REASON_HEADER]), (pattern, dead[body]["headers"])
        assert dead[body]["headers"][USER_HEADER] == h3  # who really published it
    assert cluster.running("aggregator")
    # h3's honest update completes the round: exactly the honest updates are in the sum
    _publish(cluster, h3, _honest_update(cluster, round1, h3))
    state = cluster.wait_finished(round1, timeout=120)
    assert state["status"] == "complete"
    assert sorted(a["hospital"] for a in state["accepted"]) == sorted([h1, h2, h3])
    assert cluster.get(state["model_key"]) == cluster.fault_free_aggregate(round1, [h1, h2, h3])

    # round 2 (h3 only, so the real hospitals sit it out): h1's round-1 update replayed,
    # re-addressed to round 2, by h1's own login even (a stolen password is not a key)
    round2 = _open_round(cluster, "--quorum", "1", "--hospital", h3, "--deadline", "600", *TRAINING)
    replayed = messages.encode({**h1_msg, "round": round2, "key": rounds.update_key(round2, h1)})
    _publish(cluster, h1, replayed)
    _publish(cluster, h1, h1_body)  # verbatim: a duplicate of round 1, acked and not counted
    (letter,) = _dead_letters(cluster, 1).values()
    assert letter["headers"][REASON_HEADER] == f"bad signature on update_ready from '{h1}'"
    _publish(cluster, h3, _honest_update(cluster, round2, h3))
    state2 = cluster.wait_finished(round2, timeout=120)
    assert [a["hospital"] for a in state2["accepted"]] == [h3]
    assert cluster.state(round1)["accepted"] == state["accepted"]  # round 1 untouched

    # the aggregator's broker password, say stolen by h3, is not the aggregator's key: a
    # model_ready that h3 signs and sends with that login is refused by each running hospital
    record1 = json.loads(cluster.get(rounds.round_key(round1)))
    forged_ready = identity.sign(messages.make(
        "model_ready", round=round1, key=rounds.aggregate_key(round1),
        sha256=state["accepted"][0]["sha256"], contributors=[h1, h2, h3], total_samples=state["total_samples"],
        n_params=record1["n_params"], key_fingerprint=record1["key_fingerprint"], metrics={},
        finished_at=time.time()), cluster.identities[h3])
    _publish(cluster, cluster.aggregator_id, messages.encode(forged_ready), routing_key="model_ready")
    wrong_role = (f"wrong role: model_ready from '{h3}', registered as hospital; only the aggregator "
                  "role may send it")
    taken, deadline = [], time.monotonic() + 60
    while len(taken) < 2 and time.monotonic() < deadline:  # h1's and h2's, with the same body
        taken += cluster.dead_letters()
        time.sleep(0.3)
    assert [d["headers"][REASON_HEADER] for d in taken] == [wrong_role] * 2
    assert all(d["headers"][USER_HEADER] == cluster.aggregator_id for d in taken)

    # cxr-mq status shows every refusal with its reason, under the round it claimed
    rows = {row["round"]: row for row in cluster.status()}
    reasons1 = [r["reason"] for r in rows[round1]["refused"]]
    for pattern in attacks.values():
        assert sum(bool(re.search(pattern, r)) for r in reasons1) == 1, (pattern, reasons1)
    assert [r["reason"] for r in rows[round2]["refused"]] == [
        f"bad signature on update_ready from '{h1}'"]
    by_hospitals = sorted((r["hospital"], r["message"], r["reason"], r["broker_user"])
                          for r in rows[round1]["refused_by_hospitals"])
    assert by_hospitals == [(h, "model_ready", wrong_role, cluster.aggregator_id) for h in (h1, h2)]
    text = cluster.cli("status").stdout
    assert f"refused {h1}: broker user '{h3}' published a update_ready signed by '{h1}'" in text
    assert f"{h2} refused model_ready: {wrong_role}" in text
    # and the honest hospitals went on: each applied round 1's model
    cluster.wait_for_event(h1, "global_model_evaluated", round=round1)


def test_identity_cli_registers_in_the_bucket_with_sse_kms(tmp_path, amqp_url, s3_settings):
    cluster = Cluster(tmp_path, amqp_url, s3_settings, "unused")
    init = json.loads(cluster.cli("identity", "init", "--id", "north", "--out", str(tmp_path / "ids")).stdout)
    registered = json.loads(cluster.cli("identity", "register", "north", init["pub"],
                                        "--role", "hospital").stdout)
    assert registered["registered"] == "keys/identities/north" and registered["role"] == "hospital"
    head = cluster.s3_client().head_object(Bucket=s3_settings["bucket"], Key="keys/identities/north")
    assert head["ServerSideEncryption"] == "aws:kms"
    shown = json.loads(cluster.cli("identity", "show", "north").stdout)
    assert shown == [{"id": "north", "role": "hospital", "ed25519": init["ed25519"], "x25519": init["x25519"]}]
    # another key under the same name is refused unless forced
    identity.Identity.generate("north").save(tmp_path / "other")
    again = cluster.cli("identity", "register", "north", str(tmp_path / "other" / "north.pub"),
                        "--role", "hospital", check=False)
    assert again.returncode == 2 and "registered already" in again.stderr
