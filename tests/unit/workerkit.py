"""A federation in one process for fast worker tests: the real aggregator and hospital
workers on the embedded broker and a local-directory store, a fake clock, real CKKS.

One place builds workers and one place publishes messages (``Federation.publish``), so a
change to how messages are made or signed is a change here, not in every test. Every party
has a registered identity and a broker connection logged in as itself, with its role's least
privilege (as on RabbitMQ; only an admin connection declares the topology): ``publish``
signs a message as its sender (the controller, the hospital it names, the aggregator) and
sends it on the sender's connection, so it carries the sender's ``user_id``. A sender that is
not registered signs with a key of its own that nobody registered.
"""
from __future__ import annotations

import io
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from cxr_mq import bound, identity, messages, rounds
from cxr_mq.storage.local import LocalStore
from cxr_mq.training import TrainingParams
from cxr_mq.transport.base import ORIGIN_HEADER, REASON_HEADER, Topology
from cxr_mq.transport.embedded import EmbeddedBroker, EmbeddedServer
from cxr_mq.transport.permissions import permissions_for

DRAIN_SECONDS = 10.0  # a queue that is not empty by then is a failure, never a hang


class Federation:
    SENDER = {"round_start": "controller", "model_ready": "aggregator", "round_aborted": "aggregator"}

    def __init__(self, root: Path, secret, public, hospitals=("h1", "h2", "h3"),
                 outsiders=("mallory",)):
        """``outsiders``: registered hospitals that take part in no round."""
        self.root = Path(root)
        self.secret, self.public = secret, public  # codecs: the hospitals' and the aggregator's
        self.hospitals = tuple(hospitals)
        self.server = EmbeddedServer()
        self.topology = Topology(f"t{uuid.uuid4().hex[:8]}")
        self.store = LocalStore(self.root / "store")
        self.now = 1_000_000.0  # the fake clock every worker reads
        self.identities = {name: identity.provision(self.store, name, role) for name, role in
                           [("controller", "controller"), ("aggregator", "aggregator")]
                           + [(h, "hospital") for h in (*self.hospitals, *outsiders)]}
        self._strangers: dict[str, identity.Identity] = {}  # keys nobody registered
        self._logins: dict[str, EmbeddedBroker] = {}
        self.admin = self.broker()  # no user, no limits: declares what the parties only check
        self.admin.declare_topology(self.hospitals)
        self.control = self.login("controller")

    def clock(self) -> float:
        return self.now

    def broker(self, user: str | None = None) -> EmbeddedBroker:
        """A connection logged in as ``user`` with its role's permissions (none: an admin)."""
        permissions = None
        if user is not None:
            role = {"controller": "controller", "aggregator": "aggregator"}.get(user, "hospital")
            permissions = permissions_for(role, user, self.topology.namespace)
        return EmbeddedBroker(self.server, topology=self.topology, retry_delay=0.01,
                              max_retry_delay=0.05, user=user, permissions=permissions)

    def login(self, user: str) -> EmbeddedBroker:
        """The one connection party ``user`` publishes on."""
        if user not in self._logins:
            self._logins[user] = self.broker(user)
        return self._logins[user]

    def verifier(self) -> identity.Verifier:
        return identity.Verifier(identity.Registry(self.store), clock=self.clock)

    def sign(self, message: dict, signer: str | None = None) -> dict:
        """``message`` signed by ``signer`` (default: its sender), replacing any signature."""
        signer = signer or self.SENDER.get(message["schema"]) or message["hospital"]
        ident = self.identities.get(signer)
        if ident is None:
            ident = self._strangers.setdefault(signer, identity.Identity.generate(signer))
        return identity.sign(message, ident)

    # -- workers ------------------------------------------------------------------------------
    def aggregator(self, before_ack=None, **kwargs):
        """A started aggregator (topology declared, state restored, consuming). ``before_ack``
        is called with each delivery its handler accepted, just before the broker acks it."""
        from workers.aggregator import AggregatorWorker

        worker = AggregatorWorker(self.broker("aggregator"), self.store, self.public,
                                  hospitals=self.hospitals, work_dir=str(self.root), clock=self.clock,
                                  identity=self.identities["aggregator"], verifier=self.verifier(),
                                  **kwargs)
        return self._start(worker, before_ack)

    def hospital(self, hospital_id: str, data_dir, **kwargs):
        from workers.hospital import HospitalWorker

        # the kit's rounds have one to three hospitals: below the default floor of 3
        kwargs.setdefault("min_clients_floor", 1)

        worker = HospitalWorker(self.broker(hospital_id), self.store, self.secret, hospital_id,
                                str(data_dir), str(self.root / "work"), clock=self.clock,
                                identity=self.identities[hospital_id], verifier=self.verifier(),
                                **kwargs)
        return self._start(worker, None)

    @staticmethod
    def _start(worker, before_ack):
        worker.setup()
        handler = worker.on_delivery
        if before_ack is not None:
            def handler(delivery, _handle=worker.on_delivery):
                _handle(delivery)
                before_ack(delivery)
        worker.broker.consume(worker.queue, handler, **worker.consume_options())
        return worker

    def drain(self, worker, timeout: float = DRAIN_SECONDS) -> None:
        """Run ``worker`` (its ticks included) until its queue is empty, as ``Worker.run`` does."""
        stop = threading.Event()
        deadline = time.monotonic() + timeout
        depth = {}

        def tick():
            worker._safe_tick()
            depth["now"] = self.server.queue(worker.queue).messages
            # prefetched (a worker with a look-ahead) counts as not yet handled
            if (not depth["now"] and not worker.broker.unsettled()) or time.monotonic() > deadline:
                stop.set()
        worker.broker.run(stop, tick=tick, tick_interval=0.001)  # a delivery between ticks
        assert not depth.get("now"), f"{worker.queue} still holds {len(depth['now'])} message(s) after {timeout}s"
        assert not worker.broker.unsettled(), f"{worker.broker.unsettled()} message(s) unhandled after {timeout}s"

    # -- messages -----------------------------------------------------------------------------
    def publish(self, message: dict, body: bytes | None = None, login: str | None = None) -> None:
        """Publish ``message`` on the control exchange as its sender would: signed by it, on
        its connection (``body`` overrides the encoding, for malformed or forged input;
        ``login`` publishes on another party's connection)."""
        sender = self.SENDER.get(message.get("schema")) or message.get("hospital") or self.hospitals[0]
        if body is None:
            message = self.sign(message)
            sender = message["signer"]
            body = messages.encode(message)
        self.login(login or sender).publish(message["schema"], body,
                                            message_id=f"{message['schema']}:{uuid.uuid4().hex[:8]}")

    def open_round(self, round_no: int = 1, quorum: int = 2, min_clients: int | None = None,
                   deadline: float = 60.0, n_params: int = 1000, hospitals=None,
                   training: TrainingParams = TrainingParams(image_size=8), **fields) -> dict:
        """Write the round record and publish ``round_start`` (what the controller does)."""
        message = self.sign(messages.make(
            "round_start", round=round_no, base_model_key=rounds.base_key(round_no),
            base_model_sha256="0" * 64, base_model_encrypted=False, base_total_samples=0,
            quorum=quorum, min_clients=quorum if min_clients is None else min_clients,
            deadline=self.now + deadline, training=training.to_dict(),
            key_fingerprint=fields.pop("key_fingerprint", self.secret.fingerprint), codec_profile=self.secret.profile,
            n_params=n_params, hospitals=list(self.hospitals if hospitals is None else hospitals),
            issued_at=self.now, **fields))
        rounds.write_json(self.store, rounds.round_key(round_no), message)
        self.publish(message)
        return message

    def upload_update(self, round_no: int, hospital: str, weights: np.ndarray, n_samples: int,
                      key: str | None = None, **overrides) -> dict:
        """Encrypt and upload an update, bound to (round, hospital) as a hospital does, and
        return its signed ``update_ready`` (not yet published)."""
        buf = io.BytesIO()
        bound.write_header(buf, round_no, hospital)
        self.secret.encrypt_update(weights, n_samples, buf)
        info = self.store.put_bytes(key or rounds.update_key(round_no, hospital), buf.getvalue())
        fields = dict(round=round_no, hospital=hospital, key=info.key, sha256=info.sha256,
                      size=info.size, n_samples=n_samples, n_params=int(weights.size),
                      key_fingerprint=self.secret.fingerprint, metrics={}, sent_at=self.now)
        fields.update(overrides)
        return self.sign(messages.make("update_ready", **fields))

    # -- what came out ------------------------------------------------------------------------
    def dead_letters(self) -> list[dict]:
        """Dead-lettered messages: reason, origin queue and the raw body."""
        queue = self.server.queue(self.topology.dead_letter_queue)
        return [{"reason": m.headers.get(REASON_HEADER), "queue": m.headers.get(ORIGIN_HEADER),
                 "body": m.body} for m in queue.messages]

    def announced(self, hospital: str = "h1") -> list[dict]:
        """Messages waiting on a hospital's queue (what the aggregator announced), decoded."""
        queue = self.server.queue(self.topology.hospital_queue(hospital))
        return [messages.decode(m.body) for m in queue.messages]

    def state(self, round_no: int = 1) -> rounds.RoundState | None:
        """The round state as a freshly started process would read it from the store."""
        return rounds.RoundState.load(LocalStore(self.store.root), round_no)

    def decrypt_aggregate(self, round_no: int = 1) -> np.ndarray:
        state = self.state(round_no)
        raw = self.store.get_bytes(state.model_key, sha256=state.model_sha256)
        return self.secret.decrypt_aggregate(io.BytesIO(raw), state.total_samples)
