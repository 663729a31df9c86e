"""Two FedSGD rounds over the real RabbitMQ and moto's S3: every hospital takes one plain SGD
step at lr 1 from the round's base, the aggregator only adds the ciphertexts, and every
hospital takes the same bias-corrected Adam step with the server rate its round's
round_start carries (annealed by the controller round by round)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cxr_mq import crypto, rounds, strategies

from .cluster import Cluster
from .test_round import _fedavg_from_hospitals, _update_message, cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_fedsgd_rounds_over_rabbitmq_and_s3(cluster: Cluster):  # noqa: F811
    cluster.init_keys()
    cluster.make_data()
    cluster.start_all()
    common = ("--quorum", "3", "--image-size", "32", "--deadline", "300", "--strategy", "fedsgd",
              "--lr", "1", "--batch-size", "8", "--balance", "none", "--local-steps", "1",
              "--beta2", "0.999", "--tau", "1e-7", "--bias-correction",
              # the hospitals build the model's tensor sizes for the clip (too high to bite here)
              "--server-clipnorm", "1000")
    code1, first = cluster.start_round(*common, "--server-lr", "0.01")
    assert code1 == 0, first
    # the second round Poisson-samples its batches (a hospital drawing none of its images
    # would upload its base: at rate 0.9 that is 0.1^images)
    code2, second = cluster.start_round(*common, "--server-lr", "0.005", "--sample-rate", "0.9")
    assert code2 == 0, second
    cluster.wait_models_applied(second["round"])  # the files each hospital keeps, read below
    training = json.loads(cluster.get(rounds.round_key(second["round"])))["training"]
    assert (training["strategy"], training["bias_correction"], training["local_steps"], training["server_lr"],
            training["server_clipnorm"], training["sample_rate"]) == ("fedsgd", True, 1, 0.005, 1000.0, 0.9)

    secret = crypto.load_context_file(cluster.keys_dir / "secret.ctx")
    x = np.load(io.BytesIO(cluster.get(first["base_model_key"]))).astype(np.float64)  # the initial model
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, (record, rate) in enumerate(((first, 0.01), (second, 0.005)), start=1):
        average = secret.decrypt_aggregate(io.BytesIO(cluster.get(record["model_key"])), record["total_samples"])
        assert np.max(np.abs(average - _fedavg_from_hospitals(cluster, record["round"], record))) < 1e-6
        for hospital in cluster.hospitals:
            update = _update_message(cluster, record["round"], hospital)
            assert update["start_sha256"] == strategies.model_sha256(x.astype(np.float32))
            own = np.load(cluster.tmp / "work" / hospital / f"update-{record['round']:06d}.npy")
            assert 0 < np.max(np.abs(own - x)) < 10  # one gradient step, not a local epoch of Adam
        # the reference server step: Keras' Adam on minus the decrypted average's distance
        d = np.asarray(average, np.float32).astype(np.float64) - x  # hospitals hold it as float32
        m = 0.9 * m + 0.1 * d
        v = 0.999 * v + 0.001 * d ** 2
        want = x + rate * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-7)
        assert np.max(np.abs(want - x)) > 0.5 * rate  # Adam's first steps move by about the rate
        for hospital in cluster.hospitals:  # every hospital took this step
            held = np.load(cluster.tmp / "work" / hospital / f"base-{record['model_sha256']}.npy")
            assert np.max(np.abs(held - want)) < 1e-6
        x = held.astype(np.float64)  # the next round's base, bit for bit
    for hospital in cluster.hospitals:
        state = strategies.ServerState.load(cluster.tmp / "work" / hospital / "strategy-state.npz")
        assert state.applied == second["model_sha256"] and int(state.arrays["t"]) == 2
        assert np.array_equal(state.model, x.astype(np.float32))
