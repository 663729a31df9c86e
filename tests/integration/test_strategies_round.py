"""Two SCAFFOLD rounds over the real RabbitMQ and moto's S3: each hospital uploads
``[model ; control delta]`` encrypted as one vector, the aggregator only adds, and every
hospital derives the same next model and server control variate from the decrypted sum."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from cxr_mq import crypto, rounds, strategies

from . import iam
from .cluster import Cluster
from .test_round import _fedavg_from_hospitals, _update_message, cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_scaffold_rounds_over_rabbitmq_and_s3(cluster: Cluster):  # noqa: F811
    cluster.init_keys()
    cluster.make_data()
    cluster.start_all()
    # SCAFFOLD as specified (local SGD), over half an epoch, with logit adjustment: the local
    # training options travel in round_start and every hospital trains with them
    args = ("--quorum", "3", "--image-size", "32", "--epochs", "1", "--deadline", "300",
            "--strategy", "scaffold", "--balance", "none", "--local-optimizer", "sgd", "--lr", "0.05",
            "--epoch-fraction", "0.5", "--logit-adjust", "1")
    code1, first = cluster.start_round(*args)
    assert code1 == 0, first
    code2, second = cluster.start_round(*args)
    assert code2 == 0, second
    cluster.wait_models_applied(second["round"])  # the files each hospital keeps, read below
    assert second["base_model_key"] == first["model_key"]
    training = json.loads(cluster.get(rounds.round_key(second["round"])))["training"]
    assert (training["local_optimizer"], training["epoch_fraction"], training["logit_adjust"]) == ("sgd", 0.5, 1.0)

    secret = crypto.load_context_file(cluster.keys_dir / "secret.ctx")
    averages = []
    for record in (first, second):
        average = secret.decrypt_aggregate(io.BytesIO(cluster.get(record["model_key"])), record["total_samples"])
        expected = _fedavg_from_hospitals(cluster, record["round"], record)
        assert np.max(np.abs(average - expected)) < 1e-6  # the sum covers model and control
        averages.append(np.asarray(average, np.float64))
    size = averages[0].size // 2
    assert averages[0].size == 2 * size and first["contributors"] and size > 1000
    assert np.max(np.abs(averages[0][size:])) > 0  # control deltas were uploaded

    model_after_1 = averages[0][:size].astype(np.float32)
    control_after_2 = averages[0][size:] + averages[1][size:]
    for hospital in cluster.hospitals:
        # every hospital started round 2 from round 1's model and said so
        update = _update_message(cluster, second["round"], hospital)
        assert update["n_params"] == 2 * size
        assert update["start_sha256"] == strategies.model_sha256(model_after_1)
        state = strategies.ServerState.load(cluster.tmp / "work" / hospital / "strategy-state.npz")
        assert state.applied == second["model_sha256"]
        assert np.array_equal(state.model, averages[1][:size].astype(np.float32))
        assert np.max(np.abs(state.arrays["control"] - control_after_2)) < 1e-6
        # its own control variate is the sum of the two deltas it uploaded
        own = [np.load(cluster.tmp / "work" / hospital / f"update-{r:06d}.npy")[size:].astype(np.float64)
               for r in (first["round"], second["round"])]
        assert np.max(np.abs(state.arrays["client_control"] - (own[0] + own[1]))) < 1e-6
    assert rounds.aggregate_key(second["round"]) == second["model_key"]

    # evaluate / predict: the model a hospital holds (the aggregate is [model ; control])
    data = str(cluster.data_dirs["h2"])
    evaluated = json.loads(cluster.cli("evaluate", "--hospital", "h2", "--data", data, "--json").stdout)
    assert evaluated["round"] == second["round"] and evaluated["n"] > 0
    held = json.loads((cluster.tmp / "work" / "h2" / "global.json").read_text())
    assert held["round"] == second["round"] and held["aggregate_sha256"] == second["model_sha256"]
    assert held["model_sha256"] == strategies.model_sha256(averages[1][:size].astype(np.float32))
    keyed = cluster.cli("evaluate", "--data", data, "--secret-context", str(cluster.keys_dir / "secret.ctx"),
                        check=False)
    assert keyed.returncode == 2 and "used strategy scaffold: its aggregate is not the model" in keyed.stderr
    stale = cluster.cli("evaluate", "--hospital", "h2", "--round", str(first["round"]), "--data", data, check=False)
    assert stale.returncode == 2 and f"holds round {second['round']}'s model, not round {first['round']}'s" in stale.stderr
    image = str(sorted(cluster.data_dirs["h1"].glob("*.png"))[0])
    predicted = json.loads(cluster.cli("predict", image, "--hospital", "h1", "--json").stdout)
    assert predicted[0]["round"] == second["round"]
    iam.assert_policies_allow(cluster)  # SCAFFOLD's uploads and state: within the IAM policies
