"""``cxr-mq bench-federation``: rounds of N hospitals x P parameters, measured end to end.

Everything but local training is the production path: the real ``HospitalWorker`` (one
thread and one broker connection per hospital, ``synthetic=True``: a seeded synthetic update
of P parameters instead of TensorFlow training, and no evaluation of the new model), the real
aggregator as its own OS process (``cxr-mq aggregator``), the controller's ``open_round``,
CKKS encryption and decryption (compact profile), RabbitMQ with publisher confirms, and an
S3 API: moto's server, started on loopback by the bench unless ``s3_endpoint_url`` is
configured (then an empty bucket there is required).

Per round it reports: the time from the last upload (the ``sent_at`` of the last
``update_ready``, stamped once its upload is done) to ``model_ready`` arriving on an observer
queue bound to the control exchange, and to the aggregator marking the round complete, the time from ``round_start`` to
the last hospital holding the decrypted new model, the aggregator's throughput (update bytes
and parameters per second of its summing) and peak RSS (reset before each round), the
deepest broker queues seen (sampled), the bytes moved through the store, updates lost
(published but not counted) and double-counted, and the largest difference between the
decrypted model and the plaintext FedAvg of the same synthetic updates.

All hospitals share this machine's cores, so the time until the *last* hospital holds the
model includes N decryptions one after another; a hospital on its own machine decrypts once.
Each hospital codec runs with one worker (no process pool) for that reason.

In a real federation each hospital is its own machine; here N hospital threads compete with
the aggregator and the store for the same cores. By default (``hospital_priority="low"``)
every hospital thread lowers its own CPU priority to nice 19 (Linux threads have their own
nice value, and the threads they start inherit it), so the figures measure the aggregator
and the store rather than the hospitals' competition for the cores; ``"same"`` leaves them
at the bench's priority, as every figure before 2026-11-30 was measured. The metric is the
same either way: the ``sent_at`` of the last ``update_ready`` to ``model_ready``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import controller, crypto, identity, messages, rounds, training
from .config import Settings
from .rounds import RoundState

SYNTHETIC_NOTE = ("local training replaced by a seeded synthetic update of P parameters "
                  "(hospitals run with synthetic=True); encryption, upload, messages, "
                  "aggregation and decryption are the production code")
HOSPITAL_PRIORITIES = {
    "low": "each hospital thread at nice 19 (lowest CPU priority): the aggregator and the store "
           "are measured, not the hospitals' competition for the cores (hospitals have their "
           "own machines in a real federation)",
    "same": "hospital threads at the bench's own CPU priority, competing with the aggregator "
            "and the store for the cores (how figures before 2026-11-30 were measured)"}
LOW_PRIORITY_NICE = 19
QUEUE_SAMPLE_SECONDS = 0.5
HOSPITAL_QUEUE_SAMPLE_EVERY = 4  # sample the N hospital queues every 4th tick (N round trips)


@dataclass
class BenchOptions:
    hospitals: int
    params: int
    rounds: int = 1
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    s3_endpoint_url: str | None = None  # None: start moto's server on loopback
    s3_bucket: str | None = None
    kms_key_id: str | None = None
    region: str = "us-east-1"
    round_timeout: float = 3600.0
    work_dir: str | None = None
    hospital_priority: str = "low"  # see HOSPITAL_PRIORITIES
    aggregator_prefetch: int = Settings.aggregator_prefetch  # updates it fetches ahead; 0: none


# -- services ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server(log_dir: Path):
    """moto's S3+KMS server on a free loopback port, as its own process (stopped on exit)."""
    port = _free_port()
    log = open(log_dir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (see {log_dir / 'moto.log'})")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _s3_target(options: BenchOptions, stack: ExitStack, work: Path) -> dict:
    import boto3
    if options.s3_endpoint_url is None:
        for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": options.region}.items():
            os.environ.setdefault(key, value)
        endpoint, pid = stack.enter_context(moto_server(work))
        kind = f"moto server on loopback (started by the bench, pid {pid})"
    else:
        endpoint, kind = options.s3_endpoint_url, f"S3 API at {options.s3_endpoint_url}"
    bucket, key_id = options.s3_bucket, options.kms_key_id
    if bucket is None:
        bucket = f"cxr-bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint, region_name=options.region).create_bucket(Bucket=bucket)
    if key_id is None:
        key_id = boto3.client("kms", endpoint_url=endpoint, region_name=options.region).create_key(
            Description="cxr-mq bench-federation")["KeyMetadata"]["KeyId"]
    return {"endpoint_url": endpoint, "bucket": bucket, "kms_key_id": key_id, "kind": kind}


# -- the federation ---------------------------------------------------------------------------
class _Federation:
    def __init__(self, options: BenchOptions, s3: dict, work: Path):
        from .storage.s3 import S3Store
        from .transport.base import Topology
        from .transport.rabbitmq import RabbitMQBroker

        self.options, self.s3, self.work = options, s3, work
        self.ids = [f"h{i:03d}" for i in range(options.hospitals)]
        self.topology = Topology(f"bench-{uuid.uuid4().hex[:8]}")
        self.store = S3Store(bucket=s3["bucket"], kms_key_id=s3["kms_key_id"],
                             endpoint_url=s3["endpoint_url"], region=options.region)
        if rounds.list_rounds(self.store):
            raise RuntimeError(f"bucket {s3['bucket']} already holds rounds: the bench needs an "
                               "empty bucket")
        keys = crypto.generate_keys("compact")
        self.secret = keys.secret
        self.public = crypto.load_context(keys.public)
        self.store.put_bytes("keys/public-context", keys.public)
        # the bench plays the key authority: one registered identity per party; every party
        # uses the bench's one broker login, allowed to publish for any of them
        self.identities = {name: identity.provision(self.store, name, role, work / "identities")
                           for name, role in [("controller", "controller"), ("aggregator", "aggregator")]
                           + [(h, "hospital") for h in self.ids]}
        import pika
        self.broker_user = pika.URLParameters(options.amqp_url).credentials.username
        self._make_broker = lambda: RabbitMQBroker(options.amqp_url, self.topology, reconnect_for=60)
        self.observer = self._make_broker()
        self.observer.declare_topology(self.ids)
        self.watch = _Observer(options.amqp_url, self.topology)
        self.stop = threading.Event()
        self.workers: list = []
        self.threads: list[threading.Thread] = []
        self.aggregator: subprocess.Popen | None = None

    # processes and threads
    def start(self) -> None:
        self._start_aggregator()
        from workers.hospital import HospitalWorker
        for hospital in self.ids:
            codec = crypto.load_context(self.secret)
            codec.workers = 1  # N hospitals share this machine's cores
            verifier = identity.Verifier(identity.Registry(self.store),
                                         shared_broker_users=frozenset({self.broker_user}))
            worker = HospitalWorker(self._make_broker(), self.store, codec, hospital, None,
                                    str(self.work / "hospitals"), stop=self.stop, synthetic=True,
                                    identity=self.identities[hospital], verifier=verifier)
            thread = threading.Thread(target=self._hospital_thread(worker.run),
                                      name=f"hospital-{hospital}", daemon=True)
            self.workers.append(worker)
            self.threads.append(thread)
            thread.start()
        self._wait_consumers()

    def _hospital_thread(self, run):
        if self.options.hospital_priority == "same":
            return run

        def at_low_priority():
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY_NICE)
            run()
        return at_low_priority

    def _start_aggregator(self) -> None:
        env = {**os.environ, "CXR_MQ_AMQP_URL": self.options.amqp_url,
               "CXR_MQ_S3_BUCKET": self.s3["bucket"], "CXR_MQ_S3_ENDPOINT_URL": self.s3["endpoint_url"],
               "CXR_MQ_KMS_KEY_ID": self.s3["kms_key_id"], "CXR_MQ_NAMESPACE": self.topology.namespace,
               "CXR_MQ_HOSPITALS": ",".join(self.ids), "CXR_MQ_WORK_DIR": str(self.work / "aggregator"),
               "CXR_MQ_LOG_FORMAT": "json", "CXR_MQ_LOG_LEVEL": "info",
               "CXR_MQ_IDENTITY": str(self.work / "identities" / "aggregator.key"),
               "CXR_MQ_SHARED_BROKER_USERS": self.broker_user or "",
               "CXR_MQ_AGGREGATOR_PREFETCH": str(self.options.aggregator_prefetch)}
        log = open(self.work / "aggregator.log", "wb")
        self.aggregator = subprocess.Popen([sys.executable, "-m", "cxr_mq.cli", "aggregator"],
                                           env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _wait_consumers(self, timeout: float = 300) -> None:
        queues = [self.topology.aggregator_queue] + [self.topology.hospital_queue(h) for h in self.ids]
        deadline = time.monotonic() + timeout
        for queue in queues:
            while self._consumers(queue) < 1:
                if self.aggregator.poll() is not None:
                    raise RuntimeError(f"the aggregator exited {self.aggregator.returncode}; see "
                                       f"{self.work / 'aggregator.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no consumer on {queue} after {timeout:.0f}s")
                time.sleep(0.2)

    def _consumers(self, queue: str) -> int:
        return self.observer._with_retry(
            lambda ch: ch.queue_declare(queue, passive=True).method.consumer_count)

    def close(self) -> None:
        self.watch.close()
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        if self.aggregator is not None and self.aggregator.poll() is None:
            self.aggregator.terminate()
            try:
                self.aggregator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.aggregator.kill()
        try:
            self.observer.delete_topology(self.ids)
        finally:
            self.observer.close()

    # one round
    def run_round(self, index: int) -> dict:
        _clear_peak_rss(self.aggregator.pid)
        depths = _QueueSampler(self)
        request = controller.RoundRequest(
            quorum=len(self.ids), min_clients=len(self.ids),
            deadline_seconds=self.options.round_timeout, training=training.TrainingParams(),
            hospitals=tuple(self.ids), synthetic_params=self.options.params if index == 1 else 0)
        depths.start()
        try:
            start = controller.open_round(self.observer, self.store, self.public, request,
                                          self.identities["controller"])
            seen = self._watch(start["round"])
            applied = self._wait_applied(start["round"])
        finally:
            depths.stop()
        state = RoundState.load(self.store, start["round"])
        return self._figures(start, state, seen, applied, depths)

    def _watch(self, round_no: int) -> dict:
        """Observer's view: when each update_ready and the outcome arrived."""
        updates: dict[str, list[float]] = {}
        deadline = time.monotonic() + self.options.round_timeout
        while time.monotonic() < deadline:
            seen = self.watch.next(timeout=1.0)
            if seen is None:
                continue
            arrived_at, body = seen
            message = messages.decode(body)
            if message.get("round") != round_no:
                continue
            if message["schema"] == "update_ready":  # sent_at: the hospital's upload is done
                updates.setdefault(message["hospital"], []).append(message["sent_at"])
            elif message["schema"] == "model_ready":
                return {"updates": updates, "model_ready_at": arrived_at, "outcome": message}
            else:
                raise RuntimeError(f"round {round_no} aborted: {message.get('reason')}")
        raise RuntimeError(f"round {round_no}: no model_ready within {self.options.round_timeout:.0f}s")

    def _wait_applied(self, round_no: int) -> dict[str, float]:
        deadline = time.monotonic() + self.options.round_timeout
        while time.monotonic() < deadline:
            applied = {w.id: t for w in self.workers for r, t in w.models_applied if r == round_no}
            if len(applied) == len(self.workers):
                return applied
            time.sleep(0.1)
        raise RuntimeError(f"round {round_no}: not every hospital decrypted the new model")

    def _figures(self, start: dict, state: RoundState, seen: dict, applied: dict, depths) -> dict:
        round_no, n = start["round"], len(self.ids)
        accepted = [a["hospital"] for a in state.accepted]
        update_bytes = sum(a["size"] for a in state.accepted)
        aggregate_size = self.store.describe(state.model_key)["size"]
        base_size = (self.store.describe(start["base_model_key"])["size"]
                     if not start["base_model_encrypted"] else 0)  # later bases: cached at hospitals
        summing = state.timings.get("aggregate_seconds") or float("nan")
        last_update = max(max(times) for times in seen["updates"].values())
        last_accept = max(a["accepted_at"] for a in state.accepted)
        return {
            "round": round_no,
            "hospitals": n,
            "params": state.n_params,
            "last_upload_to_model_ready_s": seen["model_ready_at"] - last_update,
            "last_upload_to_complete_s": state.finished_at - last_update,
            # the same span in three parts: until the aggregator had summed (and was about to
            # record) the last update; writing and storing the aggregate and the record;
            # publishing model_ready and the observer seeing it (it polls every 0.2 s)
            "last_upload_to_last_accept_s": last_accept - last_update,
            "last_accept_to_complete_s": state.finished_at - last_accept,
            "complete_to_model_ready_seen_s": seen["model_ready_at"] - state.finished_at,
            "round_start_to_last_model_s": max(applied.values()) - start["issued_at"],
            "round_start_to_first_model_s": min(applied.values()) - start["issued_at"],
            "aggregator_sum_seconds": summing,
            "aggregator_download_seconds": state.timings.get("download_seconds"),
            "aggregator_finalize_seconds": state.timings.get("finalize_seconds"),
            "aggregator_prefetched_updates": state.timings.get("prefetched_updates", 0),
            "aggregator_mb_per_s": update_bytes / summing / 1e6,
            "aggregator_mparams_per_s": n * state.n_params / summing / 1e6,
            "aggregator_peak_rss_mb": _peak_rss_mb(self.aggregator.pid),
            "hospitals_process_peak_rss_mb": _peak_rss_mb(os.getpid()),
            "max_queue_depth": depths.peaks,
            "update_bytes": update_bytes,
            "aggregate_bytes": aggregate_size,
            "bytes_moved": {"hospitals_up": update_bytes, "aggregator_down": update_bytes,
                            "aggregate_up": aggregate_size, "hospitals_down": n * aggregate_size,
                            "base_down": n * base_size,
                            "total": 2 * update_bytes + (n + 1) * aggregate_size + n * base_size},
            "updates_published": len(seen["updates"]),
            "update_ready_messages": sum(len(t) for t in seen["updates"].values()),
            "updates_counted": len(accepted),
            "updates_lost": len(set(seen["updates"]) - set(accepted)),
            "updates_double_counted": len(accepted) - len(set(accepted)),
            "max_abs_error": self._max_error(start, seen["outcome"]),
            "load_average_at_end": os.getloadavg(),
        }

    def _max_error(self, start: dict, outcome: dict) -> float:
        """Decrypted model (as the first hospital saved it) vs the plaintext FedAvg of the same
        synthetic updates from the same base."""
        from workers.hospital import synthetic_samples, synthetic_update
        first = self.workers[0]
        base = np.load(first.work_dir / f"base-{start['base_model_sha256']}.npy")
        total, count = np.zeros(base.size, dtype=np.float64), 0
        for hospital in outcome["contributors"]:
            samples = synthetic_samples(hospital)
            total += samples * synthetic_update(base, hospital, start["round"]).astype(np.float64)
            count += samples
        decrypted = np.load(first.work_dir / f"base-{outcome['sha256']}.npy")
        return float(np.max(np.abs(decrypted - total / count)))


class _Observer:
    """Stamps the arrival of every ``update_ready``, ``model_ready`` and ``round_aborted`` in
    a process of its own, consuming (not polling) a temporary queue: in the bench's process
    its clock would wait for the interpreter lock behind N hospital threads, which all start
    fetching and decrypting when ``model_ready`` arrives."""

    KEYS = ("update_ready", "model_ready", "round_aborted")

    def __init__(self, amqp_url: str, topology):
        import multiprocessing
        context = multiprocessing.get_context("spawn")  # no fork of a process full of threads
        self._messages, sender = context.Pipe(duplex=False)
        ready = context.Event()
        self._process = context.Process(target=_observe, name="bench-observer", daemon=True,
                                        args=(amqp_url, topology.namespace, sender, ready))
        self._process.start()
        sender.close()
        if not ready.wait(120):
            self.close()
            raise RuntimeError("the bench's observer process did not start")

    def next(self, timeout: float) -> tuple[float, bytes] | None:
        """(arrival time, body) of the next message seen, or None after ``timeout`` seconds."""
        if not self._process.is_alive() and not self._messages.poll():
            raise RuntimeError(f"the bench's observer process exited ({self._process.exitcode})")
        return self._messages.recv() if self._messages.poll(timeout) else None

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(timeout=30)


def _observe(amqp_url: str, namespace: str, out, ready) -> None:
    """The observer process: consume the control exchange's outcomes and updates, sending
    each with the time it arrived (pushed by the broker, stamped on arrival)."""
    import signal

    from .transport.base import Topology
    from .transport.rabbitmq import RabbitMQBroker
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    broker = RabbitMQBroker(amqp_url, Topology(namespace), reconnect_for=60)
    try:
        queue = broker.temporary_queue(_Observer.KEYS)
        broker.consume(queue, lambda delivery: out.send((time.time(), delivery.body)), prefetch=100)
        ready.set()
        broker.run(stop, tick_interval=0.5)
    finally:
        broker.close()


class _QueueSampler:
    """Samples the broker's queue depths (ready messages) on its own connection."""

    def __init__(self, federation: _Federation):
        self.federation = federation
        self.peaks = {"aggregator": 0, "hospitals_total": 0, "dead_letter": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import pika
        fed = self.federation
        conn = pika.BlockingConnection(pika.URLParameters(fed.options.amqp_url.split(",")[0]))
        try:
            ch = conn.channel()

            def depth(queue):
                return ch.queue_declare(queue, passive=True).method.message_count
            tick = 0
            while not self._stop.wait(QUEUE_SAMPLE_SECONDS):
                self._peak("aggregator", depth(fed.topology.aggregator_queue))
                self._peak("dead_letter", depth(fed.topology.dead_letter_queue))
                if tick % HOSPITAL_QUEUE_SAMPLE_EVERY == 0:
                    self._peak("hospitals_total",
                               sum(depth(fed.topology.hospital_queue(h)) for h in fed.ids))
                tick += 1
        finally:
            conn.close()

    def _peak(self, name: str, value: int) -> None:
        self.peaks[name] = max(self.peaks[name], value)


def _clear_peak_rss(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS mark to the current RSS
    except OSError:
        pass


def _peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run(options: BenchOptions) -> dict:
    """Run ``options.rounds`` rounds; returns the settings, the machine's load and the rounds."""
    if options.hospitals < 1 or options.params < 1 or options.rounds < 1:
        raise ValueError("--hospitals, --params and --rounds must be at least 1")
    if options.hospital_priority not in HOSPITAL_PRIORITIES:
        raise ValueError(f"--hospital-priority must be one of {sorted(HOSPITAL_PRIORITIES)}, "
                         f"got {options.hospital_priority!r}")
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="cxr-bench-federation-", dir=options.work_dir)))
        s3 = _s3_target(options, stack, work)
        load_before = os.getloadavg()
        federation = _Federation(options, s3, work)
        stack.callback(federation.close)
        started = time.monotonic()
        federation.start()
        startup = time.monotonic() - started
        results = [federation.run_round(i + 1) for i in range(options.rounds)]
        return {"hospitals": options.hospitals, "params": options.params, "rounds": results,
                "synthetic_training": SYNTHETIC_NOTE, "store": s3["kind"],
                "hospital_priority": options.hospital_priority,
                "hospital_priority_note": HOSPITAL_PRIORITIES[options.hospital_priority],
                "aggregator_prefetch": options.aggregator_prefetch,
                "broker": _redact(options.amqp_url), "namespace": federation.topology.namespace,
                "startup_seconds": startup, "codec_profile": federation.public.profile,
                "cores": os.cpu_count(), "load_average_before": load_before,
                "load_average_after": os.getloadavg()}


def _redact(url: str) -> str:
    import re
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", url)


def table(result: dict) -> str:
    """One row per round, for the terminal and docs/performance.md."""
    head = ("| N | P | round | hospitals' CPU priority / aggregator prefetch "
            "| last upload -> model_ready (s) | round_start -> last model (s) "
            "| aggregator MB/s | aggregator Mparams/s | aggregator peak RSS (MB) "
            "| max queue depth (agg / hospitals) | bytes moved (MB) | lost | double | max abs error |")
    rows = [head, "|" + "---|" * 14]
    setting = f"{result.get('hospital_priority', 'same')} / {result.get('aggregator_prefetch', 0)}"
    for r in result["rounds"]:
        depth = r["max_queue_depth"]
        rows.append(
            f"| {r['hospitals']} | {r['params']:,} | {r['round']} | {setting} "
            f"| {r['last_upload_to_model_ready_s']:.2f} | {r['round_start_to_last_model_s']:.1f} "
            f"| {r['aggregator_mb_per_s']:.0f} | {r['aggregator_mparams_per_s']:.1f} "
            f"| {r['aggregator_peak_rss_mb']:.0f} | {depth['aggregator']} / {depth['hospitals_total']} "
            f"| {r['bytes_moved']['total'] / 1e6:.0f} | {r['updates_lost']} "
            f"| {r['updates_double_counted']} | {r['max_abs_error']:.1e} |")
    return "\n".join(rows)


def main_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=float)


def plot(results: list[dict], out: str | Path) -> Path:
    """The curves of docs/performance.md from several runs' JSON: time to model_ready after
    the last upload, round time, aggregator throughput and peak RSS, against N x P."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(select):
        runs = sorted((r for r in results if select(r)), key=lambda r: r["hospitals"] * r["params"])
        x = [r["hospitals"] * r["params"] / 1e6 for r in runs]
        return runs, x

    def mean(run, key):
        return float(np.mean([rnd[key] for rnd in run["rounds"]]))
    def priority(run):  # runs before 2026-11-30 have no such key: hospitals competed
        return run.get("hospital_priority", "same")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    curves = []
    for prio, note in (("low", "hospitals at nice 19"), ("same", "hospitals competing for the cores")):
        curves += [(f"N x 1M ({note})", lambda r, p=prio: r["params"] == 1_000_000 and priority(r) == p,
                    "o-" if prio == "low" else "o:"),
                   (f"3 x P ({note})", lambda r, p=prio: r["hospitals"] == 3 and priority(r) == p,
                    "s--" if prio == "low" else "s:")]
    for label, select, marker in curves:
        runs, x = series(select)
        if not runs:
            continue
        axes[0][0].plot(x, [mean(r, "last_upload_to_model_ready_s") for r in runs], marker, label=label)
        axes[0][1].plot(x, [mean(r, "round_start_to_last_model_s") for r in runs], marker, label=label)
        axes[1][0].plot(x, [mean(r, "aggregator_mparams_per_s") for r in runs], marker, label=label)
        axes[1][1].plot(x, [max(rnd["aggregator_peak_rss_mb"] for rnd in r["rounds"]) for r in runs],
                        marker, label=label)
        for ax, key in ((axes[0][0], "last_upload_to_model_ready_s"),):
            for r, xv in zip(runs, x):
                ax.annotate(f"{r['hospitals']}x{r['params'] / 1e6:g}M", (xv, mean(r, key)),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    titles = ("last upload -> model_ready (s)", "round_start -> last hospital holds model (s)",
              "aggregator throughput (M params/s of summing)", "aggregator peak RSS (MB)")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("N x P (M parameters per round)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle("cxr-mq bench-federation (2 shared cores; synthetic training)", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":  # python -m cxr_mq.bench_federation plot OUT.png RUN.json ...
    if len(sys.argv) < 4 or sys.argv[1] != "plot":
        sys.exit("usage: python -m cxr_mq.bench_federation plot OUT.png RUN.json ...")
    print(plot([json.loads(Path(p).read_text()) for p in sys.argv[3:]], sys.argv[2]))
