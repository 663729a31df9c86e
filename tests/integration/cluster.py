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


class Cluster:
    """One federation: a bucket, a broker namespace, keys, and worker processes."""

    def __init__(self, tmp_path: Path, amqp_url: str, s3: dict, namespace: str,
                 hospitals=("h1", "h2", "h3")):
        self.tmp = tmp_path
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
            "CXR_MQ_LOG_FORMAT": "json",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_NUM_INTEROP_THREADS": "1",
            "TF_NUM_INTRAOP_THREADS": "1",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.keys_dir = tmp_path / "keys"

    # -- commands ---------------------------------------------------------------------------
    def cli(self, *args, timeout=300, check=True, env=None) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "cxr_mq.cli", *args], env=env or self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"cxr-mq {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr[-4000:]}")
        return result

    def init_keys(self, *extra) -> dict:
        return json.loads(self.cli("keys", "init", "--out", str(self.keys_dir), *extra).stdout)

    def make_data(self, n=36, size=32) -> dict[str, Path]:
        dirs = {}
        for index, hospital in enumerate(self.hospitals):
            out = self.tmp / "data" / hospital
            self.cli("synth", "--out", str(out), "--n", str(n + 6 * index), "--seed", str(index),
                     "--size", str(size))
            dirs[hospital] = out
        self.data_dirs = dirs
        return dirs

    def start_round(self, *args, timeout=600) -> tuple[int, dict]:
        result = self.cli("start-round", "--wait", "--json", *args, timeout=timeout, check=False)
        try:
            payload = json.loads(result.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            payload = {"stdout": result.stdout, "stderr": result.stderr[-4000:]}
        return result.returncode, payload

    # -- workers ----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "cxr_mq.cli", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_aggregator(self, *extra) -> subprocess.Popen:
        return self._spawn("aggregator", ["aggregator", *extra])

    def start_hospital(self, hospital: str) -> subprocess.Popen:
        return self._spawn(hospital, ["hospital", "--id", hospital, "--data",
                                      str(self.data_dirs[hospital]),
                                      "--secret-context", str(self.keys_dir / "secret.ctx")])

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

    def wait_for_event(self, name: str, event: str, timeout: float = 120, **fields) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.events(name):
                if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                    return record
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.log(name)[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"{name} never logged {event} {fields}:\n{self.log(name)[-4000:]}")

    def terminate(self, name: str, timeout: float = 60) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
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
        return {name: self.terminate(name) for name in list(self.procs)}

    # -- inspection -------------------------------------------------------------------------
    def s3_client(self):
        return boto3.client("s3", endpoint_url=self.s3["endpoint_url"], region_name=self.s3["region"])

    def objects(self) -> list[str]:
        pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.s3["bucket"])
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def get(self, key: str) -> bytes:
        return self.s3_client().get_object(Bucket=self.s3["bucket"], Key=key)["Body"].read()
