"""The training interface the workers use: params, models by name, flat weights, train/evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_mq import training
from cxr_mq.model import build
from cxr_mq.synth import write_synthetic
from cxr_mq.training import (
    LocalData,
    TrainingParams,
    build_model,
    class_names,
    evaluate,
    flat_weights,
    load_flat_weights,
    predict_proba,
    train_local,
)

TINY = TrainingParams(model="small-cnn", image_size=32, epochs=1, batch_size=8, width=0.5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, 24, seed=3, size=40)
    return LocalData.from_dir(out, TINY, val_fraction=0.25)


def test_params_round_trip_is_json_safe():
    p = TrainingParams(model="covidnet-s", image_size=48, classes="3class", epochs=2, lr=5e-4)
    d = json.loads(json.dumps(p.to_dict()))
    assert TrainingParams.from_dict(d) == p


def test_params_ignore_unknown_keys_and_accept_json_numbers():
    p = TrainingParams.from_dict({"epochs": 3.0, "lr": 1, "future_field": "x"})
    assert p.epochs == 3 and isinstance(p.epochs, int) and p.lr == 1.0


@pytest.mark.parametrize(
    "field, value",
    [("model", "resnet9000"), ("classes", "4class"), ("epochs", 0), ("lr", -1.0),
     ("image_size", 4), ("batch_size", "16"), ("balance", "magic"), ("epochs", True),
     ("server_lr", 0.0), ("server_lr", 11.0), ("server_lr", "2")],
)
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainingParams.from_dict({field: value})


def test_class_names():
    assert class_names("binary") == ("negative", "positive")
    assert class_names("3class") == ("normal", "pneumonia", "COVID-19")
    with pytest.raises(ValueError):
        class_names("5class")


def test_initial_weights_deterministic_per_seed():
    a = flat_weights(build_model(TINY))
    b = flat_weights(build_model(TINY))
    c = flat_weights(build_model(TrainingParams(**{**TINY.to_dict(), "seed": 1})))
    assert a.dtype == np.float32 and a.ndim == 1
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_flat_weights_include_batchnorm_statistics_and_round_trip():
    model = build_model(TINY)
    n = sum(int(np.prod(v.shape)) for v in model.weights)
    n_trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    flat = flat_weights(model)
    assert flat.size == n > n_trainable  # BN moving mean/variance are in there
    other = build_model(TINY)
    target = np.arange(flat.size, dtype=np.float32) / flat.size
    load_flat_weights(other, target)
    assert np.array_equal(flat_weights(other), target)


def test_load_flat_weights_wrong_length_names_both():
    model = build_model(TINY)
    n = flat_weights(model).size
    with pytest.raises(ValueError, match=rf"{n - 1}.*{n}"):
        load_flat_weights(model, np.zeros(n - 1, dtype=np.float32))


@pytest.mark.parametrize("name", ["covidnet-s", "covidnet-s-bn", "mobilenetv2", "densenet121"])
def test_named_models_build_without_downloads(name):
    model = build(name, 32, 3, seed=0)
    assert model.input_shape == (None, 32, 32, 1)
    assert model.output_shape == (None, 3)
    if name.startswith("covidnet-s"):
        assert model.count_params() <= 2_000_000
        wide = build(name, 32, 3, width=2.0, depth=2)
        assert model.count_params() < wide.count_params() <= 2_000_000
        kinds = {type(layer).__name__ for layer in model.layers}
        assert {"DepthwiseConv2D", "Add"} <= kinds
        assert ("BatchNormalization" in kinds) == name.endswith("-bn")


def test_train_evaluate_predict(tiny_data):
    assert tiny_data.n_train + tiny_data.n_val == 24 and tiny_data.n_val > 0
    model = build_model(TINY)
    before = flat_weights(model)
    out = train_local(model, tiny_data, TINY)
    assert set(out) == {"loss", "accuracy"} and all(isinstance(v, float) for v in out.values())
    assert not np.array_equal(before, flat_weights(model))
    report = evaluate(model, tiny_data)
    json.dumps(report)
    assert report["n"] == tiny_data.n_val
    assert np.asarray(report["confusion_matrix"]).sum() == tiny_data.n_val
    for key in ("accuracy", "auc", "sensitivity", "ppv", "sensitivity_positive", "ppv_positive"):
        assert key in report
    proba = predict_proba(model, tiny_data.val_images())
    assert proba.shape == (tiny_data.n_val, 2)
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("balance", ["none", "resample"])
def test_train_balance_modes(tiny_data, balance):
    params = TrainingParams(**{**TINY.to_dict(), "balance": balance, "augment": False})
    out = train_local(build_model(params), tiny_data, params)
    assert np.isfinite(out["loss"])


def test_train_rejects_mismatched_data(tiny_data):
    params = TrainingParams(**{**TINY.to_dict(), "image_size": 48})
    with pytest.raises(ValueError, match="48"):
        train_local(build_model(params), tiny_data, params)


def test_interface_exports():
    for name in ("TrainingParams", "class_names", "build_model", "flat_weights", "load_flat_weights",
                 "LocalData", "train_local", "evaluate", "predict_proba", "extrapolate"):
        assert hasattr(training, name)


def test_encrypted_fedavg_equals_plaintext_fedavg():
    from cxr_mq.central_bench import _Aggregator

    rng = np.random.default_rng(0)
    updates = [(rng.normal(size=300).astype(np.float32), n) for n in (5, 17, 40)]
    plain = _Aggregator(encrypted=False).fedavg(updates)
    expected = sum(w.astype(np.float64) * n for w, n in updates) / 62
    assert np.allclose(plain, expected, atol=1e-6)
    assert np.allclose(_Aggregator(encrypted=True).fedavg(updates), plain, atol=1e-4)


def test_server_learning_rate_through_encrypted_fedavg():
    """Hospitals extrapolate their own updates; the encrypted FedAvg of those is the server
    step base + server_lr * (FedAvg of the trained models - base)."""
    from cxr_mq.central_bench import _Aggregator

    rng = np.random.default_rng(3)
    base = rng.normal(size=500).astype(np.float32)
    trained = [(base + rng.normal(scale=0.1, size=500).astype(np.float32), n) for n in (3, 50, 200)]
    assert training.extrapolate(base, trained[0][0], 1.0) is trained[0][0]
    mean = sum(w.astype(np.float64) * n for w, n in trained) / 253
    for server_lr in (0.5, 1.5, 2.0):
        sent = [(training.extrapolate(base, w, server_lr), n) for w, n in trained]
        assert all(s.dtype == np.float32 for s, _ in sent)
        got = _Aggregator(encrypted=True).fedavg(sent)
        want = base + server_lr * (mean - base)
        assert np.max(np.abs(got - want)) < 1e-5
        assert np.max(np.abs(got - mean)) > 0.01  # and it is not plain FedAvg


def test_central_vs_federated_smoke():
    from cxr_mq.central_bench import run_central_vs_federated

    out = run_central_vs_federated(n=36, hospitals=2, alpha=1.0, rounds=1, encrypted=False,
                                   classes="binary", model="small-cnn", image_size=32,
                                   log=lambda *_: None)
    assert out["setup"]["total_epochs"] == 1
    assert sum(h["images"] for h in out["hospitals"]) == out["setup"]["n_train"]
    for side in ("central", "federated"):
        assert 0.0 <= out[side]["summary"]["accuracy"] <= 1.0
    assert len(out["federated"]["history"]) == 1


def test_local_steps_fix_the_step_count(tiny_data):
    params = TrainingParams(**{**TINY.to_dict(), "local_steps": 5, "epochs": 2})
    model = build_model(params)
    train_local(model, tiny_data, params)
    assert int(model.optimizer.iterations.numpy()) == 10  # more than the data holds: it repeats
    train_local(model, tiny_data, params, lr=1e-4, lr_end=1e-5)  # compiled step reused, state reset
    assert int(model.optimizer.iterations.numpy()) == 10
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-5, rel=1e-3)


def test_epoch_fraction_and_local_sgd(tiny_data):
    """epoch_fraction f: ceil(f * batches) steps per local epoch from a repeating shuffle;
    local_optimizer sgd: a fresh SGD with the asked momentum, recompiled only on a change."""
    batches = int(np.ceil(tiny_data.n_train / 8))
    assert batches >= 2
    params = TrainingParams(**{**TINY.to_dict(), "epochs": 3, "epoch_fraction": 0.5,
                               "local_optimizer": "sgd", "local_momentum": 0.5})
    model = build_model(params)
    train_local(model, tiny_data, params)
    assert type(model.optimizer).__name__ == "SGD" and float(model.optimizer.momentum) == 0.5
    assert int(model.optimizer.iterations.numpy()) == 3 * int(np.ceil(0.5 * batches))
    train_local(model, tiny_data, TrainingParams(**{**TINY.to_dict(), "epochs": 1}))  # back to Adam
    assert type(model.optimizer).__name__ == "Adam" and int(model.optimizer.iterations.numpy()) == batches


def test_bench_federated_command_writes_json(tmp_path):
    """``cxr-mq bench-federated`` forwards its options; --federated-only skips the central run."""
    import json

    from click.testing import CliRunner

    from cxr_mq.cli import main

    out = tmp_path / "result.json"
    result = CliRunner().invoke(main, [
        "bench-federated", "--n", "36", "--hospitals", "2", "--alpha", "1.0", "--rounds", "1",
        "--plaintext", "--classes", "binary", "--model", "small-cnn", "--image-size", "32",
        "--server-lr", "1.5", "--federated-only", "--json", str(out),
        "--strategy", "fedavg:epoch_fraction=0.5,local_optimizer=sgd,lr=0.05,batch_size=4",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["central"] is None and data["accuracy_gap_points"] is None
    assert data["setup"]["server_lr"] == 1.5 and data["setup"]["total_epochs"] == 1
    # half a local epoch per round: two rounds make central's one epoch
    assert data["setup"]["rounds"] == 2 and len(data["federated"]["history"]) == 2
    assert data["setup"]["strategy_params"] == {"epoch_fraction": 0.5, "local_optimizer": "sgd", "lr": 0.05,
                                                "batch_size": 4}
    assert isinstance(data["setup"]["strategy_params"]["batch_size"], int) and data["setup"]["batch_size"] == 16
    assert 0.0 <= data["federated"]["summary"]["accuracy"] <= 1.0
    bad = CliRunner().invoke(main, ["bench-federated", "--server-lr", "0"])
    assert bad.exit_code == 2 and "server_lr" in bad.output
    for spec, field in (("fedavg:epoch_fraction=0.3", "epoch_fraction"), ("fedavg:local_optimizer=lbfgs",
                                                                         "local_optimizer"),
                        ("fedavg:batch_size=2.5", "batch_size"), ("fedavg:bogus=1", "bogus")):
        bad = CliRunner().invoke(main, ["bench-federated", "--rounds", "1", "--strategy", spec])
        assert bad.exit_code == 2 and field in bad.output, bad.output


def test_bench_runs_fedsgd_for_the_same_total_epochs_and_anneals_the_server_rate():
    """FedSGD in the bench: rounds = epochs x training set / samples per round (every hospital
    contributes min(batch, its size) per step), the test set scored once per epoch, the
    hospitals' SGD rate constant and the server's Adam rate annealed (round_start's server_lr)."""
    from cxr_mq import central_bench

    seen = []
    real = central_bench.strategies.make

    def spy(params, sizes=None):
        seen.append((params.lr, params.server_lr))
        return real(params, sizes)

    central_bench.strategies.make = spy
    try:
        out = central_bench.run_central_vs_federated(
            n=36, hospitals=2, alpha=1.0, rounds=2, encrypted=False, classes="binary", model="small-cnn",
            image_size=32, central=False, strategy="fedsgd", server_lr=0.01,
            strategy_params={"lr": 1.0, "batch_size": 4, "bias_correction": True}, log=lambda *_: None)
    finally:
        central_bench.strategies.make = real
    per_round = sum(min(4, h["images"]) for h in out["hospitals"])
    rounds = round(2 * out["setup"]["n_train"] / per_round)
    assert out["setup"]["rounds"] == rounds > 2
    assert [e["epoch"] for e in out["federated"]["history"]][-1] == 2
    assert len(out["federated"]["history"]) in (2, 3)
    rates = [r for _, r in seen[1:]]  # the first make() is the run's own
    assert {lr for lr, _ in seen} == {1.0}
    assert rates[0] == pytest.approx(0.01) and rates[-1] < 0.002 and rates == sorted(rates, reverse=True)


def test_a_federated_only_grid_skips_central_training_for_every_seed(monkeypatch):
    """``--federated-only`` with several seeds: no central run at all (it used to apply to
    the first seed only)."""
    from cxr_mq import central_bench

    calls = []
    monkeypatch.setattr(central_bench, "run_central", lambda *a, **k: calls.append(1) or {})
    results = central_bench.run_grid(["fedavg"], [1.0], [0, 1], None, log=lambda *_: None, n=36, hospitals=2,
                                     rounds=1, encrypted=False, classes="binary", model="small-cnn",
                                     image_size=32, central=False)
    assert calls == [] and [r["central"] for r in results] == [None, None]


def test_bench_fedsgd_with_central_sample_rate_runs_centrals_step_count():
    """``sample_rate=central``: each image of the pool in a round's batch with probability
    B / N, so a round processes B samples in expectation and the run takes epochs x N / B
    rounds (central's steps); the spec keeps the word, the setup records it."""
    from cxr_mq import central_bench

    name, values = central_bench.parse_strategy("fedsgd:lr=1,sample_rate=central")
    assert (name, values) == ("fedsgd", {"lr": 1.0, "sample_rate": "central"})
    with pytest.raises(ValueError, match="sample_rate"):
        central_bench.parse_strategy("fedavg:sample_rate=central")
    out = central_bench.run_central_vs_federated(
        n=36, hospitals=2, alpha=1.0, rounds=2, encrypted=False, classes="binary", model="small-cnn",
        image_size=32, central=False, strategy="fedsgd", batch_size=4, server_lr=0.01,
        strategy_params=values, log=lambda *_: None)
    assert out["setup"]["rounds"] == round(2 * out["setup"]["n_train"] / 4)
    assert out["setup"]["strategy_params"]["sample_rate"] == "central"
    # shuffle_rounds=central: central training's steps per epoch (N / B rounded up) a round each
    name, values = central_bench.parse_strategy("fedsgd:lr=1,shuffle_rounds=central")
    assert values == {"lr": 1.0, "shuffle_rounds": "central"}
    out = central_bench.run_central_vs_federated(
        n=36, hospitals=2, alpha=1.0, rounds=2, encrypted=False, classes="binary", model="small-cnn",
        image_size=32, central=False, strategy="fedsgd", batch_size=4, server_lr=0.01,
        strategy_params=values, log=lambda *_: None)
    assert out["setup"]["rounds"] == 2 * -(-out["setup"]["n_train"] // 4)


def test_bench_repeats_train_again_on_the_same_data_split_and_test_set(monkeypatch):
    """``repeat`` r: the same synthetic data, test patients and hospitals as the seed's first
    run, but training seed ``seed + 1000 r`` (the models start from other weights)."""
    from cxr_mq import central_bench

    built = []
    real = central_bench.build_model
    monkeypatch.setattr(central_bench, "build_model", lambda p: built.append(p.seed) or real(p))
    runs = [central_bench.run_central_vs_federated(
        n=36, hospitals=2, alpha=1.0, rounds=1, encrypted=False, classes="binary", model="small-cnn",
        image_size=32, central=False, seed=3, repeat=r, log=lambda *_: None) for r in (0, 1)]
    assert built == [3, 1003]
    assert runs[0]["hospitals"] == runs[1]["hospitals"]
    assert [r["setup"]["n_test"] for r in runs] == [runs[0]["setup"]["n_test"]] * 2
    assert [(r["setup"]["repeat"], r["setup"]["train_seed"]) for r in runs] == [(0, 3), (1, 1003)]


def test_repeat_table_compares_the_means_over_repeats_per_seed():
    from cxr_mq import central_bench

    def run(seed, repeat, central, federated, alpha=0.5):
        setup = {"seed": seed, "repeat": repeat, "alpha": alpha, "strategy": "fedsgd", "strategy_params": {},
                 "server_lr": 0.002, "n": 720, "total_epochs": 16}
        return {"setup": setup, "central": {"summary": {"accuracy": central}},
                "federated": {"test": {"accuracy": federated}}}

    table = central_bench.repeat_table([run(0, 0, 0.94, 0.92), run(0, 1, 0.96, 0.95), run(0, 2, 0.95, 0.97),
                                        run(1, 0, 0.90, 0.80), run(1, 0, 0.90, 0.85)])  # a rerun replaces
    rows = table.splitlines()[2:]
    assert rows[0] == "| 0.5 | fedsgd server_lr=0.002 | 0 | 3 | 95.00 (94.00-96.00) | 94.67 (92.00-97.00) | 0.33 |"
    assert rows[1] == "| 0.5 | fedsgd server_lr=0.002 | 1 | 1 | 90.00 (90.00-90.00) | 85.00 (85.00-85.00) | 5.00 |"


def test_repeats_option_takes_a_count_or_a_range():
    import argparse

    from cxr_mq.central_bench import _repeats

    assert (_repeats("3"), _repeats("1-2"), _repeats("2-2")) == (range(3), range(1, 3), range(2, 3))
    for bad in ("0", "2-1", "x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _repeats(bad)
