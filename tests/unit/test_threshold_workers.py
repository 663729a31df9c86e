"""The key ceremony through running hospital workers, in process: the embedded broker (which
stamps each message with its connection's user), a local store, three ``HospitalWorker``s.

``run_ceremony`` (what ``cxr-mq keys init --threshold T`` runs) completes; each worker keeps
its committee share; a ceremony_start signed by a hospital is dead-lettered with the reason."""
from __future__ import annotations

import threading
import time

import pytest

from cxr_mq import crypto, identity, messages, threshold_flow as flow
from cxr_mq.crypto.ceremony import CeremonyParams
from cxr_mq.storage.local import LocalStore
from cxr_mq.transport.base import REASON_HEADER, Topology
from cxr_mq.transport.embedded import EmbeddedBroker, EmbeddedServer
from workers.hospital import HospitalWorker

HOSPITALS = ("h1", "h2", "h3")


@pytest.fixture()
def running(tmp_path):
    store = LocalStore(tmp_path / "store")
    parties = {h: identity.provision(store, h, "hospital") for h in HOSPITALS}
    parties["keys"] = identity.provision(store, "keys", "controller")
    server, topology = EmbeddedServer(), Topology("t")
    admin = EmbeddedBroker(server, topology, user="admin")
    admin.declare_topology(HOSPITALS)
    secret = crypto.load_context(crypto.generate_keys("compact").secret)
    workers, threads = [], []
    for h in HOSPITALS:
        worker = HospitalWorker(EmbeddedBroker(server, topology, user=h), store, secret, h, str(tmp_path / "data"),
                                str(tmp_path / "work"), identity=parties[h],
                                verifier=identity.Verifier(identity.Registry(store)))
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        workers.append(worker)
        threads.append(thread)
    yield store, parties, server, topology, admin, tmp_path / "work"
    for worker, thread in zip(workers, threads):
        worker.stop.set()
        thread.join(timeout=10)


def test_ceremony_through_the_hospital_workers(running):
    store, parties, server, topology, admin, work = running
    forged = identity.sign(messages.make("ceremony_start", ceremony_id="c-1", issued_at=time.time()), parties["h3"])
    EmbeddedBroker(server, topology, user="h3").publish("ceremony_start", messages.encode(forged))
    params = CeremonyParams("t", HOSPITALS, 2, "c-1")
    codec = flow.run_ceremony(store, EmbeddedBroker(server, topology, user="keys"), params, parties["keys"],
                              identity.Registry(store), timeout=60, poll=0.1)
    for h in HOSPITALS:
        share = flow.load_share(work / h, codec)
        assert share.party == h and share.committee == codec.committee_key.fingerprint()
    letters = []
    deadline = time.monotonic() + 10
    while len(letters) < 3 and time.monotonic() < deadline:
        got = admin.get(topology.dead_letter_queue, timeout=0.2)
        if got is not None:
            letters.append(got.headers.get(REASON_HEADER, ""))
    assert len(letters) == 3 and all("wrong role" in reason for reason in letters), letters
