"""What a hospital does with a round: build the named model, load the global weights, train
on local data, evaluate on the local validation split. The interface the workers use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import metrics
from .data import CLASS_SETS, DataError, LocalData, class_names, class_weights, make_dataset
from .model import MIN_IMAGE_SIZE, MODELS
from .model import build as _build
from .model import flat_weights, load_flat_weights
from .strategies import STRATEGIES, LocalObjective

__all__ = [
    "TrainingParams", "class_names", "build_model", "flat_weights", "load_flat_weights",
    "LocalData", "DataError", "train_local", "sgd_steps", "data_gradient", "evaluate", "predict_proba", "extrapolate",
]

BALANCE_MODES = ("none", "weights", "resample")
LOCAL_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainingParams:
    model: str = "small-cnn"  # name; every hospital builds the same graph from it
    image_size: int = 64
    classes: str = "binary"  # "binary" (negative/positive) or "3class" (normal/pneumonia/COVID-19)
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    width: float = 1.0  # channel multiplier (covidnet-s, small-cnn, mobilenetv2 alpha)
    depth: int = 1  # module-count multiplier (covidnet-s, small-cnn)
    augment: bool = True  # COVID-Net's training augmentation
    balance: str = "weights"  # "none", "weights" (class weights) or "resample" (balanced batches)
    # >0: every hospital takes this many steps per epoch whatever its size (FedAvg then weighs
    # hospitals by sample count alone, not count x steps); 0: one pass over the local data
    local_steps: int = 0
    # the server learning rate of FedAvg: the new global model is base + server_lr * (mean
    # of the hospitals' models - base). The aggregator only adds ciphertexts, so each
    # hospital applies it to its own update before encrypting (see extrapolate()); 1 is FedAvg
    server_lr: float = 1.0
    # the federated strategy (cxr_mq/strategies.py) and its parameters
    strategy: str = "fedavg"
    prox_mu: float = 0.01  # fedprox: weight of mu/2 ||w - base||^2
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam, fedyogi
    beta2: float = 0.99
    tau: float = 1e-3
    # fedadam, fedyogi, fedsgd: Adam's bias correction of the server step (the rate times
    # sqrt(1 - beta2^t) / (1 - beta1^t) at server step t), as central Adam takes it
    bias_correction: bool = False
    # fedavgm, fedadam, fedyogi, fedsgd: clip the pseudo-gradient (decrypted average - base)
    # per tensor at this L2 norm before the server step, as central Adam's clipnorm 1 does to
    # each gradient; 0: off
    server_clipnorm: float = 0.0
    # local training's optimizer, fresh every round: "adam" (clipped at norm 1) or "sgd" with
    # ``local_momentum`` (also clipped). SCAFFOLD's correction is in gradient units, which
    # plain SGD applies as is and Adam rescales.
    local_optimizer: str = "adam"
    local_momentum: float = 0.9
    # each local epoch covers this fraction of the local training split (a fresh shuffle every
    # round): with more rounds of fewer steps the total epochs stay those of central training
    epoch_fraction: float = 1.0
    # logit adjustment for label skew (balanced softmax; Menon et al. 2021, as FedLC/FedRS use
    # it in federated learning): local training's loss adds logit_adjust * log(local class
    # prior) to the model's log-probabilities, so a hospital without a class does not teach the
    # shared model that the class is rare; the model itself stays prior-free. 0: off
    logit_adjust: float = 0.0
    # fedsgd: >0 draws each local image into a step's batch independently with this
    # probability (Poisson sampling, as DP-SGD draws) and divides the batch's summed gradient
    # by the expected count, sample_rate x local images; the sample-weighted average over the
    # hospitals is then the union's summed gradient over its expected batch, sample_rate x all
    # images: with sample_rate = B / N each round's union batch is distributed as a central
    # minibatch of B, however the labels are split. 0: a fixed batch of batch_size per hospital
    sample_rate: float = 0.0
    # fedsgd: >0 makes every shuffle_rounds consecutive rounds (round numbers kR .. kR+R-1)
    # one epoch: each hospital permutes its images once per epoch and at the epoch's r-th
    # round steps by the summed gradient of its r-th slice times R over its image count; the
    # union's batch is then about N / R images and every image is used once per epoch, as in
    # central training's shuffled epochs (stratified by hospital). 0: off
    shuffle_rounds: int = 0

    def __post_init__(self):
        self._validate()

    def _validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"training parameter {name!r} {why}, got {getattr(self, name)!r}")

        if self.model not in MODELS:
            bad("model", f"must be one of {', '.join(MODELS)}")
        if self.classes not in CLASS_SETS:
            bad("classes", f"must be one of {', '.join(CLASS_SETS)}")
        if self.balance not in BALANCE_MODES:
            bad("balance", f"must be one of {', '.join(BALANCE_MODES)}")
        for name, lo in (("image_size", MIN_IMAGE_SIZE[self.model]), ("epochs", 1),
                         ("batch_size", 1), ("seed", 0), ("depth", 1), ("local_steps", 0),
                         ("shuffle_rounds", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                bad(name, f"must be an integer >= {lo}")
        if self.image_size > 1024:
            bad("image_size", "must be at most 1024")
        for name, hi in (("lr", 1e3), ("width", 1e3), ("server_lr", 10.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= hi):
                bad(name, f"must be a number in (0, {hi:g}]")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {', '.join(STRATEGIES)}")
        for name, lo, hi in (("prox_mu", 0.0, 1e3), ("server_momentum", 0.0, 1.0),
                             ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0), ("tau", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value < hi or
                                                                                     (name == "tau" and 0 < value <= hi)):
                bad(name, f"must be a number in [{lo:g}, {hi:g})")
        if self.tau <= 0:
            bad("tau", "must be positive")
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            bad("local_optimizer", f"must be one of {', '.join(LOCAL_OPTIMIZERS)}")
        for name, ok, why in (("local_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
                              ("epoch_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
                              ("logit_adjust", lambda v: 0 <= v <= 10, "in [0, 10]"),
                              ("server_clipnorm", lambda v: 0 <= v <= 1e3, "in [0, 1000]"),
                              ("sample_rate", lambda v: 0 <= v <= 1, "in [0, 1]")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                bad(name, f"must be a number {why}")
        for name in ("augment", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a boolean")
        for name in ("sample_rate", "shuffle_rounds"):
            if getattr(self, name) and self.strategy != "fedsgd":
                bad(name, f"applies to fedsgd only (strategy {self.strategy!r})")
        for name in ("sample_rate", "shuffle_rounds"):
            if getattr(self, name) and self.balance == "resample":
                bad(name, "draws every image alike: use balance 'none' or 'weights', not 'resample'")
        if self.shuffle_rounds and (self.sample_rate or self.local_steps > 1):
            bad("shuffle_rounds", "takes one step per round from its own slices: not with sample_rate "
                                  "or local_steps > 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingParams":
        """Build from a message dict: unknown keys are ignored, values validated (ValueError
        naming the field). Integral floats (JSON round trips) are accepted for int fields."""
        if not isinstance(d, dict):
            raise ValueError(f"training parameters must be a mapping, got {type(d).__name__}")
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            if f.type in ("int", int) and isinstance(value, float) and value.is_integer():
                value = int(value)
            if f.type in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kwargs[f.name] = value
        return cls(**kwargs)


def tensor_sizes(model) -> list[int]:
    """The sizes of the model's tensors in ``flat_weights`` order."""
    return [int(np.prod(v.shape)) for v in model.weights]


def build_model(params: TrainingParams):
    """The named model with deterministic initial weights from ``params.seed``."""
    n_classes = len(class_names(params.classes))
    return _build(params.model, params.image_size, n_classes, seed=params.seed,
                  width=params.width, depth=params.depth)


class _ObjectiveTerms:
    """FedProx's and SCAFFOLD's extra loss terms as variables, so one compiled training step
    serves every round and hospital: only the values are assigned (``set``)."""

    def __init__(self, model):
        import tensorflow as tf

        self.model = model
        self.trainable = [v for v in model.weights if v.trainable]
        self.mu = tf.Variable(0.0, trainable=False)
        self.anchor = [tf.Variable(np.zeros(v.shape, np.float32), trainable=False) for v in self.trainable]
        self.correction = [tf.Variable(np.zeros(v.shape, np.float32), trainable=False) for v in self.trainable]
        self.log_prior = tf.Variable(np.zeros(int(model.outputs[0].shape[-1]), np.float32), trainable=False)

    def _split(self, flat: np.ndarray | None) -> list[np.ndarray]:
        """The trainable variables' parts of a vector in ``flat_weights`` order."""
        out, offset = [], 0
        for v in self.model.weights:
            size = int(np.prod(v.shape))
            if v.trainable:
                out.append(np.zeros(v.shape, np.float32) if flat is None
                           else np.asarray(flat[offset:offset + size], np.float32).reshape(v.shape))
            offset += size
        return out

    def set(self, objective: LocalObjective) -> None:
        self.mu.assign(float(objective.mu))
        for var, value in zip(self.anchor, self._split(objective.anchor)):
            var.assign(value)
        for var, value in zip(self.correction, self._split(objective.correction)):
            var.assign(value)
        self.log_prior.assign(np.zeros(self.log_prior.shape, np.float32) if objective.log_prior is None
                              else np.asarray(objective.log_prior, np.float32))

    def loss(self, y_true, y_pred):
        import keras
        import tensorflow as tf

        # cross-entropy of softmax(log p + log_prior): plain cross-entropy when log_prior is 0
        adjusted = tf.math.log(tf.clip_by_value(y_pred, 1e-7, 1.0)) + self.log_prior
        data = keras.losses.sparse_categorical_crossentropy(y_true, adjusted, from_logits=True)
        prox = tf.add_n([tf.reduce_sum(tf.square(w.value - a)) for w, a in zip(self.trainable, self.anchor)])
        linear = tf.add_n([tf.reduce_sum(w.value * c) for w, c in zip(self.trainable, self.correction)])
        # per sample, so the mean over the batch adds the terms once
        return data + 0.5 * self.mu * prox + linear


def _compile(model, lr: float, objective: LocalObjective | None = None, optimizer: str = "adam",
             momentum: float = 0.9) -> None:
    """Give the model a fresh local optimizer (the FedAvg client step starts without optimizer
    state): Adam, or SGD with ``momentum``; both clip the gradient at norm 1.

    Tracing the training step takes seconds, so a model compiled here before with the same
    optimizer keeps its compiled step and only has the optimizer state zeroed and its learning
    rate set. With an active ``objective`` the loss carries its terms (compiled once per model,
    then assigned).
    """
    import keras

    wants_terms = objective is not None and objective.active
    terms = getattr(model, "_cxr_mq_terms", None)
    kind = (optimizer, float(momentum) if optimizer == "sgd" else None)
    if (getattr(model, "_cxr_mq_compiled", None) == kind and model.optimizer is not None
            and (terms is not None or not wants_terms)):
        for var in model.optimizer.variables:
            if var.path.endswith("learning_rate"):
                var.assign(lr)
            else:
                var.assign(np.zeros(var.shape, dtype=var.dtype))
        if terms is not None:
            terms.set(objective or LocalObjective())
        return
    if wants_terms and terms is None:
        terms = _ObjectiveTerms(model)
        object.__setattr__(model, "_cxr_mq_terms", terms)  # not a tracked layer attribute
    if terms is not None:
        terms.set(objective or LocalObjective())
    if optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum, clipnorm=1.0)
    else:
        # clipping: a long run at a high rate once collapsed covidnet-s to a constant output
        opt = keras.optimizers.Adam(learning_rate=lr, clipnorm=1.0)
    model.compile(optimizer=opt, loss=terms.loss if terms is not None else "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model._cxr_mq_compiled = kind


def _model_input(x) -> np.ndarray:
    """A batch of images as the model takes it: float32 in [0, 1] (8-bit pixels divided by
    255), with a channel axis."""
    x = np.asarray(x)
    x = (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    return x[..., None] if x.ndim == 3 else x


def data_gradient(model, data: LocalData, batch_size: int = 64) -> np.ndarray:
    """The mean gradient of the data loss over the local training split at the model's
    current weights, in ``flat_weights`` order (zeros for non-trainable weights): SCAFFOLD's
    option-I control variate."""
    import keras
    import tensorflow as tf

    sums = [np.zeros(v.shape, np.float64) for v in model.weights]
    trainable = [i for i, v in enumerate(model.weights) if v.trainable]
    for start in range(0, data.n_train, batch_size):
        x = _model_input(data.x_train[start:start + batch_size])
        y = np.asarray(data.y_train[start:start + batch_size])
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
        grads = tape.gradient(loss, [model.weights[i].value for i in trainable])
        for i, g in zip(trainable, grads):
            if g is not None:
                sums[i] += np.asarray(g, np.float64)
    return np.concatenate([(s / data.n_train).ravel() for s in sums]).astype(np.float32)


def _cosine_callback(lr: float, lr_end: float, total_steps: int):
    """Per-step cosine decay from ``lr`` to ``lr_end`` over ``total_steps``."""
    import keras

    class CosineDecay(keras.callbacks.Callback):
        step = 0

        def on_train_batch_begin(self, batch, logs=None):
            t = min(self.step / max(total_steps - 1, 1), 1.0)
            self.model.optimizer.learning_rate.assign(lr_end + 0.5 * (lr - lr_end) * (1 + np.cos(np.pi * t)))
            self.step += 1

    return CosineDecay()


def local_log_prior(data: LocalData) -> np.ndarray:
    """log of the local class frequencies, add-one smoothed (a class the hospital lacks gets
    a finite, low prior)."""
    counts = np.bincount(np.asarray(data.y_train, np.int64), minlength=len(data.classes)).astype(np.float64)
    return np.log((counts + 1) / (counts.sum() + len(counts))).astype(np.float32)


def local_steps_per_epoch(params: TrainingParams, n_train: int) -> int | None:
    """Steps of one local epoch: ``local_steps`` if set, else ``epoch_fraction`` of a pass
    over ``n_train`` samples (at least one step); None for a whole pass."""
    if params.local_steps:
        return params.local_steps
    if params.epoch_fraction < 1:
        return max(1, int(np.ceil(params.epoch_fraction * np.ceil(n_train / params.batch_size))))
    return None


def _sgd_step(model):
    """One compiled plain SGD step (no momentum, no clipping) of the mean, optionally
    class-weighted, cross-entropy over a batch; built once per model."""
    step = getattr(model, "_cxr_mq_sgd_step", None)
    if step is not None:
        return step
    import keras
    import tensorflow as tf

    trainable = [v for v in model.weights if v.trainable]

    @tf.function(reduce_retracing=True)
    def step(x, y, sample_weight, lr):
        with tf.GradientTape() as tape:
            proba = model(x, training=True)
            loss = tf.reduce_mean(sample_weight * keras.losses.sparse_categorical_crossentropy(y, proba))
        grads = tape.gradient(loss, [v.value for v in trainable])
        for var, grad in zip(trainable, grads):
            if grad is not None:
                var.assign_sub(lr * grad)
        hits = tf.cast(tf.equal(tf.argmax(proba, axis=-1, output_type=tf.int32), y), tf.float32)
        return loss, tf.reduce_mean(hits)

    object.__setattr__(model, "_cxr_mq_sgd_step", step)
    return step


def sgd_steps(model, data: LocalData, params: TrainingParams, *, round_seed: int = 0,
              lr: float | None = None, rng: np.random.Generator | None = None,
              epoch_rng: Callable[[int], np.random.Generator] | None = None) -> dict:
    """FedSGD's local training: ``params.local_steps`` (0 means 1) plain SGD steps at ``lr``
    (default ``params.lr``), no momentum, no clipping, each on a fresh minibatch of
    ``batch_size`` samples drawn without replacement (all of them if the hospital has fewer).
    With one step at lr 1 the weights move by exactly minus the minibatch's mean gradient.
    With ``sample_rate`` q > 0 each step's batch is Poisson-sampled instead (every image in it
    with probability q, independently) and the step is minus the batch's summed gradient over
    q x the local image count (no step when nothing is drawn). With ``shuffle_rounds`` R the
    step at round ``round_seed`` is on slice ``round_seed mod R`` of the permutation that
    ``epoch_rng(round_seed // R)`` draws (default: seeded by ``params.seed`` and the epoch),
    its summed gradient times R over the image count.
    ``rng`` draws the batches (default: seeded by ``params.seed`` and ``round_seed``).
    ``balance``: "weights" weighs the loss by the local class weights, "resample" draws the
    batch class-balanced (with replacement); both bias the federated gradient under label
    skew, "none" keeps it unbiased. ``augment`` applies COVID-Net's augmentation to the batch.
    Returns the last step's {"loss", "accuracy"} on its batch."""
    import tensorflow as tf

    from .data import _augment_batch

    n = data.n_train
    labels = np.asarray(data.y_train, np.int32)
    rng = np.random.default_rng([int(params.seed), int(round_seed)]) if rng is None else rng
    weights = np.ones(len(data.classes), np.float32)
    if params.balance == "weights":
        cw = class_weights(labels, len(data.classes))
        weights = np.array([cw[c] for c in range(len(data.classes))], np.float32)
    draw_p = None
    if params.balance == "resample":
        counts = np.bincount(labels, minlength=len(data.classes)).astype(np.float64)
        draw_p = 1.0 / counts[labels]
        draw_p /= draw_p.sum()
    step = _sgd_step(model)
    rate = tf.constant(float(params.lr if lr is None else lr), tf.float32)
    batch = min(params.batch_size, n)
    out = {}
    for _ in range(params.local_steps or 1):
        scale = 1.0
        if params.shuffle_rounds:
            epoch, slot = divmod(int(round_seed), params.shuffle_rounds)
            draw = (epoch_rng or (lambda e: np.random.default_rng([int(params.seed), 7, e])))(epoch)
            order = draw.permutation(n)
            idx = order[slot * n // params.shuffle_rounds:(slot + 1) * n // params.shuffle_rounds]
            if idx.size == 0:
                continue  # fewer images than rounds in an epoch: this round takes none of them
            scale = idx.size * params.shuffle_rounds / n  # mean over the slice -> sum x R / n
        elif params.sample_rate:
            idx = np.flatnonzero(rng.random(n) < params.sample_rate)
            if idx.size == 0:
                continue  # nothing drawn: this step adds nothing to the union's sum
            scale = idx.size / (params.sample_rate * n)  # mean over the batch -> sum / expected count
        else:
            idx = (rng.choice(n, batch, replace=True, p=draw_p) if draw_p is not None
                   else rng.choice(n, batch, replace=False))
        x = tf.constant(_model_input(data.x_train[idx]))
        if params.augment:
            x = _augment_batch(x, tf.constant(rng.integers(0, 2**31, 2), tf.int64))
        y = labels[idx]
        loss, acc = step(x, tf.constant(y), tf.constant(weights[y] * np.float32(scale)), rate)
        out = {"loss": float(loss) / scale, "accuracy": float(acc)}
    return out


def train_local(
    model,
    data: LocalData,
    params: TrainingParams,
    *,
    round_seed: int = 0,
    lr: float | None = None,
    lr_end: float | None = None,
    callbacks: list | None = None,
    verbose: int = 0,
    objective: LocalObjective | None = None,
    rng: np.random.Generator | None = None,
    epoch_rng: Callable[[int], np.random.Generator] | None = None,
) -> dict:
    """Train ``params.epochs`` epochs on the local training split with a fresh optimizer (the
    FedAvg client step). Returns the last epoch's {"loss", "accuracy"} as floats.

    ``round_seed`` varies shuffling and augmentation between rounds deterministically.
    ``lr`` overrides ``params.lr`` (a server-side schedule across rounds); with ``lr_end`` the
    rate decays from ``lr`` to ``lr_end`` along a cosine over this call's steps.
    ``objective``: the strategy's extra loss terms (FedProx, SCAFFOLD).
    Under ``fedsgd`` local training is ``sgd_steps`` (``lr`` constant within the round), its
    batches drawn by ``rng`` (default: seeded by ``params.seed`` and ``round_seed``) and, with
    ``shuffle_rounds``, its epochs' permutations by ``epoch_rng(epoch)``.
    """
    if data.n_train == 0:
        raise DataError("no training samples")
    if data.image_size != params.image_size or data.classes != class_names(params.classes):
        raise ValueError(
            f"data was prepared for {data.image_size}px {data.classes} but params ask for "
            f"{params.image_size}px {class_names(params.classes)}"
        )
    if params.strategy == "fedsgd":
        return sgd_steps(model, data, params, round_seed=round_seed, lr=lr, rng=rng, epoch_rng=epoch_rng)
    seed = int(params.seed) * 1_000_003 + int(round_seed)
    steps_per_epoch = local_steps_per_epoch(params, data.n_train)
    ds = make_dataset(
        data.x_train, data.y_train, batch_size=params.batch_size, training=True, seed=seed,
        augment=params.augment, resample=params.balance == "resample",
        repeat=steps_per_epoch is not None,
    )
    weights = None
    if params.balance == "weights":
        weights = class_weights(data.y_train, len(data.classes))
    start_lr = params.lr if lr is None else float(lr)
    if params.logit_adjust > 0:
        objective = dataclasses.replace(objective or LocalObjective(),
                                        log_prior=params.logit_adjust * local_log_prior(data))
    _compile(model, start_lr, objective, params.local_optimizer, params.local_momentum)
    callbacks = list(callbacks or [])
    if lr_end is not None:
        steps = params.epochs * (steps_per_epoch or int(np.ceil(data.n_train / params.batch_size)))
        callbacks.append(_cosine_callback(start_lr, float(lr_end), steps))
    history = model.fit(ds, epochs=params.epochs, steps_per_epoch=steps_per_epoch,
                        class_weight=weights, verbose=verbose, shuffle=False, callbacks=callbacks)
    return {
        "loss": float(history.history["loss"][-1]),
        "accuracy": float(history.history["accuracy"][-1]),
    }


def extrapolate(base: np.ndarray, trained: np.ndarray, server_lr: float) -> np.ndarray:
    """The weights a hospital encrypts: ``base + server_lr * (trained - base)`` (float32).

    FedAvg of these, weighted by sample count, is ``base + server_lr * (FedAvg of the
    trained models - base)``: a server learning rate applied without the aggregator ever
    seeing a model. With ``server_lr`` 1 this is ``trained`` itself.
    """
    if server_lr == 1.0:
        return trained
    base64 = np.asarray(base, dtype=np.float64)
    return (base64 + server_lr * (np.asarray(trained, dtype=np.float64) - base64)).astype(np.float32)


def predict_proba(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, n_classes) for float images in [0,1] (N,S,S,1) or uint8."""
    images = _model_input(images)
    n_classes = int(model.outputs[0].shape[-1])
    if len(images) == 0:
        return np.zeros((0, n_classes), dtype=np.float32)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32)
        out.append(np.asarray(model(batch, training=False)))
    return np.concatenate(out).astype(np.float32)


def evaluate(model, data: LocalData) -> dict:
    """Metrics on the validation split (see cxr_mq.metrics.compute): accuracy, auc,
    per-class sensitivity/ppv, confusion_matrix, n, sensitivity_positive, ppv_positive."""
    proba = predict_proba(model, data.x_val)
    return metrics.compute(data.y_val, proba, data.classes)
