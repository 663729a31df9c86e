"""Decrypt a round's global model (secret context required) and evaluate or apply it."""
from __future__ import annotations

import io

import numpy as np

from . import rounds, training
from .controller import latest_complete
from .data import DataError
from .rounds import COMPLETE, RoundState
from .storage.base import ObjectStore


def global_model(store: ObjectStore, codec, round_no: int | None = None):
    """(model, training params, round number) of a complete round; the latest by default."""
    state = latest_complete(store) if round_no is None else RoundState.load(store, round_no)
    if state is None:
        raise DataError("no complete round yet" if round_no is None else f"round {round_no}: no such round")
    if state.status != COMPLETE:
        raise DataError(f"round {state.round} is {state.status}, it has no global model")
    record = rounds.read_json(store, rounds.round_key(state.round))
    params = training.TrainingParams.from_dict(record["training"])
    raw = store.get_bytes(state.model_key, sha256=state.model_sha256)
    weights = codec.decrypt_aggregate(io.BytesIO(raw), state.total_samples)
    model = training.build_model(params)
    training.load_flat_weights(model, np.asarray(weights, dtype=np.float32))
    return model, params, state.round


def evaluate_label_file(model, params: training.TrainingParams, label_file, skip_bad=False) -> dict:
    """Metrics of ``model`` on every image of a label file; ``skip_bad`` skips malformed lines,
    missing and unreadable images (with a warning) instead of failing on the first."""
    data = training.LocalData.for_evaluation(label_file, params, skip_bad=skip_bad)
    return training.evaluate(model, data)
