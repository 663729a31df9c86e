"""Keras models chosen by name, so every hospital builds the same graph from a round's
training parameters; and the flat float32 weight vector that gets encrypted.

Inputs are single-channel (S, S, 1) images in [0, 1]; outputs are softmax probabilities.
No pretrained weights are ever loaded.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np


def _keras():
    import keras

    return keras


# Hospitals take few steps per round; BN moving statistics must settle within them.
BN_MOMENTUM = 0.9


def small_cnn(image_size: int, n_classes: int, width: float = 1.0, depth: int = 1, norm: str = "batch"):
    """Three conv blocks and a softmax head: a fast smoke-test model (~25k parameters).
    Registered as ``small-cnn`` (BatchNorm) and ``small-cnn-gn`` (GroupNorm)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32, 64)):
        for j in range(max(1, depth)):
            x = layers.Conv2D(max(4, int(filters * width)), 3, padding="same", use_bias=False,
                              name=f"conv{i}_{j}")(x)
            x = _norm(norm, max(4, int(filters * width)), f"bn{i}_{j}")(x)
            x = layers.ReLU(name=f"relu{i}_{j}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def _norm(kind: str, channels: int, name: str):
    """Batch normalisation, or group normalisation (per-sample statistics: nothing for
    skewed hospitals' batches to bias, no moving statistics to average)."""
    keras = _keras()
    if kind == "batch":
        return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)
    return keras.layers.GroupNormalization(groups=math.gcd(channels, 8), name=name)


def _pepx(x, out_channels: int, stride: int, name: str, expansion: int = 2, norm: str = "batch"):
    """COVID-Net's projection-expansion-projection-extension module: 1x1 projection, 1x1
    expansion, depthwise 3x3, 1x1 projection, 1x1 extension (normalised after the extension)."""
    keras = _keras()
    layers = keras.layers
    proj = max(8, out_channels // 4)
    # He initialisation keeps the signal's scale through four ReLU layers without inner BN
    he = "he_normal"
    y = layers.Conv2D(proj, 1, activation="relu", kernel_initializer=he, name=f"{name}_proj1")(x)
    y = layers.Conv2D(proj * expansion, 1, activation="relu", kernel_initializer=he,
                      name=f"{name}_expand")(y)
    y = layers.DepthwiseConv2D(3, strides=stride, padding="same", activation="relu",
                               depthwise_initializer=he, name=f"{name}_dw")(y)
    y = layers.Conv2D(proj, 1, activation="relu", kernel_initializer=he, name=f"{name}_proj2")(y)
    y = layers.Conv2D(out_channels, 1, use_bias=False, kernel_initializer=he, name=f"{name}_extend")(y)
    return _norm(norm, out_channels, f"{name}_norm")(y)


def covidnet_s(image_size: int, n_classes: int, width: float = 1.0, depth: int = 1, norm: str = "batch"):
    """A CPU-sized COVID-Net: a 7x7 stem, four stages of PEPX modules densely joined by
    additive shortcuts (each module sees the sum of the stage's shortcut and all earlier
    modules' outputs), global pooling and a softmax layer. Registered as ``covidnet-s``
    (``norm="group"``) and ``covidnet-s-bn`` (``norm="batch"``).

    ``width`` scales channels (32/64/128/256 at 1.0, ~0.14M parameters; width 2 and depth 2
    give ~1.05M); ``depth`` multiplies the modules per stage (1/2/3/1 at depth 1, COVID-Net
    used 3/4/6/3).
    """
    keras = _keras()
    layers = keras.layers
    if width <= 0 or depth < 1:
        raise ValueError(f"covidnet-s needs width > 0 and depth >= 1, got {width}, {depth}")
    channels = [max(8, int(round(c * width))) for c in (32, 64, 128, 256)]
    modules = [m * depth for m in (1, 2, 3, 1)]
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = layers.Conv2D(channels[0], 7, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = _norm(norm, channels[0], "stem_norm")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, (c, m) in enumerate(zip(channels, modules)):
        shortcut = layers.Conv2D(c, 1, strides=2, use_bias=False, name=f"s{s}_shortcut")(x)
        shortcut = _norm(norm, c, f"s{s}_shortcut_norm")(shortcut)
        outputs = [shortcut]
        block_in = x
        for i in range(m):
            stride = 2 if i == 0 else 1
            outputs.append(_pepx(block_in, c, stride, name=f"s{s}_pepx{i}", norm=norm))
            block_in = layers.ReLU(name=f"s{s}_relu{i}")(layers.Add(name=f"s{s}_add{i}")(outputs))
        x = block_in
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    # No hidden ReLU layer in the head: on synthetic CXR ~90% of such a layer's units were
    # dead for every image after one epoch at lr 2e-3, and when the rest died the model
    # collapsed to a constant output (AUC 0.5) for good.
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="covidnet_s")


def mobilenetv2(image_size: int, n_classes: int, width: float = 1.0, depth: int = 1):
    keras = _keras()
    return keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 1), alpha=width, weights=None,
        include_top=True, classes=n_classes, classifier_activation="softmax",
    )


def densenet121(image_size: int, n_classes: int, width: float = 1.0, depth: int = 1):
    """CheXNet's backbone, randomly initialised."""
    keras = _keras()
    return keras.applications.DenseNet121(
        input_shape=(image_size, image_size, 1), weights=None,
        include_top=True, classes=n_classes, classifier_activation="softmax",
    )


MODELS: dict[str, Callable] = {
    "small-cnn": small_cnn,
    "small-cnn-gn": functools.partial(small_cnn, norm="group"),
    # GroupNorm by default: per-sample statistics survive FedAvg over class-skewed hospitals
    # (with BatchNorm the federated model trailed the central one by far more; see the notes)
    "covidnet-s": functools.partial(covidnet_s, norm="group"),
    "covidnet-s-bn": covidnet_s,
    "mobilenetv2": mobilenetv2,
    "densenet121": densenet121,
}
MIN_IMAGE_SIZE = {"small-cnn": 8, "small-cnn-gn": 8, "covidnet-s": 32, "covidnet-s-bn": 32, "mobilenetv2": 32, "densenet121": 32}


def build(name: str, image_size: int, n_classes: int, seed: int = 0, width: float = 1.0, depth: int = 1):
    """Build a model by name with deterministic initial weights for ``seed``.

    Keras draws initial weights from its global seed generator, so this reseeds it (and
    numpy/python/TF) first; the same seed gives byte-identical weights in any process.
    """
    keras = _keras()
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    keras.utils.set_random_seed(int(seed))
    model = builder(image_size, n_classes, width=width, depth=depth)
    for layer in model.layers:  # keras.applications use 0.99/0.999
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    return model


def flat_weights(model) -> np.ndarray:
    """All weights (trainable and not, e.g. BN moving statistics) as one float32 vector in
    ``model.weights`` order, which is fixed by the graph."""
    arrays = model.get_weights()
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])


def n_weights(model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


def load_flat_weights(model, flat: np.ndarray) -> None:
    flat = np.asarray(flat).ravel()
    shapes = [tuple(v.shape) for v in model.weights]
    expected = int(sum(int(np.prod(s)) for s in shapes))
    if flat.size != expected:
        raise ValueError(f"flat weight vector has {flat.size} values but the model has {expected}")
    arrays, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        arrays.append(flat[offset:offset + size].astype(np.float32).reshape(shape))
        offset += size
    model.set_weights(arrays)
