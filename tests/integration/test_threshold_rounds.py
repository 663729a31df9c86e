"""Threshold rounds with real processes over the real RabbitMQ and moto's S3/KMS: the key
ceremony through the running hospital workers, started without a key (``cxr-mq keys init
--threshold 2``), then
rounds under fresh keys where the committee decrypts the key sum; n - t hospitals killed
after uploading do not stop a round; fewer than t alive make it undecryptable (``start-round
--wait`` exits 1 with the reason, ``status`` shows it), and the next round completes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid

import pytest

from cxr_mq import rounds, threshold_flow

from .cluster import Cluster

pytestmark = pytest.mark.slow
HOSPITALS = ("h1", "h2", "h3")


def _wait(predicate, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_threshold_rounds_survive_dropouts_over_rabbitmq(tmp_path, amqp_url, s3_settings):
    cluster = Cluster(tmp_path, amqp_url, s3_settings, f"t{uuid.uuid4().hex[:10]}", HOSPITALS, synthetic=True)
    cluster.env["CXR_MQ_COMMITTEE_TIMEOUT"] = "8"
    store = cluster.store()
    # a synthetic first model, as the hospitals train synthetically: start-round builds no
    # Keras model (its TensorFlow import took 4-8 s of the test)
    round_args = ("--max-samples", "200", "--deadline", "120", "--synthetic-params", "20000")
    try:
        # a first rollout: the hospital workers start without a key, the ceremony runs through
        # them and they adopt its public key; the aggregator starts on it
        ceremony = cluster.init_keys("--threshold", "2", "--timeout", "120")
        assert ceremony["profile"] == "threshold" and ceremony["threshold"] == 2
        cluster.start_all()

        code, result = cluster.start_round(*round_args)
        assert code == 0 and result["status"] == "complete", result
        assert result["committee"]["decrypted"] and result["total_samples"] > 0

        # n - t = 1 hospital dies once its update is out: the other two decrypt. It kills
        # itself right after publishing (a crash point): killed from here once the aggregator
        # had accepted its update, it could have answered the committee already if this
        # process came late, as round 3's two did
        assert cluster.terminate("h3") == 0
        cluster.start_hospital("h3", env={"CXR_MQ_FAULTS": "crash:hospital.after_publish"})
        cluster.open_round(*round_args)
        assert cluster.wait_exit("h3", timeout=240) == -signal.SIGKILL
        _wait(lambda: "h3" in _accepted(store, 2), "the aggregator accepting h3's round 2 update")
        _wait(lambda: _decrypted(store, 2) == ["h1", "h2"], "round 2's committee")

        # two die after uploading, before round 3's model_ready: one member left, fewer than t:
        # undecryptable, exit 1. Each kills itself right after publishing its update (a crash
        # point): killed from here once all three updates were accepted, they had volunteered
        # and answered already whenever this process came 1.5 s late, and round 3 was decrypted
        assert cluster.terminate("h2") == 0
        for hospital in ("h2", "h3"):
            cluster.start_hospital(hospital, env={"CXR_MQ_FAULTS": "crash:hospital.after_publish"})
        waiting = subprocess.Popen([sys.executable, "-m", "cxr_mq.cli", "start-round", "--wait", "--json",
                                    "--committee-timeout", "60", *round_args], env=cluster.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for hospital in ("h2", "h3"):
            assert cluster.wait_exit(hospital, timeout=240) == -signal.SIGKILL
        out, err = waiting.communicate(timeout=240)
        assert waiting.returncode == 1, (out, err[-3000:])
        result = json.loads(out.strip().splitlines()[-1])
        assert _accepted(store, 3) == set(HOSPITALS)  # their updates were in before they died
        assert result["status"] == "undecryptable", result
        assert "only 1 of the 2 committee members" in result["reason"], result
        rows = {row["round"]: row for row in json.loads(cluster.cli("status", "--json").stdout)}
        assert rows[3]["state"] == "undecryptable"

        # everyone back: the next round starts from round 2's model and completes
        cluster.start_hospital("h2")
        cluster.start_hospital("h3")
        code, result = cluster.start_round(*round_args)
        assert code == 0 and result["status"] == "complete", result
        assert result["base_model_key"] == rounds.aggregate_key(2)
    finally:
        cluster.stop_all()


def _accepted(store, round_no) -> set:
    """Hospitals whose update the aggregator has durably accepted (killing one before that
    point, e.g. between its manifest and its publish, would be a different scenario)."""
    state = rounds.RoundState.load(store, round_no)
    return {a["hospital"] for a in state.accepted} if state is not None else set()


def _decrypted(store, round_no):
    return sorted(h for h, o in threshold_flow.outcomes(store, round_no).items() if o["decrypted"])
