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
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["central"] is None and data["accuracy_gap_points"] is None
    assert data["setup"]["server_lr"] == 1.5 and data["setup"]["total_epochs"] == 1
    assert 0.0 <= data["federated"]["summary"]["accuracy"] <= 1.0
    bad = CliRunner().invoke(main, ["bench-federated", "--server-lr", "0"])
    assert bad.exit_code == 2 and "server_lr" in bad.output
