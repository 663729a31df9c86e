"""``cxr-mq demo``: the whole federation on one machine, through the production code paths.

The hospital, aggregator and controller code is the same that runs on EC2; only the parts
under it are embedded by default: an in-process broker (same interface and semantics as
RabbitMQ) and a local-directory object store (same interface as S3). ``--broker amqp://...``
and ``--store s3://BUCKET`` swap in the real ones.
"""
from __future__ import annotations

import io
import json
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import controller, crypto, metrics, rounds, training
from .config import ConfigError, Settings
from .data import load_images, read_label_file, split_patients, write_label_file
from .partition import format_class_table, partition_dataset
from .rounds import RoundState
from .storage.base import ObjectStore
from .transport.base import Broker, Topology


@dataclass
class DemoOptions:
    hospitals: int = 3
    rounds: int = 5
    data: str | None = None          # a COVIDx label file; default: synthetic
    n: int = 480                     # synthetic images when no --data
    model: str = "small-cnn"
    image_size: int = 48
    classes: str = "binary"
    epochs: int = 1
    lr: float = 2e-3
    batch_size: int = 16
    alpha: float | None = 0.5        # Dirichlet non-IID; None = IID
    seed: int = 0
    plaintext: bool = False
    broker: str | None = None        # amqp://... ; default embedded
    store: str | None = None         # s3://BUCKET or a directory; default local temp dir
    test_fraction: float = 0.2
    deadline: float = 900.0
    work_dir: str | None = None

    def training_params(self) -> training.TrainingParams:
        return training.TrainingParams(model=self.model, image_size=self.image_size,
                                       classes=self.classes, epochs=self.epochs, lr=self.lr,
                                       batch_size=self.batch_size, seed=self.seed)


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


@dataclass
class DemoResult:
    mode: str
    settings: dict
    partition: dict
    rounds: list[RoundReport] = field(default_factory=list)
    wall_seconds: float = 0.0
    final_probabilities: list = field(default_factory=list)
    final_labels: list = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("final_probabilities")
        out.pop("final_labels")
        return out


# -- parts ------------------------------------------------------------------------------------
class Federation:
    """Brokers and a store for one demo run: embedded by default, real when asked."""

    def __init__(self, options: DemoOptions, settings: Settings, root: Path):
        self.options, self.settings, self.root = options, settings, root
        self.topology = Topology(f"demo-{uuid.uuid4().hex[:8]}" if options.broker else "cxr")
        self._server = None
        self._brokers: list[Broker] = []

    def broker(self) -> Broker:
        if self.options.broker:
            from .transport.rabbitmq import RabbitMQBroker
            broker = RabbitMQBroker(self.options.broker, self.topology)
        else:
            from .transport.embedded import EmbeddedBroker, EmbeddedServer
            if self._server is None:
                self._server = EmbeddedServer()
            broker = EmbeddedBroker(self._server, self.topology)
        self._brokers.append(broker)
        return broker

    def store(self) -> ObjectStore:
        target = self.options.store
        if target and target.startswith("s3://"):
            from .storage.s3 import S3Store
            bucket = target[len("s3://"):].strip("/")
            if not self.settings.kms_key_id:
                raise ConfigError("CXR_MQ_KMS_KEY_ID", "is required for --store s3://")
            return S3Store(bucket=bucket, kms_key_id=self.settings.kms_key_id,
                           endpoint_url=self.settings.s3_endpoint_url, region=self.settings.aws_region)
        from .storage.local import LocalStore
        return LocalStore(Path(target) if target else self.root / "store")

    def close(self, hospitals) -> None:
        if self.options.broker and self._brokers:
            try:
                self._brokers[0].delete_topology(hospitals)
            except Exception:  # noqa: BLE001 - best effort clean-up of a demo namespace
                pass
        for broker in self._brokers:
            broker.close()


def _prepare_data(options: DemoOptions, root: Path) -> tuple[list[Path], tuple, dict]:
    """Synthesize (or read) a dataset; hold out test patients; split the rest non-IID."""
    from .synth import write_synthetic

    if options.data:
        label_file = Path(options.data)
    else:
        label_file = write_synthetic(root / "synthetic", n=options.n, seed=options.seed,
                                     classes=options.classes, size=options.image_size)
    labels = read_label_file(label_file)
    _, test_patients = split_patients(labels.records, options.test_fraction, options.seed)
    pool = [r for r in labels.records if r.patient not in test_patients]
    test = [r for r in labels.records if r.patient in test_patients]
    pool_file = write_label_file(label_file.parent / "federation-pool.txt", pool)
    table = partition_dataset(pool_file, options.hospitals, root / "hospitals", alpha=options.alpha,
                              seed=options.seed, mode="symlink")
    dirs = [Path(h["dir"]) for h in table["hospitals"]]
    classes = training.class_names(options.classes)
    index = {c: i for i, c in enumerate(classes)}
    from .data import map_label
    y_test = np.array([index[map_label(r.label, classes)] for r in test], dtype=np.int32)
    x_test = load_images([r.path for r in test], options.image_size)
    return dirs, (x_test, y_test, classes), table


# -- running --------------------------------------------------------------------------------
class DemoRun:
    """One federation run; ``view`` (optional) is told what happens for a live display."""

    def __init__(self, options: DemoOptions, settings: Settings, view=None):
        self.options, self.settings, self.view = options, settings, view

    def run(self) -> DemoResult:
        from workers.aggregator import AggregatorWorker

        options = self.options
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cxr-mq-demo-", dir=options.work_dir) as tmp:
            root = Path(tmp)
            dirs, test_set, table = _prepare_data(options, root)
            ids = [d.name for d in dirs]
            if options.plaintext:
                from .plaintext import PlaintextCodec
                secret = public = PlaintextCodec()
            else:
                pair = crypto.generate_keys(self.settings.codec_profile)
                secret, public = crypto.load_context(pair.secret), crypto.load_context(pair.public)
            federation = Federation(options, self.settings, root)
            store = federation.store()
            stop = threading.Event()
            aggregator = AggregatorWorker(federation.broker(), store, public, hospitals=ids,
                                          work_dir=str(root), stop=stop)
            lock = threading.Lock()
            hospitals = [_DemoHospital(lock, federation.broker(), store, secret, hid, str(d),
                                       str(root / "work"), stop=stop)
                         for hid, d in zip(ids, dirs)]
            threads = [threading.Thread(target=w.run, name=f"worker-{i}", daemon=True)
                       for i, w in enumerate([aggregator, *hospitals])]
            control = federation.broker()
            result = DemoResult(mode="plaintext" if options.plaintext else "encrypted",
                                settings={**asdict(options), "codec_profile": getattr(public, "profile", None)},
                                partition=table)
            try:
                control.declare_topology(ids)
                for thread in threads:
                    thread.start()
                queue = control.temporary_queue(["model_ready", "round_aborted"])
                for _ in range(options.rounds):
                    result.rounds.append(self._one_round(control, queue, store, public, secret,
                                                         hospitals, aggregator, ids, test_set, result))
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=60)
                federation.close(ids)
        result.wall_seconds = time.perf_counter() - started
        return result

    def _one_round(self, control, queue, store, public, secret, hospitals, aggregator, ids,
                   test_set, result: DemoResult) -> RoundReport:
        options = self.options
        request = controller.RoundRequest(quorum=len(ids), min_clients=len(ids),
                                          deadline_seconds=options.deadline,
                                          training=options.training_params(), hospitals=tuple(ids))
        started = time.perf_counter()
        start = controller.open_round(control, store, public, request)
        round_no = start["round"]
        if self.view:
            self.view.round_started(round_no, hospitals, aggregator)
        outcome = controller.wait_for_round(control, queue, round_no, options.deadline + 60)
        wall = time.perf_counter() - started
        if outcome["schema"] != "model_ready":
            raise RuntimeError(f"round {round_no} aborted: {outcome.get('reason')}")
        state = RoundState.load(store, round_no)
        raw = store.get_bytes(outcome["key"], sha256=outcome["sha256"])
        weights = secret.decrypt_aggregate(io.BytesIO(raw), outcome["total_samples"])
        x_test, y_test, classes = test_set
        model = training.build_model(options.training_params())
        training.load_flat_weights(model, np.asarray(weights, dtype=np.float32))
        proba = training.predict_proba(model, x_test)
        report = metrics.compute(y_test, proba, classes)
        result.final_probabilities, result.final_labels = proba.tolist(), y_test.tolist()
        timings = [h.timings.get(round_no, {}) for h in hospitals]
        row = RoundReport(
            round=round_no, contributors=outcome["contributors"],
            total_samples=outcome["total_samples"], metrics=report,
            bytes_uploaded=sum(a["size"] for a in state.accepted),
            encrypt_seconds=sum(t.get("encrypt_seconds", 0.0) for t in timings),
            train_seconds=sum(t.get("train_seconds", 0.0) for t in timings),
            aggregate_seconds=state.timings.get("aggregate_seconds", 0.0)
            + state.timings.get("finalize_seconds", 0.0),
            wall_seconds=wall)
        if self.view:
            self.view.round_finished(row)
        return row


def _hospital_class():
    from workers.hospital import HospitalWorker

    class DemoHospital(HospitalWorker):
        """Hospitals share one process here; TensorFlow work is serialised between them."""

        def __init__(self, lock, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._lock = lock

        def _train_and_upload(self, message, params):
            with self._lock:
                return super()._train_and_upload(message, params)

        def on_model_ready(self, message, delivery):
            with self._lock:
                return super().on_model_ready(message, delivery)

    return DemoHospital


def _DemoHospital(*args, **kwargs):
    return _hospital_class()(*args, **kwargs)


def run_demo(options: DemoOptions, settings: Settings, view=None) -> DemoResult:
    return DemoRun(options, settings, view).run()


def partition_summary(result: DemoResult) -> str:
    return format_class_table(result.partition)


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, default=float))
