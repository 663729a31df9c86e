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
SIZES = (16, 48)  # the model's tensors (server_clipnorm clips each)


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
    strategy = strategies.make(params, SIZES)
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
    if p.server_clipnorm > 0:  # Keras' clipnorm, per tensor
        parts = np.split(delta, np.cumsum(SIZES)[:-1])
        delta = np.concatenate([d * min(1.0, p.server_clipnorm / np.linalg.norm(d)) for d in parts])
        ref.setdefault("clipped", []).append(any(np.linalg.norm(d) > p.server_clipnorm for d in parts))
    if name in ("fedavg", "fedprox"):
        new = x + p.server_lr * delta
    elif name == "fedavgm":
        ref["v"] = p.server_momentum * ref["v"] + delta
        new = x + p.server_lr * ref["v"]
    elif name in ("fedadam", "fedyogi", "fedsgd"):
        ref["m"] = p.beta1 * ref["m"] + (1 - p.beta1) * delta
        if name in ("fedadam", "fedsgd"):
            ref["v"] = p.beta2 * ref["v"] + (1 - p.beta2) * delta ** 2
        else:
            ref["v"] = ref["v"] - (1 - p.beta2) * delta ** 2 * np.sign(ref["v"] - delta ** 2)
        rate = p.server_lr
        if p.bias_correction:  # Keras' Adam: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)
            ref["t"] = ref.get("t", 0) + 1
            rate *= np.sqrt(1 - p.beta2 ** ref["t"]) / (1 - p.beta1 ** ref["t"])
        new = x + rate * ref["m"] / (np.sqrt(ref["v"]) + p.tau)
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
    ("fedadam", {"server_lr": 0.01, "beta2": 0.999, "bias_correction": True}),
    ("fedsgd", {"server_lr": 0.01, "beta2": 0.999, "tau": 1e-7, "bias_correction": True}),
    ("fedsgd", {"server_lr": 0.01, "beta2": 0.999, "tau": 1e-7, "bias_correction": True,
                "server_clipnorm": 0.05}),
    ("fedavgm", {"server_clipnorm": 0.05}),
])
def test_encrypted_strategy_equals_plaintext_reference(encrypted, name, extra):
    got, want, states, ref = _run_rounds(name, encrypted, **extra)
    if extra.get("server_clipnorm"):
        assert all(ref["clipped"])  # the clipping was exercised
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


@pytest.mark.parametrize("field,value", [("strategy", "fednova"), ("prox_mu", -1.0),
                                         ("server_momentum", 1.0), ("tau", 0.0),
                                         ("local_optimizer", "rmsprop"), ("local_momentum", 1.0),
                                         ("local_momentum", "0.9"), ("epoch_fraction", 0.0),
                                         ("epoch_fraction", 1.5), ("logit_adjust", -1.0),
                                         ("bias_correction", 1), ("server_clipnorm", -1.0)])
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
    params = training.TrainingParams(strategy="fedsgd", server_lr=0.03, beta2=0.999, bias_correction=True,
                                     local_steps=2)
    message = messages.decode(messages.encode(messages.make("round_start", training=params.to_dict(), **fields)))
    assert training.TrainingParams.from_dict(message["training"]) == params
    with pytest.raises(messages.MessageError, match="strategy"):
        messages.make("round_start", training={**params.to_dict(), "strategy": "fednova"}, **fields)


@pytest.mark.parametrize("field,value", [("local_optimizer", "rmsprop"), ("local_momentum", 1.0),
                                         ("local_momentum", -0.1), ("epoch_fraction", 0),
                                         ("epoch_fraction", 2.0), ("logit_adjust", -0.5)])
def test_round_start_carries_the_local_training_options_and_refuses_bad_ones(field, value):
    from cxr_mq import messages

    sha = "0" * 64
    fields = dict(round=1, base_model_key="rounds/000001/base", base_model_sha256=sha,
                  base_model_encrypted=False, base_total_samples=0, quorum=3, min_clients=2,
                  deadline=10.0, key_fingerprint=sha, codec_profile="compact", n_params=10, issued_at=1.0)
    params = training.TrainingParams(strategy="scaffold", local_optimizer="sgd", local_momentum=0.5,
                                     epoch_fraction=0.25, logit_adjust=1.0)
    message = messages.decode(messages.encode(messages.make("round_start", training=params.to_dict(), **fields)))
    assert training.TrainingParams.from_dict(message["training"]) == params
    with pytest.raises(messages.MessageError, match=f"training/{field}"):
        messages.make("round_start", training={**params.to_dict(), field: value}, **fields)


def test_scaffold_with_local_sgd_trains_and_its_encrypted_aggregate_equals_plaintext(encrypted):
    """SCAFFOLD as specified, with plain local SGD (+momentum) over a fraction of an epoch:
    real local training at three hospitals, whose uploads (model and real control deltas)
    summed under encryption give the same next model and control variates as in plaintext."""
    from cxr_mq.data import LocalData

    params = training.TrainingParams(model="small-cnn-gn", image_size=32, classes="3class", width=0.25,
                                     strategy="scaffold", local_optimizer="sgd", local_momentum=0.9,
                                     lr=0.05, epoch_fraction=0.5, augment=False, balance="none")
    strategy = strategies.make(params)
    rng = np.random.default_rng(3)
    sites = []
    for n, labels in ((12, (0, 1)), (20, (1,)), (8, (2, 0))):
        y = rng.choice(labels, n)
        x = (rng.integers(0, 60, (n, 32, 32, 1)) + 120 * y[:, None, None, None]).astype(np.uint8)
        sites.append(LocalData(classes=training.class_names("3class"), image_size=32, x_train=x, y_train=y,
                               x_val=x[:2], y_val=y[:2]))
    model = training.build_model(params)
    base = training.flat_weights(model)
    enc_states = [strategies.ServerState(model=base) for _ in sites]
    plain_states = [strategies.ServerState(model=base) for _ in sites]
    plaintext = _Aggregator(encrypted=False)
    for rnd in (1, 2):
        uploads = []
        for h, (data, state) in enumerate(zip(sites, enc_states)):
            training.load_flat_weights(model, state.model)
            gradient = training.data_gradient(model, data)
            objective = strategy.local_objective(state.model, state)
            assert (objective.correction is not None and np.any(objective.correction)) == (rnd == 2)
            training.train_local(model, data, params, round_seed=rnd * 10 + h, objective=objective)
            assert type(model.optimizer).__name__ == "SGD" and float(model.optimizer.momentum) == 0.9
            assert int(model.optimizer.iterations.numpy()) == training.local_steps_per_epoch(params, data.n_train)
            trained = training.flat_weights(model)
            assert np.max(np.abs(trained - state.model)) > 1e-4  # local SGD moved the model
            # both sides see the same upload; each state keeps its own next client control
            upload = strategy.upload(state.model, trained, state, gradient)
            strategy.upload(state.model, trained, plain_states[h], gradient)
            uploads.append((upload, data.n_train))
        enc = encrypted.fedavg(uploads)
        plain = plaintext.fedavg(uploads)
        assert np.max(np.abs(enc - plain)) < 1e-6
        enc_states = [strategies.advance(strategy, s, enc, f"agg-{rnd}") for s in enc_states]
        plain_states = [strategies.advance(strategy, s, plain, f"agg-{rnd}") for s in plain_states]
        for e, p in zip(enc_states, plain_states):
            assert np.max(np.abs(e.model - p.model)) < 1e-6
            assert np.max(np.abs(e.arrays["control"] - p.arrays["control"])) < 1e-6
    assert np.max(np.abs(enc_states[0].arrays["control"])) > 1e-3  # real gradients went through


def test_logit_adjustment_trains_on_the_prior_adjusted_softmax():
    """With logit_adjust tau the local loss is the cross-entropy of ``p_c * prior_c^tau``
    renormalised, the prior being the hospital's own add-one-smoothed class frequencies;
    train_local sets it from the local labels."""
    import tensorflow as tf

    from cxr_mq.data import LocalData

    rng = np.random.default_rng(5)
    y = np.array([0] * 9 + [1] * 3)  # no class 2 at this hospital
    x = rng.integers(0, 255, (12, 32, 32, 1), dtype=np.uint8)
    data = LocalData(classes=training.class_names("3class"), image_size=32, x_train=x, y_train=y,
                     x_val=x[:2], y_val=y[:2])
    prior = np.array([10 / 15, 4 / 15, 1 / 15])
    assert np.allclose(np.exp(training.local_log_prior(data)), prior)
    params = training.TrainingParams(model="small-cnn-gn", image_size=32, classes="3class", width=0.25,
                                     logit_adjust=0.5, augment=False, local_steps=1)
    model = training.build_model(params)
    training.train_local(model, data, params)
    terms = model._cxr_mq_terms
    assert np.allclose(terms.log_prior.numpy(), 0.5 * np.log(prior), atol=1e-6)
    p = np.asarray(model(x[:4].astype(np.float32) / 255.0, training=False), np.float64)
    q = p * prior ** 0.5
    q /= q.sum(axis=1, keepdims=True)
    want = -np.log(q[np.arange(4), y[:4]])
    got = terms.loss(tf.constant(y[:4]), tf.constant(p, tf.float32)).numpy()
    assert np.max(np.abs(got - want)) < 1e-5
    assert np.max(np.abs(want + np.log(p[np.arange(4), y[:4]]))) > 0.05  # not the plain loss
    training.train_local(model, data, training.TrainingParams(**{**params.to_dict(), "logit_adjust": 0.0}))
    assert not np.any(terms.log_prior.numpy())  # off again for a round without it


# FedSGD's aggregate against the union's gradient: equal within float32 arithmetic, as the
# hospitals' gradients and the union's add the same terms in different orders, with kernels
# that depend on the CPU (3.7e-6 on an entry of 0.12 on an AVX2 EPYC, about 1e-6 on an
# AVX-512 Xeon); the encrypted sum adds under 1e-7. A wrong rule is off by 1e-2 and more.
FLOAT32_SUMS = dict(rtol=1e-4, atol=1e-5)


def _tiny_model(n_classes=3, size=16):
    """A small convolutional model without dropout or batch statistics, so one training step's
    gradient is a deterministic function of the batch."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_fedsgd_aggregate_is_the_gradient_over_the_union_of_the_hospitals_data(encrypted):
    """FedSGD's premise: with one plain SGD step at lr 1 from the same base, the encrypted,
    sample-weighted average of the hospitals' uploads is the base minus the mean gradient
    over the union of their batches, however skewed their labels (here each hospital holds
    one class, and each batch is the hospital's whole data)."""
    import keras
    import tensorflow as tf

    from cxr_mq.data import LocalData

    rng = np.random.default_rng(5)
    size, names = 16, training.class_names("3class")
    params = training.TrainingParams(model="small-cnn", image_size=size, classes="3class", strategy="fedsgd",
                                     lr=1.0, batch_size=16, balance="none", augment=False, server_lr=0.01,
                                     beta2=0.999, tau=1e-7, bias_correction=True)
    model = _tiny_model(size=size)
    base = training.flat_weights(model)
    sites = []
    for label, n in ((0, 3), (1, 6), (2, 11)):
        x = rng.integers(0, 255, (n, size, size, 1), dtype=np.uint8)
        sites.append(LocalData(classes=names, image_size=size, x_train=x, y_train=np.full(n, label),
                               x_val=x[:1], y_val=np.full(1, label)))
    strategy = strategies.make(params)
    state = strategies.ServerState(model=base)
    uploads = []
    for h, data in enumerate(sites):
        training.load_flat_weights(model, base)
        training.train_local(model, data, params, round_seed=h)
        uploads.append((strategy.upload(base, training.flat_weights(model), state), data.n_train))
    average = encrypted.fedavg(uploads)

    # the reference: the mean cross-entropy gradient over all 20 images at the base
    training.load_flat_weights(model, base)
    x = np.concatenate([s.x_train for s in sites]).astype(np.float32) / 255.0
    y = np.concatenate([s.y_train for s in sites])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True)))
    grads = tape.gradient(loss, [v.value for v in model.weights])
    union = np.concatenate([np.asarray(g).ravel() for g in grads])
    assert np.max(np.abs(union)) > 1e-2  # a real gradient
    assert np.allclose(base.astype(np.float64) - average, union, **FLOAT32_SUMS)
    plain = _Aggregator(encrypted=False).fedavg(uploads)
    assert np.max(np.abs(average - plain)) < 1e-6
    # and the server step is Adam's first (bias-corrected) step on it: every coordinate with a
    # gradient moves by server_lr
    nxt = strategies.advance(strategy, state, average, "agg-1")
    moved = np.abs(nxt.model - base)[np.abs(union) > 1e-3]
    assert np.allclose(moved, params.server_lr, rtol=1e-2)  # 3.16 x without the correction


def test_fedsgd_local_steps_are_plain_sgd_on_fresh_minibatches():
    """``local_steps`` K: K plain SGD steps (no momentum, no clipping: a large rate moves the
    weights by rate x gradient however large), each on ``batch_size`` distinct samples."""
    from cxr_mq.data import LocalData

    rng = np.random.default_rng(6)
    size = 16
    x = rng.integers(0, 255, (40, size, size, 1), dtype=np.uint8)
    y = rng.integers(0, 3, 40)
    data = LocalData(classes=training.class_names("3class"), image_size=size, x_train=x, y_train=y,
                     x_val=x[:1], y_val=y[:1])
    params = training.TrainingParams(model="small-cnn", image_size=size, classes="3class", strategy="fedsgd",
                                     lr=50.0, batch_size=8, balance="none", augment=False, local_steps=1)
    model = _tiny_model(size=size)
    base = 4 * training.flat_weights(model)  # large activations: a gradient of norm well above 1
    training.load_flat_weights(model, base)
    training.train_local(model, data, params, round_seed=1)
    one = training.flat_weights(model) - base
    # the same batch, found again from the same seed, gives the step's gradient
    idx = np.random.default_rng([params.seed, 1]).choice(40, 8, replace=False)
    assert len(set(idx.tolist())) == 8
    training.load_flat_weights(model, base)
    g = training.data_gradient(model, LocalData(classes=data.classes, image_size=size, x_train=x[idx],
                                                y_train=y[idx], x_val=x[:1], y_val=y[:1]))
    # 4 tensors: one has norm above 1.5, which clipping at norm 1 per tensor would shorten
    assert np.linalg.norm(g) > 3.0
    assert np.allclose(one, -50 * g, rtol=1e-4, atol=1e-4)
    training.load_flat_weights(model, base)
    from dataclasses import replace

    training.train_local(model, data, replace(params, local_steps=3, lr=0.1), round_seed=1)
    three = training.flat_weights(model) - base
    first = 0.1 / 50 * one  # the first of the three steps
    assert np.max(np.abs(three - first)) > 10 * np.max(np.abs(first - (-0.1 * g)))  # two more steps


def test_server_clipnorm_needs_the_tensor_sizes():
    strategy = strategies.make(training.TrainingParams(strategy="fedsgd", server_clipnorm=1.0))
    state = strategies.ServerState(model=np.zeros(P, np.float32))
    with pytest.raises(ValueError, match="server_clipnorm needs the model's tensor sizes"):
        strategies.advance(strategy, state, np.ones(P, np.float32), "sha")


def _single_class_sites(seed: int, size: int, counts) -> list:
    """Hospitals of random images, hospital i holding ``counts[i]`` images all of class i."""
    from cxr_mq.data import LocalData

    gen, names, sites = np.random.default_rng(seed), training.class_names("3class"), []
    for label, n in enumerate(counts):
        x = gen.integers(0, 255, (n, size, size, 1), dtype=np.uint8)
        sites.append(LocalData(classes=names, image_size=size, x_train=x, y_train=np.full(n, label),
                               x_val=x[:1], y_val=np.full(1, label)))
    return sites


def _fedsgd_case(seed: int, **sampling):
    """FedSGD at lr 1 on a tiny model over three single-class hospitals of 4, 7 and 12 random
    16 px images: (params, model, its initial weights, the hospitals)."""
    params = training.TrainingParams(model="small-cnn", image_size=16, classes="3class", strategy="fedsgd",
                                     lr=1.0, balance="none", augment=False, **sampling)
    model = _tiny_model(size=16)
    return params, model, training.flat_weights(model), _single_class_sites(seed, 16, (4, 7, 12))


def _summed_gradient(model, weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The cross-entropy gradient summed over the images ``x`` (uint8) at ``weights``, flat."""
    import keras
    import tensorflow as tf

    training.load_flat_weights(model, weights)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
            y, model(x.astype(np.float32) / 255.0, training=True)))
    return np.concatenate([np.asarray(g).ravel() for g in tape.gradient(total, [v.value for v in model.weights])])


def test_fedsgd_poisson_sampling_gives_the_unions_sum_over_its_expected_batch():
    """``sample_rate`` q: each hospital draws every image with probability q and steps by its
    batch's summed gradient over q x its image count, so the sample-weighted average minus
    the base is minus the summed gradient of every image drawn anywhere over q x all images,
    as a central Poisson-sampled batch would give; a hospital that draws nothing uploads the
    base unchanged and still counts with its images (it drew none of them)."""
    q = 0.4
    params, model, base, sites = _fedsgd_case(8, sample_rate=q)
    # hospital 0's seed draws none of its 4 images; the others draw some but not all
    seeds = [next(s for s in range(1000) if not (np.random.default_rng(s).random(4) < q).any()), 11, 12]
    drawn = [np.flatnonzero(np.random.default_rng(s).random(d.n_train) < q) for s, d in zip(seeds, sites)]
    assert drawn[0].size == 0 and all(0 < d.size < s.n_train for d, s in zip(drawn[1:], sites[1:]))
    strategy, state, uploads = strategies.make(params), strategies.ServerState(model=base), []
    for seed, data in zip(seeds, sites):
        training.load_flat_weights(model, base)
        training.train_local(model, data, params, rng=np.random.default_rng(seed))
        uploads.append((strategy.upload(base, training.flat_weights(model), state), data.n_train))
    assert np.array_equal(uploads[0][0], base)
    average = _Aggregator(encrypted=True).fedavg(uploads)

    y = np.concatenate([s.y_train[d] for s, d in zip(sites, drawn)])
    expected = _summed_gradient(model, base, np.concatenate([s.x_train[d] for s, d in zip(sites, drawn)]), y)
    expected /= q * sum(s.n_train for s in sites)
    assert np.max(np.abs(expected)) > 1e-2
    assert np.allclose(base.astype(np.float64) - average, expected, **FLOAT32_SUMS)
    # the batch's mean gradient instead (the fixed-batch rule) would be off by drawn / expected
    mean_rule = expected * q * sum(s.n_train for s in sites) / y.size
    assert not np.allclose(base.astype(np.float64) - average, mean_rule, rtol=1e-3, atol=1e-5)


def test_sample_rate_is_fedsgds_and_a_probability():
    training.TrainingParams(strategy="fedsgd", sample_rate=0.03)
    with pytest.raises(ValueError, match="sample_rate.*fedsgd only"):
        training.TrainingParams(strategy="fedavg", sample_rate=0.03)
    with pytest.raises(ValueError, match=r"sample_rate.*in \[0, 1\]"):
        training.TrainingParams(strategy="fedsgd", sample_rate=1.5)
    for name, value in (("sample_rate", 0.03), ("shuffle_rounds", 34)):
        with pytest.raises(ValueError, match=f"{name}.*not 'resample'"):
            training.TrainingParams(strategy="fedsgd", balance="resample", **{name: value})


def test_fedsgd_shuffled_epochs_use_every_image_once_and_sum_the_unions_slices():
    """``shuffle_rounds`` R: the rounds of an epoch step on the R slices of each hospital's
    permutation for that epoch, so the epoch uses every image exactly once; each round's
    encrypted average is the base minus R / N times the summed gradient over the union of
    that round's slices; the next epoch draws another permutation."""
    R = 3
    params, model, base, sites = _fedsgd_case(9, shuffle_rounds=R)
    n_all = sum(s.n_train for s in sites)

    def epoch_rng(h):
        return lambda e: np.random.default_rng([42, e, h])

    strategy, state = strategies.make(params), strategies.ServerState(model=base)
    used = [[] for _ in sites]
    for round_no in (R, R + 1, R + 2):  # epoch 1, slots 0, 1, 2
        uploads, xs, ys = [], [], []
        for h, data in enumerate(sites):
            training.load_flat_weights(model, base)
            training.train_local(model, data, params, round_seed=round_no, epoch_rng=epoch_rng(h))
            uploads.append((strategy.upload(base, training.flat_weights(model), state), data.n_train))
            order = epoch_rng(h)(1).permutation(data.n_train)
            idx = order[(round_no - R) * data.n_train // R:(round_no - R + 1) * data.n_train // R]
            used[h].extend(idx.tolist())
            xs.append(data.x_train[idx])
            ys.append(data.y_train[idx])
        average = _Aggregator(encrypted=True).fedavg(uploads)
        expected = _summed_gradient(model, base, np.concatenate(xs), np.concatenate(ys)) * R / n_all
        assert np.max(np.abs(expected)) > 1e-2
        assert np.allclose(base.astype(np.float64) - average, expected, **FLOAT32_SUMS)
    assert [sorted(u) for u in used] == [list(range(s.n_train)) for s in sites]  # each image once
    # epoch 2's first round steps on another permutation's first slice than epoch 1's
    firsts = []
    for round_no in (R, 2 * R):
        training.load_flat_weights(model, base)
        training.train_local(model, sites[2], params, round_seed=round_no, epoch_rng=epoch_rng(2))
        firsts.append(training.flat_weights(model))
    assert np.max(np.abs(firsts[0] - firsts[1])) > 1e-4
    with pytest.raises(ValueError, match="shuffle_rounds.*not with sample_rate"):
        training.TrainingParams(strategy="fedsgd", shuffle_rounds=3, sample_rate=0.1)
    with pytest.raises(ValueError, match="shuffle_rounds.*fedsgd only"):
        training.TrainingParams(strategy="fedavg", shuffle_rounds=3)
