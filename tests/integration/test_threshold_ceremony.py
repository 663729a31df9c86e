"""The threshold key ceremony over the real RabbitMQ and moto's S3: the key authority's
``run_ceremony`` (what ``cxr-mq keys init --threshold T`` runs) publishes signed
``ceremony_start`` / ``ceremony_finalize`` on the control exchange; each hospital takes them
from its own queue, verifies them as its worker does, and runs the handler bodies
(``threshold_flow.on_ceremony_start`` / ``on_ceremony_finalize``)."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from cxr_mq import identity, messages, threshold_flow as flow
from cxr_mq.crypto import committee, keylayer, ring
from cxr_mq.crypto.ceremony import CeremonyParams, CommitteeShare
from cxr_mq.storage.s3 import S3Store
from cxr_mq.transport.base import Topology
from cxr_mq.transport.rabbitmq import RabbitMQBroker

PARTIES = ("h1", "h2", "h3")


def _hospitals_take(broker, topology, ids, store, registry, work, until, timeout=120):
    """Each hospital consumes its queue, verifies, and runs the ceremony handlers."""
    verifier = identity.Verifier(registry, check_broker_user=False)
    handled, deadline = [], time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for h in PARTIES:
            delivery = broker.get(topology.hospital_queue(h), timeout=0.1)
            if delivery is None:
                continue
            message = messages.decode(delivery.body)
            try:
                verifier.verify(message)
            except identity.IdentityError as exc:
                handled.append((h, message["schema"], f"refused: {exc}"))
                continue
            if message["schema"] == "ceremony_start":
                outcome = flow.on_ceremony_start(store, message, ids[h], registry)
            else:
                outcome = flow.on_ceremony_finalize(store, message, ids[h], registry, work / h)
            handled.append((h, message["schema"], outcome))
    return handled


def test_key_ceremony_over_rabbitmq(amqp_url, namespace, s3_settings, tmp_path):
    store = S3Store(bucket=s3_settings["bucket"], kms_key_id=s3_settings["kms_key_id"],
                    endpoint_url=s3_settings["endpoint_url"], region=s3_settings["region"])
    ids = {p: identity.provision(store, p, "hospital") for p in PARTIES}
    authority = identity.provision(store, "keys", "controller")
    registry = identity.Registry(store)
    topology = Topology(namespace)
    for h in PARTIES:
        (tmp_path / h).mkdir()
    params = CeremonyParams(namespace, PARTIES, 2, "c-1")
    result: dict = {}

    def key_authority():
        try:
            with RabbitMQBroker(amqp_url, topology, reconnect_for=5) as broker:
                result["codec"] = flow.run_ceremony(store, broker, params, authority, registry, timeout=90, poll=0.2)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    with RabbitMQBroker(amqp_url, topology, reconnect_for=5) as broker:
        broker.declare_topology(PARTIES)
        # a forged ceremony_start, signed by a hospital: every hospital refuses it
        forged = identity.sign(messages.make("ceremony_start", ceremony_id="c-1", issued_at=time.time()), ids["h3"])
        broker.publish("ceremony_start", messages.encode(forged))
        authority_thread = threading.Thread(target=key_authority)
        authority_thread.start()
        handled = _hospitals_take(broker, topology, ids, store, registry, tmp_path,
                                  until=lambda: not authority_thread.is_alive())
        authority_thread.join(timeout=30)
    assert "error" not in result, result.get("error")
    refused = [h for h, kind, outcome in handled if outcome.startswith("refused: wrong role")]
    assert sorted(refused) == list(PARTIES)
    assert sorted((h, o) for h, k, o in handled if k == "ceremony_start" and not o.startswith("refused")) == \
        [(h, "dealt") for h in PARTIES]
    codec = result["codec"]
    assert codec.ceremony_id == "c-1" and codec.threshold == 2 and codec.parties == PARTIES
    assert flow.load_share(tmp_path / "h2", codec).party == "h2"
    with pytest.raises(flow.FlowError, match="no committee share"):
        flow.load_share(tmp_path / "nowhere", codec)
    shares = {}
    for h in PARTIES:
        path = flow.share_path(tmp_path / h, "c-1")
        assert os.stat(path).st_mode & 0o777 == 0o600
        shares[h] = CommitteeShare.from_bytes(path.read_bytes())
        assert shares[h].committee == codec.committee_key.fingerprint()
    # any 2 of the 3 kept shares decrypt a key ciphertext under the collective key; 1 does not
    secret = ring.sample_ternary(4096)
    key_ct = keylayer.encrypt_round_key(codec.committee_key, secret, federation=namespace, round_no=1, hospital="h1")
    r = keylayer.key_ring()
    for active in (("h1", "h2"), ("h2", "h3"), ("h3",)):
        points = [params.point(p) for p in active]
        plain = key_ct.c[:, 0]
        for p in active:
            lam = committee.lagrange_at_zero(points, params.point(p), r.modulus)
            plain = r.add(plain, r.mul(r.scalar(shares[p].sigma, lam), key_ct.c[:, 1]))
        if len(active) == 2:
            assert np.array_equal(keylayer.decode_key_sum(plain, max_abs=1), secret)
        else:
            with pytest.raises(keylayer.KeyLayerError):
                keylayer.decode_key_sum(plain, max_abs=1)
