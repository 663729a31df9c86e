"""Run cxr-mq workers as separate OS processes against the real RabbitMQ and moto's S3."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pika

from .ports import reusable_port


class Cluster:
    """One federation: a bucket, a broker namespace, keys, and worker processes.

    ``profile`` is the codec profile ``init_keys`` sets up: ``threshold`` (the default, as in
    production) runs ``cxr-mq keys init`` with no profile flag, the key ceremony through the
    hospital workers it starts first; ``compact``/``seed`` (``keys init --profile P --out``)
    give every hospital ``secret.ctx``. Tests about something other than the profile may pin
    ``compact`` to save the ceremony and the committee's time, and say so."""

    def __init__(self, tmp_path: Path, amqp_url: str, s3: dict, namespace: str,
                 hospitals=("h1", "h2", "h3"), metrics: bool = False, synthetic: bool = False,
                 retain: bool = True, controller_id: str = "controller",
                 aggregator_id: str = "aggregator", profile: str = "threshold",
                 audit: bool = False):
        """``retain`` (the default here, not in production) keeps every update object and
        each hospital's plaintext updates, from which the tests compute reference sums.
        ``audit``: every process records its S3 calls (``CXR_MQ_S3_AUDIT``) in
        ``s3-audit/<worker>.jsonl``, the CLI's (the controller's) in ``s3-audit/cli.jsonl``."""
        self.audit_dir = tmp_path / "s3-audit" if audit else None
        if self.audit_dir is not None:
            self.audit_dir.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.metrics = metrics
        self.synthetic = synthetic  # hospitals run with --synthetic: no TensorFlow, no images
        self.controller_id, self.aggregator_id = controller_id, aggregator_id
        self.metrics_ports: dict[str, int] = {}
        self.tmp = tmp_path
        self.amqp_url = amqp_url
        self.hospitals = tuple(hospitals)
        self.s3 = s3
        self.namespace = namespace
        self.env = {
            **os.environ,
            "CXR_MQ_AMQP_URL": amqp_url,
            "CXR_MQ_S3_BUCKET": s3["bucket"],
            "CXR_MQ_S3_ENDPOINT_URL": s3["endpoint_url"],
            "CXR_MQ_KMS_KEY_ID": s3["kms_key_id"],
            "CXR_MQ_NAMESPACE": namespace,
            "CXR_MQ_HOSPITALS": ",".join(self.hospitals),
            "CXR_MQ_WORK_DIR": str(tmp_path / "work"),
            **({"CXR_MQ_RETAIN_UPDATES": "true", "CXR_MQ_KEEP_PLAINTEXT_UPDATES": "1000"}
               if retain else {}),
            "CXR_MQ_LOG_FORMAT": "json",
            # every worker logs in as the URL's one user here; see test_identities.py for
            # a federation with one broker user per party
            "CXR_MQ_SHARED_BROKER_USERS": pika.URLParameters(amqp_url).credentials.username,
            "CXR_MQ_IDENTITY": str(tmp_path / "keys" / "identities" / f"{controller_id}.key"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_NUM_INTEROP_THREADS": "1",
            "TF_NUM_INTRAOP_THREADS": "1",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.spawn_env: dict[str, dict] = {}  # extra environment each worker was started with
        self.spawn_mark: dict[str, int] = {}  # each worker's event mark when it was last started
        self.keys_dir = tmp_path / "keys"
        self.identities: dict = {}  # party id -> cxr_mq.identity.Identity

    # -- commands ---------------------------------------------------------------------------
    def cli(self, *args, timeout=300, check=True, env=None) -> subprocess.CompletedProcess:
        env = dict(env or self.env)
        if self.audit_dir is not None:
            # evaluate/predict --hospital run on that hospital's host, under its role; every
            # other command is an operator's on the controller host
            party = (args[args.index("--hospital") + 1]
                     if args and args[0] in ("evaluate", "predict") and "--hospital" in args else "cli")
            env["CXR_MQ_S3_AUDIT"] = str(self.audit_dir / f"{party}.jsonl")
        result = subprocess.run([sys.executable, "-m", "cxr_mq.cli", *args], env=env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"cxr-mq {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr[-4000:]}")
        return result

    def init_keys(self, *extra) -> dict:
        """One registered identity per party and the keys (``keys init``; what it printed).
        Threshold profile: as at a first rollout, the hospital workers start first (they hold
        no key yet; synthetic, or on ``make_data``'s directories, made here if missing) and
        ``keys init`` runs the ceremony through them; start the aggregator afterwards."""
        if self.profile != "threshold":
            keys = json.loads(self.cli("keys", "init", "--profile", self.profile, "--out", str(self.keys_dir),
                                       *extra).stdout)
            self.init_identities()
            return keys
        self.init_identities()
        if not self.synthetic and not getattr(self, "data_dirs", None):
            self.make_data()
        for hospital in self.hospitals:
            if not self.running(hospital):
                self.start_hospital(hospital)
        return json.loads(self.cli("keys", "init", *extra).stdout)

    def init_identities(self) -> None:
        """Play the key authority in-process (as ``identity init`` + ``identity register``
        would, without a subprocess per party): ``keys/identities/<id>.key`` for each party."""
        from cxr_mq import identity
        parties = [(self.controller_id, "controller"), (self.aggregator_id, "aggregator")]
        parties += [(h, "hospital") for h in self.hospitals]
        store = self.store()
        for name, role in parties:
            self.identities[name] = identity.provision(store, name, role,
                                                       self.keys_dir / "identities")

    def identity_path(self, name: str) -> Path:
        return self.keys_dir / "identities" / f"{name}.key"

    def store(self):
        from cxr_mq.storage.s3 import S3Store
        return S3Store(bucket=self.s3["bucket"], kms_key_id=self.s3["kms_key_id"],
                       endpoint_url=self.s3["endpoint_url"], region=self.s3["region"])

    def make_data(self, n=36, size=32) -> dict[str, Path]:
        dirs = {}
        for index, hospital in enumerate(self.hospitals):
            out = self.tmp / "data" / hospital
            self.cli("synth", "--out", str(out), "--n", str(n + 6 * index), "--seed", str(index),
                     "--size", str(size))
            dirs[hospital] = out
        self.data_dirs = dirs
        return dirs

    def open_round(self, *args, timeout=120) -> int:
        """``start-round`` without ``--wait``: publish ``round_start`` and return its number."""
        result = self.cli("start-round", "--json", *args, timeout=timeout)
        return json.loads(result.stdout.strip().splitlines()[-1])["round"]

    def start_round(self, *args, timeout=600) -> tuple[int, dict]:
        result = self.cli("start-round", "--wait", "--json", *args, timeout=timeout, check=False)
        try:
            payload = json.loads(result.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            payload = {"stdout": result.stdout, "stderr": result.stderr[-4000:]}
        return result.returncode, payload

    # -- workers ----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """Start a worker; ``env`` adds variables (e.g. ``CXR_MQ_FAULTS``) for this one only.
        With ``metrics`` on, each worker serves Prometheus metrics on a port of its own
        (kept across restarts; see ``metrics_url``)."""
        if self.metrics:
            if name not in self.metrics_ports:
                self.metrics_ports[name] = reusable_port()  # kept across restarts
            args = [*args, "--metrics-port", str(self.metrics_ports[name])]
        self.spawn_mark[name] = self.mark(name)
        log = open(self.tmp / f"{name}.log", "ab")
        audit = {"CXR_MQ_S3_AUDIT": str(self.audit_dir / f"{name}.jsonl")} if self.audit_dir else {}
        proc = subprocess.Popen([sys.executable, "-m", "cxr_mq.cli", *args],
                                env={**self.env, **audit, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        self.spawn_env[name] = dict(env or {})
        return proc

    def start_aggregator(self, *extra, env: dict | None = None,
                         name: str = "aggregator") -> subprocess.Popen:
        return self._spawn(name, ["aggregator", "--identity",
                                  str(self.identity_path(self.aggregator_id)), *extra], env)

    def start_hospital(self, hospital: str, *extra, env: dict | None = None,
                       name: str | None = None) -> subprocess.Popen:
        data = ["--synthetic"] if self.synthetic else ["--data", str(self.data_dirs[hospital])]
        secret = [] if self.profile == "threshold" else ["--secret-context", str(self.keys_dir / "secret.ctx")]
        return self._spawn(name or hospital, ["hospital", "--id", hospital, *data, *secret,
                                              "--identity", str(self.identity_path(hospital)),
                                              *extra], env)

    def start_all(self) -> None:
        """The aggregator, and every hospital not running yet (under the threshold profile
        ``init_keys`` started them for the ceremony)."""
        self.start_aggregator()
        for hospital in self.hospitals:
            if not self.running(hospital):
                self.start_hospital(hospital)

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def scrape(self, name: str) -> dict[str, float]:
        """The worker's Prometheus metrics: ``{'name{labels}': value}``."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families
        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.log(name)[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{name} never logged {text!r}:\n{self.log(name)[-4000:]}")

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log(name).splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return found

    def mark(self, name: str) -> int:
        """How many events ``name`` has logged so far (to wait only for later ones)."""
        return len(self.events(name))

    def find_events(self, name: str, event: str, after: int = 0, **fields) -> list[dict]:
        return [r for r in self.events(name)[after:]
                if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())]

    def wait_for_event(self, name: str, event: str, timeout: float = 120, after: int = 0,
                       allow_exit: bool = False, **fields) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find_events(name, event, after, **fields)
            if found:
                return found[0]
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None and not allow_exit:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.log(name)[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{name} never logged {event} {fields}:\n{self.log(name)[-4000:]}")

    def wait_models_applied(self, round_no: int, hospitals=None, timeout: float = 180) -> None:
        """Wait until each hospital has applied the round's global model (decrypted it, taken
        the server step, saved ``base-<sha>.npy``, its strategy state and ``global.json``):
        ``start-round --wait`` returns when ``model_ready`` reaches the controller (under the
        threshold profile, at the first decrypted committee outcome), while each hospital may
        still be working on it."""
        event = "global_model_applied" if self.synthetic else "global_model_evaluated"
        for hospital in hospitals or self.hospitals:
            self.wait_for_event(hospital, event, round=round_no, timeout=timeout)

    def wait_exit(self, name: str, timeout: float = 60) -> int:
        """Wait for a worker that is expected to end by itself (e.g. at a crash point)."""
        proc = self.procs.pop(name)
        return proc.wait(timeout=timeout)

    def terminate(self, name: str, timeout: float = 60, signalled: bool = False) -> int:
        """SIGTERM ``name`` (unless ``signalled`` already) and wait for it to exit; its exit code."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            if not signalled:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every worker at once, then wait for each: their exits (about a second each
        of interpreter and TensorFlow teardown once the worker has stopped) overlap instead
        of adding up. Their exit codes."""
        names = list(self.procs)
        for name in names:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        return {name: self.terminate(name, signalled=True) for name in names}

    # -- inspection -------------------------------------------------------------------------
    def s3_client(self):
        return boto3.client("s3", endpoint_url=self.s3["endpoint_url"], region_name=self.s3["region"])

    def objects(self) -> list[str]:
        pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.s3["bucket"])
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def get(self, key: str) -> bytes:
        return self.s3_client().get_object(Bucket=self.s3["bucket"], Key=key)["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.s3_client().put_object(Bucket=self.s3["bucket"], Key=key, Body=body,
                                    ServerSideEncryption="aws:kms",
                                    SSEKMSKeyId=self.s3["kms_key_id"])

    def state(self, round_no: int) -> dict | None:
        from cxr_mq import rounds
        try:
            return json.loads(self.get(rounds.state_key(round_no)))
        except self.s3_client().exceptions.NoSuchKey:
            return None

    def wait_finished(self, round_no: int, timeout: float = 300) -> dict:
        """The aggregator's record of the round once it is complete or aborted and announced."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(round_no)
            if state and state["status"] != "open" and state["announced"]:
                return state
            time.sleep(0.3)
        raise AssertionError(f"round {round_no} did not finish within {timeout}s: "
                             f"{self.state(round_no)}\n{self.log('aggregator')[-3000:]}")

    def update_message(self, round_no: int, hospital: str) -> dict:
        from cxr_mq import messages, rounds
        return messages.decode(self.get(rounds.update_message_key(round_no, hospital)))

    def fault_free_aggregate(self, round_no: int, hospitals) -> bytes:
        """The sum a fault-free run gives over the same update objects (added here, in sorted
        order, with the public context only)."""
        import io

        from cxr_mq import bound, crypto, rounds
        codec = crypto.load_context(self.get("keys/public-context"))
        total = None
        for hospital in sorted(hospitals):
            message = self.update_message(round_no, hospital)
            if total is None:
                total = codec.new_sum(message["n_params"])
            stream = io.BytesIO(self.get(rounds.update_key(round_no, hospital)))
            bound.check_header(stream, round_no, hospital)
            total.add(stream)
        out = io.BytesIO()
        total.write(out)
        return out.getvalue()

    def status(self) -> list[dict]:
        return json.loads(self.cli("status", "--json").stdout)

    # -- broker -----------------------------------------------------------------------------
    def _amqp(self):
        # a cluster's URLs are comma-separated: the first node that answers
        return pika.BlockingConnection([pika.URLParameters(u) for u in self.amqp_url.split(",")])

    def publish_raw(self, routing_key: str, body: bytes, headers: dict | None = None,
                    url: str | None = None, user_id: str | None = "login") -> None:
        """Publish bytes on the control exchange as any (possibly broken) client would, with
        the login of ``url`` (default the cluster's) as ``user_id`` (``None``: no user_id)."""
        params = pika.URLParameters(url or self.amqp_url)
        if user_id == "login":
            user_id = params.credentials.username
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish(f"{self.namespace}.control", routing_key, body,
                             pika.BasicProperties(delivery_mode=2, headers=headers or {},
                                                  user_id=user_id),
                             mandatory=True)
        finally:
            conn.close()

    def drain(self, queue: str) -> list[dict]:
        """Take every ready message off ``queue``: dicts of routing_key, headers, body."""
        conn = self._amqp()
        taken = []
        try:
            ch = conn.channel()
            while True:
                method, props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    return taken
                taken.append({"routing_key": method.routing_key, "headers": props.headers or {},
                              "body": body})
        finally:
            conn.close()

    def dead_letters(self) -> list[dict]:
        return self.drain(f"{self.namespace}.dead-letter")

    def queue_depths(self) -> dict[str, int]:
        names = [f"{self.namespace}.aggregator", f"{self.namespace}.dead-letter"]
        names += [f"{self.namespace}.hospital.{h}" for h in self.hospitals]
        conn = self._amqp()
        try:
            ch = conn.channel()
            return {n: ch.queue_declare(n, passive=True).method.message_count for n in names}
        finally:
            conn.close()
