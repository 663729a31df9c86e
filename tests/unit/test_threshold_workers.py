"""The key ceremony through running hospital workers, in process: the embedded broker (which
stamps each message with its connection's user), a local store, three ``HospitalWorker``s.

``run_ceremony`` (what ``cxr-mq keys init --threshold T`` runs) completes; each worker keeps
its committee share; a ceremony_start signed by a hospital is dead-lettered with the reason."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from cxr_mq import controller, crypto, identity, messages, rounds, threshold_flow as flow, training
from cxr_mq.crypto.ceremony import CeremonyParams
from cxr_mq.storage.local import LocalStore
from cxr_mq.transport.base import REASON_HEADER, Topology
from cxr_mq.transport.embedded import EmbeddedBroker, EmbeddedServer
from workers.aggregator import AggregatorWorker
from workers.hospital import HospitalWorker, synthetic_samples, synthetic_update

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
    def stop_workers():
        for worker, thread in zip(workers, threads):
            worker.stop.set()
            thread.join(timeout=10)

    yield store, parties, server, topology, admin, tmp_path / "work", stop_workers
    stop_workers()


def test_ceremony_through_the_hospital_workers(running):
    store, parties, server, topology, admin, work, _ = running
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


class Federation:
    """Hospital workers (synthetic training) and an aggregator under the threshold profile,
    in process on the embedded broker; workers can be stopped (dropouts) and restarted.
    The committee waits 10 s for partials: 4 s once ran out for a live member on a loaded
    2-core machine, turning a decryptable round undecryptable."""

    def __init__(self, store, parties, server, topology, work, codec, committee_timeout=10.0):
        self.store, self.parties, self.server, self.topology, self.work = store, parties, server, topology, work
        self.codec, self.committee_timeout = codec, committee_timeout
        self.running: dict[str, tuple] = {}
        aggregator = AggregatorWorker(EmbeddedBroker(server, topology, user="agg"), store, codec,
                                      hospitals=HOSPITALS, work_dir=str(work), retain_updates=True,
                                      identity=parties["agg"], verifier=identity.Verifier(identity.Registry(store)))
        self.aggregator = (aggregator, threading.Thread(target=aggregator.run, daemon=True))
        self.aggregator[1].start()
        for h in HOSPITALS:
            self.start(h)

    def start(self, h, committee_timeout=None):
        worker = HospitalWorker(EmbeddedBroker(self.server, self.topology, user=h), self.store, self.codec, h,
                                str(self.work / "data"), str(self.work), synthetic=True, identity=self.parties[h],
                                verifier=identity.Verifier(identity.Registry(self.store)),
                                committee_timeout=committee_timeout or self.committee_timeout)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        self.running[h] = (worker, thread)

    def stop(self, h):
        worker, thread = self.running.pop(h)
        worker.stop.set()
        thread.join(timeout=30)

    def stop_after_publishing(self, h, round_no):
        """``h`` stops right after publishing its update_ready of ``round_no``, before that
        round's model_ready can reach it (it acks round_start first, and takes one message at a
        time): the in-process counterpart of the crash point ``hospital.after_publish``. A stop
        from the test thread once the update was in came too late whenever that thread was
        0.2 s behind: the dropout had taken model_ready and joined the committee already."""
        worker, _ = self.running[h]
        publish = worker._publish

        def publish_then_stop(update):
            publish(update)
            if update["round"] == round_no:
                worker.stop.set()
        worker._publish = publish_then_stop

    def wait_stopped(self, h, timeout=60):
        """Wait for a worker that stops by itself (``stop_after_publishing``)."""
        _, thread = self.running.pop(h)
        thread.join(timeout)
        assert not thread.is_alive(), f"{h} did not stop"

    def close(self):
        for h in list(self.running):
            self.stop(h)
        self.aggregator[0].stop.set()
        self.aggregator[1].join(timeout=30)


def _open(store, parties, server, topology, codec):
    request = controller.RoundRequest(quorum=3, min_clients=3, deadline_seconds=60,
                                      training=training.TrainingParams(), hospitals=HOSPITALS,
                                      synthetic_params=3000, max_samples=200, weight_bound=8.0)
    return controller.open_round(EmbeddedBroker(server, topology, user="keys"), store, codec, request, parties["keys"])


def _load_written(path, timeout=10):
    """np.load of a file another thread may still be writing (np.save is not atomic)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _wait(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def test_rounds_under_the_threshold_profile_survive_dropouts(running):
    store, parties, server, topology, admin, work, stop_workers = running
    parties["agg"] = identity.provision(store, "agg", "aggregator")
    codec = flow.run_ceremony(store, EmbeddedBroker(server, topology, user="keys"),
                              CeremonyParams("t", HOSPITALS, 2, "c-2"), parties["keys"],
                              identity.Registry(store), timeout=60, poll=0.1)
    store.put_bytes("keys/public-context", codec.public_bytes())
    stop_workers()  # the hospitals restart with the new public context, as a deployment would
    fed = Federation(store, parties, server, topology, work, crypto.load_context(codec.public_bytes()))
    try:
        # round 1: everyone alive, every hospital decrypts the FedAvg of the three updates
        start = _open(store, parties, server, topology, codec)
        _wait(lambda: len(flow.outcomes(store, 1)) == 3 and all((work / h / "global.npy").exists() for h in HOSPITALS),
              "round 1's committee and models")
        assert all(o["decrypted"] for o in flow.outcomes(store, 1).values()), flow.outcomes(store, 1)
        base = np.load(io.BytesIO(store.get_bytes(start["base_model_key"])))
        ups = {h: synthetic_update(base, h, 1) for h in HOSPITALS}
        counts = {h: synthetic_samples(h) for h in HOSPITALS}
        expected = sum(ups[h].astype(np.float64) * counts[h] for h in HOSPITALS) / sum(counts.values())
        for h in HOSPITALS:
            assert np.max(np.abs(_load_written(work / h / "global.npy") - expected)) < 1e-5
        for h in HOSPITALS:  # the sample count is not in clear: update_ready says 1
            update = messages.decode(store.get_bytes(rounds.update_message_key(1, h)))
            assert update["n_samples"] == 1 and counts[h] > 1
        # round 2: h3 dies once its update is out (n - t = 1): h1 and h2 still decrypt
        fed.stop_after_publishing("h3", 2)
        _open(store, parties, server, topology, codec)
        fed.wait_stopped("h3")
        assert store.exists(rounds.update_message_key(2, "h3"))
        _wait(lambda: {h for h, o in flow.outcomes(store, 2).items() if o["decrypted"]} == {"h1", "h2"}, "round 2")
        # round 3: h3 back; then h2 and h3 die after uploading: below t, undecryptable, with the reason
        fed.start("h3")
        # h1, left alone, cannot decrypt round 3 however long it waits: 2 s for the committee, not 10
        h1 = fed.running["h1"][0]
        h1.committee_timeout = 2.0
        for h in ("h2", "h3"):
            fed.stop_after_publishing(h, 3)
        _open(store, parties, server, topology, codec)
        for h in ("h2", "h3"):
            fed.wait_stopped(h)
        _wait(lambda: all(store.exists(rounds.update_message_key(3, h)) for h in HOSPITALS), "round 3's updates")
        _wait(lambda: "h1" in flow.outcomes(store, 3), "h1's round 3 outcome")
        h1.committee_timeout = fed.committee_timeout
        outcome = flow.outcomes(store, 3)["h1"]
        assert not outcome["decrypted"] and "only 1 of the 2 committee members" in outcome["reason"]
        # what start-round --wait and status report
        assert controller.wait_for_committee(store, 2, timeout=5, poll=0.1)["decrypted"]
        waited = controller.wait_for_committee(store, 3, timeout=5, poll=0.1)
        assert not waited["decrypted"] and "only 1 of the 2" in waited["reason"]
        rows = {row["round"]: row for row in controller.status(store)}
        assert rows[3]["state"] == controller.UNDECRYPTABLE and "only 1 of the 2" in rows[3]["reason"]
        assert rows[2]["state"] == "complete" and rows[2]["committee"]["decrypted"]
        # round 4: everyone back; it starts from round 2's model (round 3's is no base) and completes.
        # h2 and h3 first take round 3's model_ready, which no committee decrypts any more: 2 s
        # for that (not 10, which round 4 would wait behind), then the usual 10 s again
        for h in ("h2", "h3"):
            fed.start(h, committee_timeout=2.0)
        _wait(lambda: {"h2", "h3"} <= set(flow.outcomes(store, 3)), "h2's and h3's round 3 outcomes")
        assert not any(o["decrypted"] for o in flow.outcomes(store, 3).values()), flow.outcomes(store, 3)
        for h in ("h2", "h3"):
            fed.running[h][0].committee_timeout = fed.committee_timeout
        start = _open(store, parties, server, topology, codec)
        assert start["base_model_key"] == rounds.aggregate_key(2)
        _wait(lambda: len([o for o in flow.outcomes(store, 4).values() if o["decrypted"]]) == 3,
              lambda: f"round 4: outcomes {flow.outcomes(store, 4)}, state {rounds.read_json(store, rounds.state_key(4))}",
              timeout=90)
    finally:
        fed.close()
