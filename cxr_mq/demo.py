"""``cxr-mq demo``: the whole federation on one machine, through the production code paths.

The hospital, aggregator and controller code is the same that runs on EC2; only the parts
under it are embedded by default: an in-process broker (same interface and semantics as
RabbitMQ) and a local-directory object store (same interface as S3). ``--broker amqp://...``
and ``--store s3://BUCKET`` swap in the real ones; the run then gets a namespace of its own on
the broker (deleted afterwards) and a key prefix of its own in the bucket (kept, for audit).

A demo must end: a worker whose handler keeps failing, a refused message, a dead worker
thread or a round without a result stops the run with one line saying why, and every worker
thread is stopped before the command returns.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workers.aggregator import AggregatorWorker
from workers.hospital import HospitalWorker

from . import controller, crypto, identity, metrics, training
from .config import PROFILES, ConfigError, Settings
from .config import _redact as redact_url
from .data import load_images, map_label, read_label_file, split_patients, write_label_file
from .partition import format_class_table, partition_dataset, patient_classes
from .rounds import RoundState
from .storage.base import ObjectInfo, ObjectStore
from .crypto.committee import MIN_CLIENTS_FLOOR
from .transport.base import Broker, Refuse, Requeue, Topology

MAX_HANDLER_FAILURES = 3     # consecutive failures of one worker before the demo gives up
BROKER_RECONNECT_SECONDS = 30.0
POLL_SECONDS = 1.0
SHUTDOWN_SECONDS = 60.0

_FLAGS = {"model": "--model", "image_size": "--image-size", "classes": "--classes",
          "epochs": "--epochs", "lr": "--lr", "batch_size": "--batch-size", "seed": "--seed",
          "width": "--width", "server_lr": "--server-lr"}


class DemoError(Exception):
    """The demo could not finish: a round aborted, a worker kept failing or died."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}" if not text.startswith(type(exc).__name__) else text


@dataclass
class DemoOptions:
    hospitals: int = 3
    rounds: int = 20                 # with n=1440: no run under 0.951 after round 10 (README)
    data: str | None = None          # a COVIDx label file; default: synthetic
    n: int = 1440                    # synthetic images when no --data (720: final 0.914 in one run)
    model: str = "covidnet-s"
    width: float = 0.5               # channel multiplier of the model
    image_size: int = 32
    classes: str = "binary"
    epochs: int = 2                  # local epochs per round
    lr: float = 2e-3                 # round 1's learning rate
    lr_final: float | None = None    # the last round's (None: lr / 10); cosine in between
    server_lr: float = 1.0           # FedAvg's server learning rate (1: plain FedAvg)
    augment: bool = False            # COVID-Net's training augmentation
    batch_size: int = 16
    alpha: float | None = 2.0        # Dirichlet non-IID; None = IID
    seed: int = 0
    plaintext: bool = False
    profile: str = "threshold"       # codec profile: threshold (ceremony + committee), compact, seed
    broker: str | None = None        # amqp://... ; default embedded
    store: str | None = None         # s3://BUCKET or a directory; default local temp dir
    test_fraction: float = 0.2
    deadline: float = 900.0
    work_dir: str | None = None
    warm_up: bool = False            # one untimed training step first (fair --compare timings)

    def training_params(self, round_no: int = 1) -> training.TrainingParams:
        """What round ``round_no`` (1-based) asks the hospitals to do."""
        return training.TrainingParams(model=self.model, width=self.width, image_size=self.image_size,
                                       classes=self.classes, epochs=self.epochs,
                                       lr=self.round_lr(round_no), batch_size=self.batch_size,
                                       seed=self.seed, augment=self.augment, server_lr=self.server_lr)

    def round_lr(self, round_no: int) -> float:
        """Cosine from ``lr`` in round 1 to ``lr_final`` in the last round: large steps while
        the model is far off, small ones once the hospitals' models mostly need to agree."""
        final = self.lr / 10 if self.lr_final is None else self.lr_final
        progress = (round_no - 1) / max(self.rounds - 1, 1)
        return float(final + 0.5 * (self.lr - final) * (1 + math.cos(math.pi * progress)))

    def validate(self) -> None:
        """Raise ConfigError naming the flag for anything wrong before any work is done."""
        for flag, value in (("--hospitals", self.hospitals), ("--rounds", self.rounds),
                            ("--n", self.n)):
            if value < 1:
                raise ConfigError(flag, f"must be at least 1, got {value}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError("--alpha", f"must be positive (0 means IID), got {self.alpha}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError("test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.data is not None and not Path(self.data).is_file():
            raise ConfigError("--data", f"no such label file: {self.data}")
        if self.broker and not self.broker.startswith(("amqp://", "amqps://")):
            raise ConfigError("--broker", f"must be an amqp:// URL, got {redact_url(self.broker)!r}")
        if self.store and self.store.startswith("s3://") and not self.store[5:].strip("/"):
            raise ConfigError("--store", "s3:// needs a bucket name: s3://BUCKET")
        if self.profile not in PROFILES:
            raise ConfigError("--profile", f"must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.profile == "threshold" and not self.plaintext and self.hospitals < MIN_CLIENTS_FLOOR:
            raise ConfigError("--hospitals", f"{self.hospitals} hospital(s): the threshold profile's committee "
                              f"decrypts sums of at least {MIN_CLIENTS_FLOOR} updates; use --hospitals "
                              f"{MIN_CLIENTS_FLOOR} or more, or --profile compact")
        if self.lr_final is not None and not self.lr_final > 0:
            raise ConfigError("--lr-final", f"must be positive, got {self.lr_final}")
        try:
            self.training_params(1)
            self.training_params(self.rounds)
        except ValueError as exc:
            flag = next((f for name, f in _FLAGS.items() if f"'{name}'" in str(exc)), "--model")
            raise ConfigError(flag, str(exc)) from None

    def public_dict(self) -> dict:
        """The settings as recorded in the report (no password from a broker URL)."""
        out = asdict(self)
        if out["broker"]:
            out["broker"] = redact_url(out["broker"])
        return out


@dataclass
class RoundReport:
    round: int
    contributors: list[str]
    total_samples: int
    metrics: dict
    bytes_uploaded: int
    encrypt_seconds: float
    train_seconds: float
    aggregate_seconds: float
    wall_seconds: float
    committee: dict | None = None    # threshold profile: who decrypted the round (threshold_view)


@dataclass
class DemoResult:
    mode: str
    settings: dict
    partition: dict
    rounds: list[RoundReport] = field(default_factory=list)
    wall_seconds: float = 0.0
    final_probabilities: list = field(default_factory=list)
    final_labels: list = field(default_factory=list)
    ceremony: dict | None = None     # threshold profile: the key ceremony (threshold_view)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("final_probabilities")
        out.pop("final_labels")
        return out


# -- the services under the workers -----------------------------------------------------------
class PrefixedStore(ObjectStore):
    """A view of another store under a key prefix, so a demo on a shared bucket or directory
    starts at round 1 and never reads another run's rounds. Keys seen by callers are unprefixed."""

    def __init__(self, inner: ObjectStore, prefix: str):
        self.inner, self.prefix = inner, prefix.rstrip("/") + "/"

    def _info(self, key: str, info: ObjectInfo) -> ObjectInfo:
        return ObjectInfo(key, info.sha256, info.size, info.etag)

    def put_file(self, key, path):
        return self._info(key, self.inner.put_file(self.prefix + key, path))

    def put_bytes(self, key, data, *, if_none_match=False, if_match=None):
        return self._info(key, self.inner.put_bytes(self.prefix + key, data,
                                                    if_none_match=if_none_match, if_match=if_match))

    def get_versioned(self, key):
        return self.inner.get_versioned(self.prefix + key)

    def download(self, key, path, sha256=None):
        return self._info(key, self.inner.download(self.prefix + key, path, sha256=sha256))

    def get_bytes(self, key, sha256=None):
        return self.inner.get_bytes(self.prefix + key, sha256=sha256)

    def exists(self, key):
        return self.inner.exists(self.prefix + key)

    def list(self, prefix=""):
        return [k[len(self.prefix):] for k in self.inner.list(self.prefix + prefix)]

    def delete(self, key):
        self.inner.delete(self.prefix + key)

    def describe(self, key):
        return self.inner.describe(self.prefix + key)


class Federation:
    """Broker connections and the store for one demo run: embedded by default, real when asked."""

    def __init__(self, options: DemoOptions, settings: Settings, root: Path, run_id: str):
        self.options, self.settings, self.root = options, settings, root
        self.run_id = run_id
        # on a shared RabbitMQ the run gets its own namespace; in-process, the default one
        self.topology = Topology(run_id if options.broker else "cxr")
        self._server = None
        self._brokers: list[Broker] = []

    def broker(self, user: str = "controller") -> Broker:
        """A connection for party ``user``: in-process, logged in as that party (so every
        message carries its sender's ``user_id``); on RabbitMQ, with the URL's one login."""
        if self.options.broker:
            from .runtime import tls_options
            from .transport.rabbitmq import RabbitMQBroker
            broker = RabbitMQBroker(self.options.broker, self.topology,
                                    reconnect_for=BROKER_RECONNECT_SECONDS,
                                    tls=tls_options(self.settings))
        else:
            from .transport.embedded import EmbeddedBroker, EmbeddedServer
            if self._server is None:
                self._server = EmbeddedServer()
            broker = EmbeddedBroker(self._server, self.topology, user=user)
        self._brokers.append(broker)
        return broker

    @property
    def store_prefix(self) -> str | None:
        return f"demo/{self.run_id}/" if self.options.store else None

    def store(self) -> ObjectStore:
        target = self.options.store
        if target and target.startswith("s3://"):
            from .storage.s3 import S3Store
            bucket = target[len("s3://"):].strip("/")
            if not self.settings.kms_key_id:
                raise ConfigError("CXR_MQ_KMS_KEY_ID", "is required for --store s3://")
            return PrefixedStore(S3Store(bucket=bucket, kms_key_id=self.settings.kms_key_id,
                                         endpoint_url=self.settings.s3_endpoint_url,
                                         region=self.settings.aws_region), self.store_prefix)
        from .storage.local import LocalStore
        if target:
            return PrefixedStore(LocalStore(Path(target)), self.store_prefix)
        return LocalStore(self.root / "store")

    def close(self, control: Broker | None, hospitals) -> None:
        """Delete a real broker's demo namespace (through ``control``, which only the calling
        thread used), then close every connection."""
        if self.options.broker and control is not None:
            try:
                control.delete_topology(hospitals)
            except Exception as exc:  # noqa: BLE001 - clean-up is best effort; say so
                logging.getLogger(__name__).warning(
                    "could not delete broker namespace %s: %r", self.topology.namespace, exc)
        for broker in self._brokers:
            try:
                broker.close()
            except Exception:  # noqa: BLE001 - closing what is going away anyway
                pass


def _prepare_data(options: DemoOptions, root: Path) -> tuple[list[Path], tuple, dict]:
    """Synthesize (or read) a dataset; hold out test patients; split the rest non-IID."""
    from .synth import write_synthetic

    if options.data:
        label_file = Path(options.data)
    else:
        try:
            label_file = write_synthetic(root / "synthetic", n=options.n, seed=options.seed,
                                         classes=options.classes, size=options.image_size)
        except ValueError as exc:
            raise ConfigError("--image-size" if "size" in str(exc) else "--n", str(exc)) from None
    labels = read_label_file(label_file)
    classes = training.class_names(options.classes)
    records = [r for r in labels.records if map_label(r.label, classes) is not None]
    _, test_patients = split_patients(records, options.test_fraction, options.seed)
    pool = [r for r in records if r.patient not in test_patients]
    test = [r for r in records if r.patient in test_patients]
    n_pool = len(patient_classes(pool))
    source = f"{options.data}" if options.data else f"{options.n} synthetic images"
    if not test:
        raise ConfigError("--n" if not options.data else "--data",
                          f"{source}: too few patients to hold out a test set")
    if n_pool < options.hospitals:
        raise ConfigError("--hospitals", f"{options.hospitals} hospitals, but {source} leave only "
                          f"{n_pool} patients after the held-out test set (one per hospital at least)")
    pool_file = _link_pool(root / "pool", pool)
    try:
        table = partition_dataset(pool_file, options.hospitals, root / "hospitals",
                                  alpha=options.alpha, seed=options.seed, mode="symlink")
    except ValueError as exc:  # e.g. no Dirichlet draw gives every hospital a patient
        raise ConfigError("--hospitals", str(exc)) from None
    dirs = [Path(h["dir"]) for h in table["hospitals"]]
    index = {c: i for i, c in enumerate(classes)}
    y_test = np.array([index[map_label(r.label, classes)] for r in test], dtype=np.int32)
    x_test = load_images([r.path for r in test], options.image_size)
    return dirs, (x_test, y_test, classes), table


def _link_pool(pool_dir: Path, records) -> Path:
    """A label file of the federation's patients beside links to their images (the user's
    data directory is never written to)."""
    for r in records:
        link = pool_dir / r.filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(Path(r.path).resolve())
    return write_label_file(pool_dir / "labels.txt", records)


# -- the workers, on threads ------------------------------------------------------------------
class Crew:
    """The demo's worker threads, the lock that serialises their TensorFlow work, and what
    went wrong with them, so the controller can stop waiting as soon as a round cannot end."""

    def __init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()  # one TensorFlow job at a time: hospitals share the CPUs
        self.threads: list[threading.Thread] = []
        self._failures: dict[str, tuple[int, str]] = {}  # worker -> (consecutive, last error)
        self._fatal: dict[str, str] = {}

    def start(self, name: str, worker) -> None:
        def target():
            try:
                worker.run()
            except BaseException as exc:  # noqa: BLE001 - reported by check() on the main thread
                self._fatal[name] = _describe(exc)
        thread = threading.Thread(target=target, name=f"demo-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def handler_failed(self, name: str, error: str, fatal: bool = False) -> None:
        if fatal:
            self._fatal[name] = error
            return
        count = self._failures.get(name, (0, ""))[0]
        if count >= MAX_HANDLER_FAILURES:  # already given up on: keep the failures check() reports
            return
        self._failures[name] = (count + 1, error)

    def handler_succeeded(self, name: str) -> None:
        self._failures.pop(name, None)

    def check(self) -> None:
        for name, error in list(self._fatal.items()):
            raise DemoError(f"{name}: {error}")
        for name, (count, error) in list(self._failures.items()):
            if count >= MAX_HANDLER_FAILURES:
                raise DemoError(f"{name} failed {count} times in a row: {error}")
        for thread in self.threads:
            if not thread.is_alive() and not self.stop.is_set():
                raise DemoError(f"worker thread {thread.name} stopped unexpectedly")

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> list[str]:
        """Stop every worker; return the names of threads still running after ``timeout``."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        # a hospital stopped mid-training leaves its training thread to finish under the lock
        if self.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.lock.release()
        return [t.name for t in self.threads if t.is_alive()]


class _Watched:
    """Report each handler's outcome to the crew. The broker retries a failing handler
    forever (right for a long-running worker); the demo gives up after a few failures."""

    crew: Crew
    label: str

    def on_delivery(self, delivery):
        try:
            super().on_delivery(delivery)
        except Requeue:
            raise
        except Refuse as exc:  # every message of a demo is meant to be used: a refusal is a bug
            self.crew.handler_failed(self.label, f"refused a {delivery.routing_key}: {exc.reason}",
                                     fatal=True)
            raise
        except Exception as exc:
            self.crew.handler_failed(self.label, f"{delivery.routing_key}: {_describe(exc)}")
            raise
        self.crew.handler_succeeded(self.label)

    def tick(self):
        """Housekeeping (the aggregator's deadlines and announcements) is retried every second
        by the worker; failing every time, it would hold the round until its deadline."""
        name = f"{self.label} (housekeeping)"
        try:
            super().tick()
        except Exception as exc:
            self.crew.handler_failed(name, _describe(exc))
            raise
        self.crew.handler_succeeded(name)


class DemoHospital(_Watched, HospitalWorker):
    """A hospital sharing the process with the others: its TensorFlow work takes turns."""

    def __init__(self, crew: Crew, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.crew, self.label = crew, self.id
        self.decrypted: dict[int, np.ndarray] = {}  # threshold: round -> the committee's FedAvg

    def _train_and_upload(self, message, params):
        self.status = "queued"
        with self.crew.lock:
            self.status = "loading"
            return super()._train_and_upload(message, params)

    def on_model_ready(self, message, delivery):
        self.status = "queued"
        with self.crew.lock:
            self.status = "evaluating"
            return super().on_model_ready(message, delivery)

    def _decrypt(self, raw, total_samples, **kwargs):
        """Under the threshold profile the committee needs T hospitals at once: a member
        waiting for the others must not hold the TensorFlow lock they queue for. The
        decrypted model (before the server step) is kept for the demo's own evaluation."""
        if self.codec is None or self.codec.profile != "threshold":
            return super()._decrypt(raw, total_samples, **kwargs)
        self.status = "committee"
        self.crew.lock.release()  # held by on_model_ready (or the training of a round)
        try:
            weights = super()._decrypt(raw, total_samples, **kwargs)
        finally:
            self.crew.lock.acquire()
            self.status = "evaluating"
        self.decrypted[self.codec.read_prefix(io.BytesIO(raw))[0].encoding.round] = weights
        return weights


class DemoAggregator(_Watched, AggregatorWorker):
    def __init__(self, crew: Crew, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.crew, self.label = crew, "aggregator"


# -- running ----------------------------------------------------------------------------------
class DemoRun:
    """One federation run; ``view`` (optional) is told what happens for a live display."""

    def __init__(self, options: DemoOptions, settings: Settings, view=None):
        self.options, self.settings, self.view = options, settings, view
        self._model = None

    def run(self) -> DemoResult:
        options = self.options
        options.validate()
        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing chatter per round
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cxr-mq-demo-", dir=options.work_dir) as tmp:
            root = Path(tmp)
            federation = Federation(options, self.settings, root, f"demo-{uuid.uuid4().hex[:8]}")
            crew, control, ids, reachable = Crew(), None, [], False
            try:
                store = federation.store()
                control = federation.broker()
                self._say("connecting to the broker and the store")
                reachable = self._reach_broker(control)
                self._reach_store(store)
                self._say("reading the data" if options.data else "synthesising chest X-rays")
                dirs, test_set, table = _prepare_data(options, root)
                ids = [d.name for d in dirs]
                self._say("starting" if options.plaintext or self._threshold else "generating keys")
                secret, public = self._codecs()
                if options.warm_up:
                    self._say("warming up TensorFlow")
                    self._warm_up(dirs[0])
                self._say("starting the workers")
                session = self._start(federation, crew, control, store, secret, public, dirs, root)
                session.test_set = test_set
                session.max_samples = max(h["images"] for h in table["hospitals"])
                result = DemoResult(
                    mode="plaintext" if options.plaintext else "encrypted",
                    settings={**options.public_dict(), "codec_profile": getattr(session.public, "profile", None),
                              "namespace": federation.topology.namespace,
                              "store_prefix": federation.store_prefix},
                    partition=table, ceremony=session.ceremony)
                for _ in range(options.rounds):
                    result.rounds.append(self._one_round(session, result))
            except Exception as exc:
                if type(exc).__module__.startswith("pika"):  # retries exhausted on the main thread
                    raise DemoError(f"lost the broker: {_describe(exc)}") from exc
                raise
            finally:
                stuck = crew.shutdown()
                federation.close(control if reachable else None, ids)
                if stuck:
                    logging.getLogger(__name__).warning("worker threads still running: %s", stuck)
        result.wall_seconds = time.perf_counter() - started
        return result

    @property
    def _threshold(self) -> bool:
        return not self.options.plaintext and self.options.profile == "threshold"

    def _start(self, federation, crew, control, store, secret, public, dirs, root) -> "_Session":
        """Declare the hospitals' queues and the controller's reply queue, then start one
        hospital per data directory and the aggregator, each on its own connection. Under the
        threshold profile the hospitals start without a key, run the key ceremony (the demo's
        controller plays the key authority) and the aggregator starts on its public key."""
        ids = [d.name for d in dirs]
        control.declare_topology(ids)
        queue = control.temporary_queue(["model_ready", "round_aborted"])
        # the demo plays the key authority: one identity per party, registered in its store
        parties = {name: identity.provision(store, name, role) for name, role in
                   [("controller", "controller"), ("aggregator", "aggregator")]
                   + [(h, "hospital") for h in ids]}
        # on RabbitMQ every party uses the URL's one login; in-process each has its own
        shared = frozenset({control.user}) if self.options.broker else frozenset()
        verifier = identity.Verifier(identity.Registry(store), shared_broker_users=shared)
        hospitals = [DemoHospital(crew, federation.broker(d.name), store, secret, d.name, str(d),
                                  str(root / "work"), stop=crew.stop, identity=parties[d.name],
                                  verifier=verifier,
                                  min_clients_floor=self._min_clients_floor(len(dirs)))
                     for d in dirs]
        for hospital in hospitals:
            crew.start(hospital.id, hospital)
        ceremony = None
        if self._threshold:
            public, ceremony = self._ceremony(federation, crew, store, ids, parties["controller"])
        aggregator = DemoAggregator(crew, federation.broker("aggregator"), store, public,
                                    hospitals=ids, work_dir=str(root), stop=crew.stop,
                                    identity=parties["aggregator"], verifier=verifier)
        crew.start("aggregator", aggregator)
        session = _Session(crew, control, queue, store, secret, public, aggregator, hospitals,
                           parties["controller"], verifier, ceremony=ceremony)
        if self._threshold and self.view is not None and hasattr(self.view, "add_panel"):
            self.view.add_panel(lambda: self._committee_panel(session))
        return session

    def _committee_panel(self, session: "_Session"):
        """Finished rounds' committees, and the one running (read from the store)."""
        from . import threshold_view

        rows = list(session.committee_rows)
        if session.committee_round is not None:
            rows.append(threshold_view.committee_round(session.store, session.committee_round,
                                                       [h.id for h in session.hospitals]))
        return threshold_view.render_committee(rows, [h.id for h in session.hospitals]) if rows else None

    def _ceremony(self, federation, crew, store, ids, authority):
        """``cxr-mq keys init``'s ceremony through the running demo hospitals, T a majority:
        the collective public key becomes the public context in the store."""
        from . import threshold_flow, threshold_view
        from .crypto.ceremony import CeremonyParams, majority

        params = CeremonyParams(federation.topology.namespace, tuple(sorted(ids)), majority(len(ids)),
                                f"c{uuid.uuid4().hex[:12]}")
        final: list = []  # the ceremony's end state: drawn without reading the store again
        if self.view is not None and hasattr(self.view, "add_panel"):
            self.view.add_panel(lambda: threshold_view.render_ceremony(
                final[0] if final else threshold_view.ceremony_progress(store, params)))
        self._say(f"key ceremony: T = {params.threshold} of {len(ids)} hospitals")
        done = threading.Event()
        outcome: dict = {}

        def run():
            try:
                outcome["codec"] = threshold_flow.run_ceremony(
                    store, federation.broker(authority.id), params, authority, identity.Registry(store),
                    timeout=self.options.deadline, poll=0.1)
            except Exception as exc:  # noqa: BLE001 - reported on the main thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name="demo-ceremony", daemon=True).start()
        while not done.wait(POLL_SECONDS / 4):
            crew.check()  # a hospital failing its ceremony step stops the demo with the reason
        if "error" in outcome:
            raise DemoError(f"key ceremony {params.ceremony_id}: {_describe(outcome['error'])}")
        codec = outcome["codec"]
        store.put_bytes(self.settings.public_context_key, codec.public_bytes())
        summary = threshold_view.ceremony_progress(store, params, codec.fingerprint)
        final.append(summary)
        if self.view is not None and hasattr(self.view, "note"):
            self.view.note(summary.line())
        return codec, {**dataclasses.asdict(summary), "profile": codec.profile}

    def _say(self, what: str) -> None:
        if self.view is not None and hasattr(self.view, "preparing"):
            self.view.preparing(what)

    def _reach_broker(self, control: Broker) -> bool:
        """Reach the broker before any real work, so a wrong URL fails fast and clearly."""
        try:
            control.declare_topology([])
        except Exception as exc:  # noqa: BLE001 - pika raises its own types after retries
            where = redact_url(self.options.broker) if self.options.broker else "embedded"
            raise DemoError(f"cannot use the broker ({where}): {_describe(exc)}") from exc
        return True

    def _reach_store(self, store: ObjectStore) -> None:
        try:
            store.list("rounds/")
        except Exception as exc:  # noqa: BLE001
            raise DemoError(f"cannot use the store ({self.options.store or 'local'}): "
                            f"{_describe(exc)}") from exc

    def _codecs(self):
        if self.options.plaintext:
            from .plaintext import PlaintextCodec
            codec = PlaintextCodec()
            return codec, codec
        if self._threshold:
            return None, None  # no key yet: the ceremony makes the public one, nobody the secret
        pair = crypto.generate_keys(self.options.profile)
        return crypto.load_context(pair.secret), crypto.load_context(pair.public)

    def _warm_up(self, hospital_dir: Path) -> None:
        """Pay TensorFlow's one-off start-up (runtime, tf.data, first trace) outside the timed
        rounds, so an encrypted and a plaintext run compare like with like."""
        params = self.options.training_params()
        data = training.LocalData.from_dir(str(hospital_dir), params, val_fraction=0.2)
        k = min(params.batch_size, data.n_train)
        data = dataclasses.replace(data, x_train=data.x_train[:k], y_train=data.y_train[:k])
        model = training.build_model(params)
        training.train_local(model, data, params)
        training.predict_proba(model, data.x_train[:k])

    def _wait(self, control, queue, round_no: int, crew: Crew, verifier=None) -> dict:
        limit = time.monotonic() + self.options.deadline + 60
        while True:
            crew.check()
            try:
                return controller.wait_for_round(control, queue, round_no, POLL_SECONDS,
                                                 verifier=verifier)
            except controller.RoundTimeout:
                if time.monotonic() > limit:
                    raise DemoError(f"round {round_no}: no model_ready or round_aborted within "
                                    f"{self.options.deadline + 60:.0f}s") from None

    def _min_clients_floor(self, hospitals: int) -> int:
        """A demo of fewer hospitals than the floor lowers it to their number: one process
        holds every hospital's update anyway, so there is nobody to hide them from."""
        return min(self.settings.min_clients_floor, hospitals)

    def _one_round(self, session: "_Session", result: DemoResult) -> RoundReport:
        options, ids = self.options, [h.id for h in session.hospitals]
        request = controller.RoundRequest(quorum=len(ids), min_clients=len(ids),
                                          deadline_seconds=options.deadline,
                                          training=options.training_params(len(result.rounds) + 1),
                                          hospitals=tuple(ids),
                                          min_clients_floor=self._min_clients_floor(len(ids)),
                                          max_samples=session.max_samples)
        started = time.perf_counter()
        round_no = controller.open_round(session.control, session.store, session.public, request,
                                         session.controller_identity)["round"]
        if self.view:
            self.view.round_started(round_no, session.hospitals, session.aggregator)
        outcome = self._wait(session.control, session.queue, round_no, session.crew,
                             session.verifier)
        wall = time.perf_counter() - started
        if outcome["schema"] != "model_ready":
            raise DemoError(f"round {round_no} aborted: {outcome.get('reason')}")
        committee = self._committee(session, round_no) if self._threshold else None
        proba, y_test, classes = self._evaluate(session, outcome, committee)
        result.final_probabilities, result.final_labels = proba.tolist(), y_test.tolist()
        state = RoundState.load(session.store, round_no)
        timings = [h.timings.get(round_no, {}) for h in session.hospitals]
        row = RoundReport(
            round=round_no, contributors=outcome["contributors"],
            total_samples=committee["total_samples"] if committee else outcome["total_samples"],
            metrics=metrics.compute(y_test, proba, classes),
            bytes_uploaded=sum(a["size"] for a in state.accepted),
            encrypt_seconds=sum(t.get("encrypt_seconds", 0.0) for t in timings),
            train_seconds=sum(t.get("train_seconds", 0.0) for t in timings),
            aggregate_seconds=state.timings.get("aggregate_seconds", 0.0)
            + state.timings.get("finalize_seconds", 0.0),
            wall_seconds=wall, committee=committee)
        if self.view:
            self.view.round_finished(row)
        return row

    def _committee(self, session: "_Session", round_no: int) -> dict:
        """Wait for every hospital's committee outcome of the round (threshold profile): the
        round's committee as ``threshold_view.CommitteeRound.to_dict``, with the decrypted
        total sample count; DemoError if no hospital could decrypt."""
        from . import threshold_view

        ids = [h.id for h in session.hospitals]
        limit = time.monotonic() + self.settings.committee_timeout + 60
        session.committee_round = round_no
        while True:
            session.crew.check()
            row = threshold_view.committee_round(session.store, round_no, ids)
            # every outcome recorded, and each decrypting hospital done with its model
            if len(row.outcomes) == len(ids) and all(
                    round_no in h.decrypted for h in session.hospitals if h.id in row.decrypted_by):
                break
            if time.monotonic() > limit:
                raise DemoError(f"round {round_no}: committee outcomes only from "
                                f"{', '.join(sorted(row.outcomes)) or 'nobody'} within "
                                f"{self.settings.committee_timeout + 60:.0f}s")
            time.sleep(POLL_SECONDS / 4)
        session.committee_rows.append(row)
        session.committee_round = None
        if self.view is not None and hasattr(self.view, "note"):
            self.view.note(row.line())
        if not row.decrypted_by:
            raise DemoError(f"round {round_no}: {row.result()}")
        first = next(h for h in session.hospitals if h.id == row.decrypted_by[0])
        return {**row.to_dict(), "total_samples": first.decrypted_samples[round_no],
                "model_from": first.id}

    def _evaluate(self, session: "_Session", outcome: dict, committee: dict | None = None):
        """Predict the held-out test set with the round's global model: (probabilities,
        labels, class names). Single-key profiles: decrypted here, as any secret-key holder
        can; threshold: the model a hospital decrypted through the committee (nobody else can)."""
        x_test, y_test, classes = session.test_set
        if committee:
            hospital = next(h for h in session.hospitals if h.id == committee["model_from"])
            raw_weights = hospital.decrypted[outcome["round"]]
        else:
            raw = session.store.get_bytes(outcome["key"], sha256=outcome["sha256"])
        with session.crew.lock:  # takes its turn with the hospitals' TensorFlow work
            weights = raw_weights if committee else session.secret.decrypt_aggregate(
                io.BytesIO(raw), outcome["total_samples"])
            if self._model is None:
                self._model = training.build_model(self.options.training_params())
            training.load_flat_weights(self._model, np.asarray(weights, dtype=np.float32))
            proba = training.predict_proba(self._model, x_test)
        return proba, y_test, classes


@dataclass
class _Session:
    """What the rounds of one run share."""
    crew: Crew
    control: Broker
    queue: str
    store: ObjectStore
    secret: object
    public: object
    aggregator: DemoAggregator
    hospitals: list
    controller_identity: identity.Identity
    verifier: identity.Verifier
    test_set: tuple = ()
    ceremony: dict | None = None     # threshold profile: what the key ceremony did
    max_samples: int = 100_000       # threshold profile: the round encoding's sample cap
    committee_rows: list = field(default_factory=list)  # threshold_view.CommitteeRound per round
    committee_round: int | None = None  # the round whose committee is running


def run_demo(options: DemoOptions, settings: Settings, view=None) -> DemoResult:
    return DemoRun(options, settings, view).run()


def partition_summary(result: DemoResult) -> str:
    return format_class_table(result.partition)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, default=float))
