"""What a hospital does with a round: build the named model, load the global weights, train
on local data, evaluate on the local validation split. The interface the workers use.
"""

from __future__ import annotations

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
    "LocalData", "DataError", "train_local", "data_gradient", "evaluate", "predict_proba", "extrapolate",
]

BALANCE_MODES = ("none", "weights", "resample")


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
                         ("batch_size", 1), ("seed", 0), ("depth", 1), ("local_steps", 0)):
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
        if not isinstance(self.augment, bool):
            bad("augment", "must be a boolean")

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

    def loss(self, y_true, y_pred):
        import keras
        import tensorflow as tf

        data = keras.losses.sparse_categorical_crossentropy(y_true, y_pred)
        prox = tf.add_n([tf.reduce_sum(tf.square(w.value - a)) for w, a in zip(self.trainable, self.anchor)])
        linear = tf.add_n([tf.reduce_sum(w.value * c) for w, c in zip(self.trainable, self.correction)])
        # per sample, so the mean over the batch adds the terms once
        return data + 0.5 * self.mu * prox + linear


def _compile(model, lr: float, objective: LocalObjective | None = None) -> None:
    """Give the model a fresh Adam (the FedAvg client step starts without optimizer state).

    Tracing the training step takes seconds, so a model compiled here before keeps its
    compiled step and only has its Adam state zeroed and its learning rate set. With an
    active ``objective`` the loss carries its terms (compiled once per model, then assigned).
    """
    import keras

    wants_terms = objective is not None and objective.active
    terms = getattr(model, "_cxr_mq_terms", None)
    if (getattr(model, "_cxr_mq_compiled", False) and model.optimizer is not None
            and (terms is not None or not wants_terms)):
        for var in model.optimizer.variables:
            if var.path.endswith("learning_rate"):
                var.assign(lr)
            else:
                var.assign(np.zeros(var.shape, dtype=var.dtype))
        if terms is not None:
            terms.set(objective or LocalObjective())
        return
    if wants_terms:
        terms = _ObjectiveTerms(model)
        terms.set(objective)
        object.__setattr__(model, "_cxr_mq_terms", terms)  # not a tracked layer attribute
    model.compile(
        # clipping: a long run at a high rate once collapsed covidnet-s to a constant output
        optimizer=keras.optimizers.Adam(learning_rate=lr, clipnorm=1.0),
        loss=terms.loss if wants_terms else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model._cxr_mq_compiled = True


def data_gradient(model, data: LocalData, batch_size: int = 64) -> np.ndarray:
    """The mean gradient of the data loss over the local training split at the model's
    current weights, in ``flat_weights`` order (zeros for non-trainable weights): SCAFFOLD's
    option-I control variate."""
    import keras
    import tensorflow as tf

    sums = [np.zeros(v.shape, np.float64) for v in model.weights]
    trainable = [i for i, v in enumerate(model.weights) if v.trainable]
    for start in range(0, data.n_train, batch_size):
        x = np.asarray(data.x_train[start:start + batch_size])
        x = (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)
        if x.ndim == 3:
            x = x[..., None]
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
) -> dict:
    """Train ``params.epochs`` epochs on the local training split with a fresh optimizer (the
    FedAvg client step). Returns the last epoch's {"loss", "accuracy"} as floats.

    ``round_seed`` varies shuffling and augmentation between rounds deterministically.
    ``lr`` overrides ``params.lr`` (a server-side schedule across rounds); with ``lr_end`` the
    rate decays from ``lr`` to ``lr_end`` along a cosine over this call's steps.
    ``objective``: the strategy's extra loss terms (FedProx, SCAFFOLD).
    """
    if data.n_train == 0:
        raise DataError("no training samples")
    if data.image_size != params.image_size or data.classes != class_names(params.classes):
        raise ValueError(
            f"data was prepared for {data.image_size}px {data.classes} but params ask for "
            f"{params.image_size}px {class_names(params.classes)}"
        )
    seed = int(params.seed) * 1_000_003 + int(round_seed)
    ds = make_dataset(
        data.x_train, data.y_train, batch_size=params.batch_size, training=True, seed=seed,
        augment=params.augment, resample=params.balance == "resample",
        repeat=params.local_steps > 0,
    )
    weights = None
    if params.balance == "weights":
        weights = class_weights(data.y_train, len(data.classes))
    start_lr = params.lr if lr is None else float(lr)
    _compile(model, start_lr, objective)
    callbacks = list(callbacks or [])
    if lr_end is not None:
        steps = params.epochs * (params.local_steps or int(np.ceil(data.n_train / params.batch_size)))
        callbacks.append(_cosine_callback(start_lr, float(lr_end), steps))
    history = model.fit(ds, epochs=params.epochs, steps_per_epoch=params.local_steps or None,
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
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[..., None]
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
