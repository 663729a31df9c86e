"""Each strategy through the real CKKS codec equals its plaintext reference (written out here
from the papers' update rules, independently of cxr_mq/strategies.py), and its state
survives a restart."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_mq import strategies, training
from cxr_mq.central_bench import _Aggregator

P = 64
SAMPLES = (5, 17, 40)


@pytest.fixture(scope="module")
def encrypted():
    return _Aggregator(encrypted=True)


def _hospital_models(rng, base):
    return [base + rng.normal(scale=0.05, size=P).astype(np.float32) for _ in SAMPLES]


def _weighted_mean(vectors):
    return sum(np.asarray(v, np.float64) * n for v, n in zip(vectors, SAMPLES)) / sum(SAMPLES)


def _run_rounds(name, encrypted, rounds=3, **extra):
    """Three hospitals, each with its own state, over ``rounds`` rounds through the codec; and
    the plaintext reference of the same rounds. Returns (encrypted models, reference models)."""
    params = training.TrainingParams(strategy=name, **extra)
    strategy = strategies.make(params)
    rng = np.random.default_rng(7)
    base = rng.normal(scale=0.1, size=P).astype(np.float32)
    states = [strategies.ServerState(model=base) for _ in SAMPLES]
    ref = {"x": base.astype(np.float64), "m": np.zeros(P), "v": np.zeros(P), "c": np.zeros(P),
           "ci": [np.zeros(P) for _ in SAMPLES]}
    got, want = [], []
    for rnd in range(rounds):
        x = states[0].model
        assert all(np.array_equal(s.model, x) for s in states)
        trained = _hospital_models(rng, x)
        grads = [rng.normal(scale=0.1, size=P).astype(np.float32) for _ in SAMPLES]
        uploads = [(strategy.upload(x, w, s, g), n) for w, s, g, n in zip(trained, states, grads, SAMPLES)]
        assert all(u.size == P * strategy.upload_factor for u, _ in uploads)
        average = encrypted.fedavg(uploads)
        states = [strategies.advance(strategy, s, average, f"agg-{rnd}") for s in states]
        got.append(states[0].model)
        want.append(_reference_step(name, params, ref, trained, grads))
    return got, want, states, ref


def _reference_step(name, p, ref, trained, grads):
    x = ref["x"]
    mean = _weighted_mean(trained)
    delta = mean - x
    if name in ("fedavg", "fedprox"):
        new = x + p.server_lr * delta
    elif name == "fedavgm":
        ref["v"] = p.server_momentum * ref["v"] + delta
        new = x + p.server_lr * ref["v"]
    elif name in ("fedadam", "fedyogi"):
        ref["m"] = p.beta1 * ref["m"] + (1 - p.beta1) * delta
        if name == "fedadam":
            ref["v"] = p.beta2 * ref["v"] + (1 - p.beta2) * delta ** 2
        else:
            ref["v"] = ref["v"] - (1 - p.beta2) * delta ** 2 * np.sign(ref["v"] - delta ** 2)
        new = x + p.server_lr * ref["m"] / (np.sqrt(ref["v"]) + p.tau)
    elif name == "scaffold":
        # c <- c + mean(c_i+ - c_i) with option I: c_i+ is the local gradient at x
        ref["c"] = ref["c"] + _weighted_mean([g - ci for g, ci in zip(grads, ref["ci"])])
        ref["ci"] = [np.asarray(g, np.float64) for g in grads]
        new = x + p.server_lr * delta
    else:
        raise AssertionError(name)
    ref["x"] = new
    return new


@pytest.mark.parametrize("name,extra", [
    ("fedavg", {}), ("fedavg", {"server_lr": 1.5}), ("fedprox", {"prox_mu": 0.1}),
    ("fedavgm", {"server_momentum": 0.9}), ("fedadam", {"server_lr": 0.01}),
    ("fedyogi", {"server_lr": 0.01}), ("scaffold", {}),
])
def test_encrypted_strategy_equals_plaintext_reference(encrypted, name, extra):
    got, want, states, ref = _run_rounds(name, encrypted, **extra)
    for g, w in zip(got, want):
        assert np.max(np.abs(g - w)) < 1e-6
    assert np.max(np.abs(got[-1] - got[0])) > 1e-3  # the rounds moved the model
    if name == "scaffold":
        for s, ci in zip(states, ref["ci"]):
            assert np.max(np.abs(s.arrays["control"] - ref["c"])) < 1e-6
            assert np.max(np.abs(s.arrays["client_control"] - ci)) < 1e-6


def test_server_optimizers_differ_from_fedavg(encrypted):
    fedavg, _, _, _ = _run_rounds("fedavg", encrypted)
    for name in ("fedavgm", "fedadam", "fedyogi"):
        other, _, _, _ = _run_rounds(name, encrypted, server_lr=0.05)
        assert np.max(np.abs(other[-1] - fedavg[-1])) > 1e-3, name


def test_state_survives_a_restart_and_an_aggregate_is_applied_once(tmp_path):
    params = training.TrainingParams(strategy="fedadam", server_lr=0.1)
    strategy = strategies.make(params)
    rng = np.random.default_rng(1)
    state = strategies.ServerState(model=rng.normal(size=P).astype(np.float32))
    average = state.model + rng.normal(scale=0.1, size=P).astype(np.float32)
    once = strategies.advance(strategy, state, average, "sha-1")
    once.save(tmp_path / "state.npz")
    restored = strategies.ServerState.load(tmp_path / "state.npz")
    assert restored.applied == "sha-1"
    assert np.array_equal(restored.model, once.model)
    assert np.array_equal(restored.arrays["m"], once.arrays["m"])
    # the same aggregate again (a redelivery) changes nothing; the next one steps from the moments
    assert strategies.advance(strategy, restored, average, "sha-1") is restored
    nxt = strategies.advance(strategy, restored, average, "sha-2")
    fresh = strategies.advance(strategy, strategies.ServerState(model=once.model), average, "sha-2")
    assert not np.allclose(nxt.model, fresh.model)


def test_scaffold_aggregate_of_the_wrong_length_is_a_clear_error():
    strategy = strategies.make(training.TrainingParams(strategy="scaffold"))
    state = strategies.ServerState(model=np.zeros(P, np.float32))
    with pytest.raises(ValueError, match="expected 128"):
        strategies.advance(strategy, state, np.zeros(P, np.float32), "sha")


@pytest.mark.parametrize("field,value", [("strategy", "fedsgd"), ("prox_mu", -1.0),
                                         ("server_momentum", 1.0), ("tau", 0.0)])
def test_bad_strategy_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        training.TrainingParams(**{field: value})


def test_local_objective_adds_the_prox_and_correction_gradients():
    """The loss local training minimises has gradient ``data + mu (w - base) + (c - c_i)``:
    FedProx's proximal term and SCAFFOLD's correction, checked against the data gradient."""
    import tensorflow as tf

    from cxr_mq.data import LocalData

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 32, 32, 1), dtype=np.uint8)
    y = rng.integers(0, 3, 8)
    data = LocalData(classes=training.class_names("3class"), image_size=32, x_train=x, y_train=y,
                     x_val=x[:2], y_val=y[:2])
    params = training.TrainingParams(model="small-cnn", image_size=32, classes="3class", width=0.25)
    model = training.build_model(params)
    w = training.flat_weights(model)
    anchor = w + rng.normal(scale=0.1, size=w.size).astype(np.float32)
    correction = rng.normal(scale=0.1, size=w.size).astype(np.float32)
    mu = 3.0
    terms = training._ObjectiveTerms(model)
    terms.set(strategies.LocalObjective(anchor=anchor, mu=mu, correction=correction))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(terms.loss(y, model(x.astype(np.float32) / 255.0, training=False)))
    grads = dict(zip([id(v) for v in terms.trainable],
                     tape.gradient(loss, [v.value for v in terms.trainable])))
    total = np.concatenate([np.asarray(grads[id(v)]).ravel() if v.trainable else np.zeros(int(np.prod(v.shape)))
                            for v in model.weights])
    trainable = np.concatenate([np.full(int(np.prod(v.shape)), v.trainable) for v in model.weights])
    expected = training.data_gradient(model, data) + mu * (w - anchor) + correction
    assert np.max(np.abs(total - expected)[trainable]) < 1e-4
    assert np.max(np.abs(mu * (w - anchor) + correction)) > 0.1  # the terms are not negligible


def test_round_start_carries_the_strategy_and_refuses_an_unknown_one():
    from cxr_mq import messages

    sha = "0" * 64
    fields = dict(round=1, base_model_key="rounds/000001/base", base_model_sha256=sha,
                  base_model_encrypted=False, base_total_samples=0, quorum=3, min_clients=2,
                  deadline=10.0, key_fingerprint=sha, codec_profile="compact", n_params=10, issued_at=1.0)
    params = training.TrainingParams(strategy="fedadam", server_lr=0.03, beta2=0.999)
    message = messages.decode(messages.encode(messages.make("round_start", training=params.to_dict(), **fields)))
    assert training.TrainingParams.from_dict(message["training"]) == params
    with pytest.raises(messages.MessageError, match="strategy"):
        messages.make("round_start", training={**params.to_dict(), "strategy": "fedsgd"}, **fields)
