"""A hospital: trains on local images, encrypts its sample-weighted update, uploads it and
announces it. Images, weights and the secret key never leave this process unencrypted.

``round_start`` is acked only after ``update_ready`` is confirmed by the broker. Training runs
on a background thread while the broker connection keeps servicing heartbeats, so a long
local training does not get the connection dropped. A hospital restarted after uploading
republishes the update it already made (``updates/<id>.msg``) rather than training another.

The broker's delivery-acknowledgement timeout (``consumer_timeout``) bounds how long
``round_start`` may stay unacked. The deployment sets it above the longest round deadline, so
in normal operation it never fires; if it does (or the broker restarts meanwhile), the broker
closes the channel and requeues ``round_start``. Training goes on regardless, the update is
uploaded, its manifest written and ``update_ready`` published on a fresh channel; the
requeued ``round_start`` then comes back and is answered from the manifest (republished,
counted once by the aggregator, acked). Nothing is trained twice and nothing is lost.

With ``synthetic=True`` (benchmarks only: ``cxr-mq bench-federation``, ``hospital
--synthetic``) local training is replaced by a seeded synthetic update of the round's size
and the new global model is decrypted but not evaluated; everything else (encryption,
upload, messages, acks, decryption) is the code above. Such a hospital needs no images.

A permanent S3 fault (e.g. access denied) gives up this hospital's part in the round: its
``round_start`` is dead-lettered with the error; the worker goes on with the next message.

Limits a hospital keeps whatever it is told (issue 10): it takes no part in a round whose
minimum is below its ``min_clients_floor``; it encrypts nothing that a sum of the round's
``max_contributors`` could wrap (the codec refuses before encrypting; ``round_start`` is
dead-lettered, not retrained); it decrypts an aggregate only if it sums exactly
``model_ready``'s contributors, at least the minimum, each once (the codec checks the seed
records). Each refusal is dead-lettered with its reason and kept in
``rounds/<r>/updates/<hospital>.refused``, where ``cxr-mq status`` shows it.
"""
from __future__ import annotations

import io
import os
import secrets
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from cxr_mq import bound, contexts, evaluation, messages, rounds, strategies, training
from cxr_mq.crypto import CodecError
from cxr_mq.data import DataError
from cxr_mq.faults import CrashPoints
from cxr_mq.rounds import OPEN, RoundState
from cxr_mq.storage.base import ObjectNotFound, ObjectStore, StoreError
from cxr_mq.transport.base import Broker, Delivery, Refuse, Requeue

from .base import Worker


class HospitalWorker(Worker):
    def __init__(self, broker: Broker, store: ObjectStore, codec, hospital_id: str, data_dir: str,
                 work_dir: str, stop=None, val_fraction: float = 0.2, skip_bad: bool = False,
                 clock=time.time, metrics=None, synthetic: bool = False,
                 keep_plaintext_updates: int = 0, min_clients_floor: int = 3, *, identity, verifier, committee_timeout: float = 120.0,
                 context_key: str = contexts.PUBLIC_CONTEXT_KEY):
        super().__init__(broker, stop, metrics=metrics, role="hospital", hospital=hospital_id,
                         identity=identity, verifier=verifier)
        if identity.id != hospital_id:
            raise ValueError(f"hospital {hospital_id!r} given the identity of {identity.id!r}")
        self.metrics.watch(self.role, store=store)
        self.crash = CrashPoints()
        # codec None: no key yet; the hospital takes part in the key ceremony and adopts its
        # public context (a first rollout under the threshold profile: docs/threshold.md)
        if codec is not None and not codec.has_secret_key and codec.profile != "threshold":
            raise ValueError("a hospital needs the secret context to decrypt the global model")
        self.store, self.id = store, hospital_id
        # the contexts by fingerprint: a key ceremony's (ceremony_finalize, or a round naming
        # it) is taken from the store without a restart
        self.contexts = contexts.ContextBook(store, codec, context_key)
        self.data_dir, self.val_fraction, self.skip_bad = data_dir, val_fraction, skip_bad
        self.work_dir = Path(work_dir) / hospital_id
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.synthetic = synthetic
        self.min_clients_floor = min_clients_floor
        self.keep_plaintext_updates = keep_plaintext_updates  # rounds; 0 keeps none
        self.committee_timeout = committee_timeout  # threshold profile: seconds for the committee
        self.queue = broker.topology.hospital_queue(hospital_id)
        self.handlers = {"round_start": self.on_round_start, "model_ready": self.on_model_ready,
                         "round_aborted": self.on_round_aborted,
                         "ceremony_start": self.on_ceremony, "ceremony_finalize": self.on_ceremony}
        self._data: dict[tuple, training.LocalData] = {}
        self._models: dict[tuple, object] = {}
        self.last_global_metrics: dict = {}
        self._applied_model: tuple | None = None
        self._training_thread: threading.Thread | None = None
        self.status = "idle"  # idle, training, encrypting, uploading (read by the demo's view)
        self.timings: dict[int, dict] = {}
        self.models_applied: list[tuple[int, float]] = []  # (round, when), for benchmarks
        self.decrypted_samples: dict[int, int] = {}  # threshold: round -> total the committee decrypted

    def setup(self) -> None:
        self.broker.declare_topology([self.id])

    @property
    def codec(self):
        """The newest context this hospital holds (a key ceremony replaces it)."""
        return self.contexts.current

    def _context_for(self, round_no: int, fingerprint: str):
        """The context a round names: held, or a threshold context in the store for which
        this hospital keeps its committee share; else the round is refused with the reason."""
        from cxr_mq import threshold_flow as flow

        def usable(codec) -> str | None:
            if codec.profile != "threshold":
                return (f"a {codec.profile} context needs its secret context file: restart hospital "
                        f"{self.id} with it (--secret-context)")
            if not flow.share_path(self.work_dir, codec.ceremony_id).exists():
                return (f"hospital {self.id} holds no committee share of ceremony {codec.ceremony_id!r} "
                        "(was it a party, and running during the ceremony?)")
            return None
        try:
            return self.contexts.get(fingerprint, accept=usable)
        except contexts.UnknownContext as exc:
            self._refuse(round_no, "round_start", f"round {round_no}: hospital {self.id} cannot take part: {exc}")

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._exit_if_training()

    def _exit_if_training(self) -> None:
        """Stopped mid-training (SIGTERM): ``round_start`` has been requeued, but TensorFlow
        cannot be interrupted, and tearing the interpreter down under its running thread
        aborts the process. When this worker owns the process, leave at once, exit code 0."""
        thread = self._training_thread
        if (thread is None or not thread.is_alive() or not self.stop.is_set()
                or threading.current_thread() is not threading.main_thread()):
            return
        self.log.info("exiting_without_waiting_for_training")
        try:
            self.broker.close()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    # -- round_start ------------------------------------------------------------------------
    def on_round_start(self, message: dict, delivery: Delivery) -> None:
        round_no = message["round"]
        log = self.log.bind(round=round_no)
        if message.get("hospitals") and self.id not in message["hospitals"]:
            log.info("round_not_for_this_hospital")
            return
        self._context_for(round_no, message["key_fingerprint"])
        if message["min_clients"] < self.min_clients_floor:
            self._refuse(round_no, "round_start", (
                f"round {round_no} accepts aggregates of {message['min_clients']} update(s), below "
                f"hospital {self.id}'s floor of {self.min_clients_floor} (min_clients_floor)"))
        try:
            self._take_part(message, delivery, log)
        except CodecError as exc:  # permanent: an update too large, an unusable base model
            self._refuse(round_no, "round_start", f"round {round_no}: hospital {self.id} refused: {exc}")
        except DataError as exc:  # local data unusable for this round: retrying cannot help
            self._refuse(round_no, "round_start",
                         f"round {round_no}: hospital {self.id} cannot train on its data: {exc}")
        except StoreError as exc:  # IntegrityError and ObjectNotFound are never transient
            if exc.transient:
                raise  # requeued after a pause; the store may recover
            log.error("round_given_up", error=str(exc))
            raise Refuse(f"round {round_no}: hospital {self.id} gave up: {exc}") from None

    def _refuse(self, round_no: int, kind: str, reason: str) -> None:
        """Dead-letter the message with ``reason`` and keep the reason where ``status`` finds
        it (best effort: failing to record must not change what happens to the message)."""
        self.log.warning("message_refused", round=round_no, message=kind, reason=reason)
        try:
            rounds.record_hospital_refusal(self.store, round_no, self.id, kind, reason, self.clock())
        except Exception as exc:  # noqa: BLE001
            self.log.warning("refusal_not_recorded", error=repr(exc), reason=reason)
        refusal = Refuse(reason)
        refusal.recorded = True
        raise refusal

    def on_delivery(self, delivery: Delivery) -> None:
        """Every refusal is dead-lettered with its reason and kept where ``cxr-mq status``
        shows it: those of a round the hospital takes part in in its record of the round
        (``_refuse``), all others (a forged, undecodable or misdirected message) in
        ``hospitals/<id>/refusals`` under the round the message claims."""
        try:
            super().on_delivery(delivery)
        except Refuse as exc:
            if not getattr(exc, "recorded", False):
                self._record_unrouted(delivery, exc.reason)
            raise

    def _record_unrouted(self, delivery: Delivery, reason: str) -> None:
        try:
            claimed = messages.decode(delivery.body)
        except Exception:  # noqa: BLE001 - what did not decode is recorded as such
            claimed = None
        if isinstance(claimed, dict):
            entry = {"round": claimed.get("round") if isinstance(claimed.get("round"), int) else None,
                     "message": str(claimed.get("schema") or "message"), "signer": claimed.get("signer")}
        else:
            entry = {"round": None, "message": "undecodable message", "size": len(delivery.body)}
        entry.update(reason=reason, broker_user=delivery.user_id,
                     routing_key=delivery.routing_key, at=self.clock())
        try:
            rounds.record_hospital_unrouted(self.store, self.id, entry)
        except Exception as exc:  # noqa: BLE001 - recording must not change the message's fate
            self.log.warning("refusal_not_recorded", error=repr(exc), reason=reason)

    def _take_part(self, message: dict, delivery: Delivery, log) -> None:
        round_no = message["round"]
        if self._round_finished(round_no, message["deadline"]):
            log.info("round_already_finished_ignored")
            return
        previous = self._previous_update(round_no)
        if previous is not None:
            log.info("republishing_update", key=previous["key"], redelivered=delivery.redelivered)
            self._publish(previous)
            self.crash.reached("hospital.after_publish", round=round_no)
            return
        params = training.TrainingParams.from_dict(message["training"])
        log.info("training_started", redelivered=delivery.redelivered)
        update = self._run_in_background(lambda: self._train_and_upload(message, params), log)
        self.crash.reached("hospital.after_upload", round=round_no)
        self._publish(update)
        self.metrics.rounds.labels(role=self.role, outcome="update_published").inc()
        log.info("update_published", key=update["key"], n_samples=update["n_samples"],
                 size=update["size"], **{k: round(v, 3) for k, v in self.timings.get(round_no, {}).items()})
        self.crash.reached("hospital.after_publish", round=round_no)

    def _round_finished(self, round_no: int, deadline: float) -> bool:
        state = RoundState.load(self.store, round_no)
        if state is not None and state.status != OPEN:
            return True
        return self.clock() > deadline

    def _previous_update(self, round_no: int) -> dict | None:
        try:
            body = self.store.get_bytes(rounds.update_message_key(round_no, self.id))
        except ObjectNotFound:
            return None
        return messages.decode(body)

    def _run_in_background(self, work, log):
        """Run ``work`` on a thread; keep the broker connection serviced meanwhile."""
        outcome: dict = {}

        def target():
            try:
                outcome["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer thread
                outcome["error"] = exc
        thread = threading.Thread(target=target, name=f"train-{self.id}", daemon=True)
        self._training_thread = thread
        thread.start()
        while thread.is_alive():
            if self.stop.is_set():
                log.info("shutdown_during_training_requeueing")
                raise Requeue()
            self.broker.sleep(0.2)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _local_data(self, params: training.TrainingParams) -> training.LocalData:
        key = (params.image_size, params.classes)
        if key not in self._data:
            self._data[key] = training.LocalData.from_dir(
                self.data_dir, params, val_fraction=self.val_fraction, skip_bad=self.skip_bad)
        return self._data[key]

    def _model(self, purpose: str, params: training.TrainingParams):
        """The model for ``params``, built once per graph and purpose: every round loads its
        weights, and a rebuilt model would pay TensorFlow's tracing of the training step again
        (seconds per round, more than the training itself on small data)."""
        key = (purpose, params.model, params.image_size, params.classes, params.width, params.depth)
        if key not in self._models:
            self._models[key] = training.build_model(params)
        return self._models[key]

    def _train(self, message: dict, params: training.TrainingParams) -> tuple[np.ndarray, int, dict]:
        """Train locally from the round's base model: the new weights, the sample count and
        the training metrics."""
        round_no = message["round"]
        base = self._base_weights(message, params)
        train_metrics = {"start_sha256": strategies.model_sha256(base)}
        if self.synthetic:
            return synthetic_update(base, self.id, round_no), synthetic_samples(self.id), {
                "synthetic": True, **train_metrics}
        data = self._local_data(params)
        model = self._model("train", params)
        training.load_flat_weights(model, base)
        strategy, state = strategies.make(params), self._strategy_state(base)
        gradient = training.data_gradient(model, data) if strategy.needs_gradient else None
        # FedSGD draws its minibatches from a CSPRNG and its epochs' permutations
        # (shuffle_rounds) from a secret kept in the work dir: nobody can predict which images
        # a hospital's gradient covers (DP-SGD's amplification by sampling assumes as much)
        rng = epoch_rng = None
        if params.strategy == "fedsgd":
            rng = np.random.default_rng(secrets.randbits(128))
            secret = self._sampling_secret()
            epoch_rng = lambda epoch: np.random.default_rng([secret, epoch])  # noqa: E731
        train_metrics.update(training.train_local(model, data, params, round_seed=round_no,
                                                  objective=strategy.local_objective(base, state),
                                                  rng=rng, epoch_rng=epoch_rng))
        weights = strategy.upload(base, training.flat_weights(model), state, gradient)
        state.save(self._state_path)  # e.g. SCAFFOLD's next client control, kept across a restart
        return weights, data.n_train, train_metrics

    def _sampling_secret(self) -> int:
        """128 random bits, made once and kept (mode 0600) in the work dir: the seed of this
        hospital's FedSGD epoch permutations, the same across a restart mid-epoch."""
        path = self.work_dir / "sampling-secret"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=self.work_dir)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{secrets.randbits(128):032x}\n")
            os.replace(tmp, path)  # mkstemp's file is 0600
        return int(path.read_text().strip(), 16)

    def _train_and_upload(self, message: dict, params: training.TrainingParams) -> dict:
        round_no = message["round"]
        timings = self.timings.setdefault(round_no, {})
        self.status = "training"
        started = time.perf_counter()
        weights, n_train, train_metrics = self._train(message, params)
        timings["train_seconds"] = time.perf_counter() - started
        self.crash.reached("hospital.after_training", round=round_no)
        self.metrics.duration.labels(role=self.role, phase="train").observe(timings["train_seconds"])
        self.status = "encrypting"
        started = time.perf_counter()
        fd, path = tempfile.mkstemp(prefix="update-", dir=self.work_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                bound.write_header(fh, round_no, self.id)  # covered by the signed sha256
                self._encrypt(message, weights, n_train, fh)
            timings["encrypt_seconds"] = time.perf_counter() - started
            # local log only: under the threshold profile the count travels encrypted
            self.log.info("update_encrypted", round=round_no, local_samples=int(n_train))
            self.status = "uploading"
            started = time.perf_counter()
            info = self.store.put_file(rounds.update_key(round_no, self.id), path)
            timings["upload_seconds"] = time.perf_counter() - started
        finally:
            os.unlink(path)
        self.metrics.duration.labels(role=self.role, phase="encrypt").observe(
            timings["encrypt_seconds"])
        self.metrics.duration.labels(role=self.role, phase="upload").observe(
            timings["upload_seconds"])
        self.metrics.bytes.labels(role=self.role, direction="uploaded").inc(info.size)
        update = self.sign(messages.make(
            "update_ready", round=round_no, hospital=self.id, key=info.key, sha256=info.sha256,
            size=info.size, n_samples=self._clear_samples(message, n_train), n_params=int(weights.size),
            start_sha256=train_metrics.pop("start_sha256"),
            key_fingerprint=message["key_fingerprint"],
            metrics={"train": train_metrics, "global": self.last_global_metrics,
                     "timings": dict(timings)},
            sent_at=self.clock()))
        self._keep_plaintext_update(round_no, weights)
        self.store.put_bytes(rounds.update_message_key(round_no, self.id), messages.encode(update))
        self.status = "uploaded"
        return update

    def _keep_plaintext_update(self, round_no: int, weights: np.ndarray) -> None:
        """Opt-in audit copy of this hospital's plaintext update (``update-<r>.npy``, mode
        0600), for the last ``keep_plaintext_updates`` rounds only: by default no plaintext
        update outlives the process that made it."""
        if self.keep_plaintext_updates > 0:
            path = self.work_dir / f"update-{round_no:06d}.npy"
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
                np.save(fh, weights)
        kept = sorted(self.work_dir.glob("update-[0-9]*.npy"))
        for old in kept[:max(0, len(kept) - self.keep_plaintext_updates)]:
            old.unlink(missing_ok=True)

    def _publish(self, update: dict) -> None:
        self.broker.publish("update_ready", messages.encode(update),
                            message_id=f"update_ready:{update['round']}:{self.id}")
        self.metrics.updates_published.labels(role=self.role).inc()

    @property
    def _state_path(self) -> Path:
        return self.work_dir / evaluation.STATE_FILE

    def _strategy_state(self, model: np.ndarray) -> strategies.ServerState:
        """This hospital's strategy state (server optimizer moments, control variates) for a
        round that starts from ``model``."""
        state = strategies.ServerState.load(self._state_path)
        if state is None or not np.array_equal(state.model, model):
            state = strategies.ServerState(model=model)
        return state

    def _base_weights(self, message: dict, params: training.TrainingParams) -> np.ndarray:
        cache = self.work_dir / f"base-{message['base_model_sha256']}.npy"
        if cache.exists():
            return np.load(cache)
        handed = self._handed_over(message["base_model_sha256"]) if message["base_model_encrypted"] else None
        if handed is not None:
            weights, state = handed
            if state is not None:  # the server step's state, so this hospital steps as the others do
                state.save(self._state_path)
        elif message["base_model_encrypted"]:
            raw = self.store.get_bytes(message["base_model_key"], sha256=message["base_model_sha256"])
            average = self._decrypt(raw, message["base_total_samples"], min_clients=message["min_clients"])
            weights = self._server_step(average, message["base_model_sha256"], params)
        else:
            raw = self.store.get_bytes(message["base_model_key"], sha256=message["base_model_sha256"])
            weights = np.load(io.BytesIO(raw), allow_pickle=False)
            strategies.ServerState(model=np.asarray(weights, np.float32)).save(self._state_path)
        weights = np.asarray(weights, dtype=np.float32)
        np.save(cache, weights)
        return weights

    def _handed_over(self, aggregate_sha: str):
        """A base model this hospital cannot decrypt because it joined the committee after
        the round: (model, server state or None) as the other members handed them over in
        the ceremony that added it; None if there is no handover."""
        if self.codec.profile != "threshold":
            return None
        from cxr_mq import threshold_flow as flow

        try:
            return flow.take_over(self.store, self.codec.ceremony_id, self.identity, self.verifier.registry,
                                  aggregate_sha)
        except (flow.FlowError, CodecError) as exc:
            raise CodecError(f"the handed-over base model: {exc}") from None

    def _server_step(self, average, aggregate_sha: str, params: training.TrainingParams) -> np.ndarray:
        """The next global model from a round's decrypted average: the strategy's server step,
        taken here as at every hospital, from the state kept on disk (idempotent per aggregate)."""
        cache = self.work_dir / f"base-{aggregate_sha}.npy"
        if cache.exists():  # stepped already (a redelivery, possibly after a restart)
            return np.load(cache)
        sizes = training.tensor_sizes(self._model("train", params)) if params.server_clipnorm > 0 else None
        strategy = strategies.make(params, sizes)
        average = np.asarray(average, dtype=np.float32)
        state = strategies.ServerState.load(self._state_path)
        if not strategy.stateful:
            state = strategies.ServerState(model=average[:average.size // strategy.upload_factor])
        elif state is None:
            raise Refuse(f"{strategy.name}: no strategy state at hospital {self.id} (it did not "
                         f"take part from the first round), cannot take the server step")
        try:
            state = strategies.advance(strategy, state, average, aggregate_sha)
        except ValueError as exc:
            raise Refuse(str(exc)) from None
        state.save(self._state_path)
        return state.model

    # -- model_ready / round_aborted --------------------------------------------------------
    def on_model_ready(self, message: dict, delivery: Delivery) -> None:
        round_no = message["round"]
        log = self.log.bind(round=round_no)
        if self._applied_model == (round_no, message["sha256"]):
            # a redelivery (or the aggregator announcing again after a restart): done already
            log.info("model_ready_already_applied", redelivered=delivery.redelivered)
            return
        if self._applied_model is not None and round_no < self._applied_model[0]:
            raise Refuse(f"stale model_ready for round {round_no}: round "
                         f"{self._applied_model[0]}'s model is applied already")
        if message["key"] != rounds.aggregate_key(round_no):
            raise Refuse(f"model_ready for round {round_no} names {message['key']!r}, "
                         f"not the round's aggregate {rounds.aggregate_key(round_no)!r}")
        record = rounds.read_json(self.store, rounds.round_key(round_no))
        if record is None:
            raise Refuse(f"model_ready for unknown round {round_no}")
        try:
            self.verifier.verify_stored(record, role="controller")
        except messages.MessageError as exc:
            raise Refuse(f"round {round_no}'s record: {exc}") from None
        if (message["key_fingerprint"] not in self.contexts.known and record.get("hospitals")
                and self.id not in record["hospitals"]):
            # e.g. a hospital removed from the committee: the round was not its, nor is the key
            log.info("model_ready_not_for_this_hospital")
            return
        contributors = len(message["contributors"])
        fewest = max(self.min_clients_floor, record["min_clients"])
        most = record.get("max_contributors") or record["quorum"]
        if not fewest <= contributors <= most:
            self._refuse(round_no, "model_ready", (
                f"model_ready for round {round_no} names {contributors} contributor(s); this hospital "
                f"decrypts only aggregates of {fewest} to {most} updates"))
        raw = self.store.get_bytes(message["key"], sha256=message["sha256"])
        try:
            weights = np.asarray(self._decrypt(raw, message["total_samples"], contributors=message["contributors"],
                                               min_clients=record["min_clients"], outcome=True,
                                               fingerprint=message["key_fingerprint"]), dtype=np.float32)
        except UndecryptableRound as exc:
            self.status = "idle"
            log.warning("round_undecryptable", reason=str(exc))
            return
        except CodecError as exc:
            self._refuse(round_no, "model_ready", f"round {round_no}: the aggregate was not decrypted: {exc}")
        params = training.TrainingParams.from_dict(record["training"])
        weights = self._server_step(weights, message["sha256"], params)
        np.save(self.work_dir / f"base-{message['sha256']}.npy", weights)
        evaluation.save_hospital_model(self.work_dir, weights, round_no=round_no, aggregate_sha256=message["sha256"],
                                       key_fingerprint=message["key_fingerprint"],
                                       profile=self.contexts.known[message["key_fingerprint"]].profile,
                                       strategy=params.strategy, at=self.clock())
        self.models_applied.append((round_no, self.clock()))
        if self.synthetic:
            self.status = "idle"
            self._applied_model = (round_no, message["sha256"])
            log.info("global_model_applied", contributors=message["contributors"], synthetic=True)
            return
        model = self._model("evaluate", params)
        training.load_flat_weights(model, weights)
        self.last_global_metrics = {"round": round_no,
                                    **training.evaluate(model, self._local_data(params))}
        self._record_evaluation(round_no, log)
        self.status = "idle"
        self._applied_model = (round_no, message["sha256"])
        log.info("global_model_evaluated", contributors=message["contributors"],
                 accuracy=self.last_global_metrics.get("accuracy"),
                 auc=self.last_global_metrics.get("auc"))

    def _record_evaluation(self, round_no: int, log) -> None:
        """Leave the global model's metrics on the local validation split where ``cxr-mq
        report`` finds them (the next update_ready carries them too, but a round may be the
        last). Plaintext aggregate figures only, as in update_ready; best effort."""
        try:
            rounds.write_json(self.store, rounds.evaluation_key(round_no, self.id),
                              {"round": round_no, "hospital": self.id,
                               "metrics": self.last_global_metrics, "at": self.clock()})
        except StoreError as exc:
            log.warning("evaluation_not_recorded", error=str(exc))

    def _clear_samples(self, round_start: dict, n_train: int) -> int:
        """The sample count update_ready shows: under the threshold profile the count travels
        only inside the encrypted stream, and the message says 1."""
        codec = self.contexts.known[round_start["key_fingerprint"]]
        return 1 if codec.profile == "threshold" else n_train

    def _encrypt(self, round_start: dict, weights: np.ndarray, n_samples: int, out) -> None:
        codec = self.contexts.known[round_start["key_fingerprint"]]  # checked by on_round_start
        if codec.profile != "threshold":
            codec.encrypt_update(weights, n_samples, out,
                                 max_contributors=round_start.get("max_contributors") or round_start["quorum"])
            return
        from cxr_mq import threshold_flow as flow

        flow.encrypt_and_upload(self.store, codec, weights, n_samples, out,
                                flow.round_encoding(codec, round_start), self.identity)

    def _decrypt(self, raw: bytes, total_samples: int, *, contributors=None, min_clients: int,
                 outcome: bool = False, fingerprint: str | None = None) -> np.ndarray:
        """The FedAvg model in an aggregate. Threshold profile: through the committee
        (``threshold_flow.decrypt_round``); with ``outcome`` the result is recorded for
        ``status``, and a round the committee cannot decrypt raises UndecryptableRound.
        ``fingerprint``: the context the round names (default: the newest held)."""
        if fingerprint is None and self.codec is None:
            raise CodecError(f"hospital {self.id} holds no key context yet (run 'cxr-mq keys init')")
        codec = self.contexts.known.get(fingerprint or self.codec.fingerprint)
        if codec is None:
            raise CodecError(f"the aggregate is under context {fingerprint[:16]}…, which hospital {self.id} does not hold")
        if codec.profile != "threshold":
            # a round's aggregate: exactly its contributors, at least its minimum and the floor;
            # a base model (no contributors given): at least the floor
            if contributors is None:
                return codec.decrypt_aggregate(io.BytesIO(raw), total_samples, min_updates=self.min_clients_floor)
            return codec.decrypt_aggregate(io.BytesIO(raw), total_samples, n_updates=len(contributors),
                                           min_updates=max(self.min_clients_floor, min_clients))
        from cxr_mq import threshold_flow as flow
        from cxr_mq.crypto.committee import CommitteeRefusal, Ledger

        header, key_sum = codec.read_prefix(io.BytesIO(raw))
        round_no = header.encoding.round
        try:
            weights, total = flow.decrypt_round(
                self.store, codec, flow.load_share(self.work_dir, codec), round_no,
                contributors or key_sum.contributors, raw, self.identity, self.verifier.registry,
                Ledger(self.work_dir / "committee-ledger"),
                min_clients=max(self.min_clients_floor, min_clients),
                deadline=self.clock() + self.committee_timeout, sleep=self.broker.sleep, clock=self.clock)
        except (flow.FlowError, CommitteeRefusal) as exc:
            if outcome:
                flow.record_outcome(self.store, round_no, self.identity, str(exc))
            raise UndecryptableRound(str(exc)) from None
        if outcome:
            flow.record_outcome(self.store, round_no, self.identity, None)
        self.decrypted_samples[round_no] = int(total)
        return weights

    def on_round_aborted(self, message: dict, delivery: Delivery) -> None:
        self.status = "idle"
        self.log.warning("round_aborted", round=message["round"], reason=message["reason"])

    def on_ceremony(self, message: dict, delivery: Delivery) -> None:
        """The threshold key ceremony (docs/threshold.md): deal, then keep the committee share."""
        from cxr_mq import threshold_flow as flow
        from cxr_mq.crypto import CodecError

        try:
            if message["schema"] == "ceremony_start":
                outcome = flow.on_ceremony_start(self.store, message, self.identity, self.verifier.registry)
            else:
                previous = self.codec if self.codec is not None and self.codec.profile == "threshold" else None
                outcome = flow.on_ceremony_finalize(self.store, message, self.identity, self.verifier.registry,
                                                    self.work_dir, previous=previous)
                if outcome != "not a party":  # rounds under the new committee key from now on
                    self.contexts.adopt(flow.ceremony_context(self.store, message["ceremony_id"],
                                                              self.verifier.registry, message["public_sha256"]))
                    self.contexts.retire(keep=self.codec)  # their shares were just deleted
                    self.log.info("public_context_taken", ceremony=message["ceremony_id"],
                                  fingerprint=self.codec.fingerprint[:16])
        except (flow.FlowError, CodecError, ObjectNotFound) as exc:
            raise Refuse(f"ceremony {message['ceremony_id']}: {exc}") from None
        self.log.info(message["schema"], ceremony=message["ceremony_id"], outcome=outcome)


class UndecryptableRound(Exception):
    """The committee could not (or would not) decrypt a threshold round's aggregate."""


def synthetic_samples(hospital_id: str) -> int:
    """A fixed, hospital-specific sample count (50..149) for synthetic rounds."""
    return 50 + zlib.crc32(hospital_id.encode()) % 100


def synthetic_update(base: np.ndarray, hospital_id: str, round_no: int) -> np.ndarray:
    """Stands in for local training in benchmarks: the base model plus seeded noise, the same
    for the same hospital and round (so a repeated run sums the same updates)."""
    seed = zlib.crc32(f"{hospital_id}:{round_no}".encode())
    noise = np.random.default_rng(seed).standard_normal(base.size, dtype=np.float32)
    return base + np.float32(0.01) * noise
