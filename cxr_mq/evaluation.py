"""A round's global model, for ``cxr-mq evaluate`` and ``predict``: the model a hospital holds
(any profile, any strategy), or, for a single-key FedAvg/FedProx round, the aggregate
decrypted with the secret context.

Under the threshold profile nobody holds a key that decrypts an aggregate, and under the
stateful strategies (SCAFFOLD, FedAvgM, FedAdam, FedYogi) the aggregate is not the model
(``[model ; control]``, or the average before the server step). Each hospital keeps the
model it applied, ``<work-dir>/<id>/global.npy``, with ``global.json`` naming the round, the
aggregate it came from and the model's sha256; :func:`hospital_model` checks those against
the round asked for.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from . import rounds, strategies, training
from .controller import latest_complete
from .data import DataError
from .rounds import COMPLETE, RoundState
from .storage.base import ObjectStore

MODEL_FILE, RECORD_FILE = "global.npy", "global.json"
STATE_FILE = "strategy-state.npz"  # the hospital's strategies.ServerState (workers.hospital)


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def save_hospital_model(work_dir, weights: np.ndarray, *, round_no: int, aggregate_sha256: str,
                        key_fingerprint: str, profile: str, strategy: str, at: float) -> None:
    """Keep the model a hospital applied (``global.npy``) and what it is (``global.json``):
    each replaced atomically, the record last, so a record never names a model not yet there."""
    work_dir = Path(work_dir)
    weights = np.asarray(weights, dtype=np.float32)
    _replace(work_dir / MODEL_FILE, lambda fh: np.save(fh, weights, allow_pickle=False))
    record = {"round": int(round_no), "aggregate_sha256": aggregate_sha256, "key_fingerprint": key_fingerprint,
              "profile": profile, "strategy": strategy, "model_sha256": strategies.model_sha256(weights),
              "n_params": int(weights.size), "applied_at": at}
    _replace(work_dir / RECORD_FILE, lambda fh: fh.write(json.dumps(record, indent=1).encode()))


def _round(store: ObjectStore, round_no: int | None) -> tuple[RoundState, dict]:
    state = latest_complete(store) if round_no is None else RoundState.load(store, round_no)
    if state is None:
        raise DataError("no complete round yet" if round_no is None else f"round {round_no}: no such round")
    if state.status != COMPLETE:
        raise DataError(f"round {state.round} is {state.status}, it has no global model")
    return state, rounds.read_json(store, rounds.round_key(state.round))


def hospital_model(store: ObjectStore, work_dir, round_no: int | None = None):
    """(weights, training params, round) of the model a hospital holds in ``work_dir``
    (``<work-dir>/<id>``), which must be the model of ``round_no`` (default: the latest
    complete round): the round's aggregate is the one the hospital's record names."""
    work_dir = Path(work_dir)
    state, record = _round(store, round_no)
    try:
        held = json.loads((work_dir / RECORD_FILE).read_text())
    except FileNotFoundError:
        raise DataError(f"{work_dir / RECORD_FILE}: no model yet (this hospital has applied no round's "
                        "global model; is this its work directory?)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{work_dir / RECORD_FILE}: unreadable model record: {exc}") from None
    if held.get("round") != state.round or held.get("aggregate_sha256") != state.model_sha256:
        raise DataError(
            f"{work_dir / RECORD_FILE}: the hospital holds round {held.get('round')}'s model, not round "
            f"{state.round}'s" + ("" if held.get("round") != state.round else
                                  f" (its aggregate is {str(held.get('aggregate_sha256'))[:16]}…, the round's "
                                  f"{state.model_sha256[:16]}…)")
            + (f"; evaluate --round {held.get('round')}, or wait until it applies round {state.round}"
               if isinstance(held.get("round"), int) else ""))
    try:
        weights = np.load(work_dir / MODEL_FILE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{work_dir / MODEL_FILE}: unreadable model: {exc}") from None
    if strategies.model_sha256(np.asarray(weights, np.float32)) != held.get("model_sha256"):
        raise DataError(f"{work_dir / MODEL_FILE}: not the model its record {RECORD_FILE} names (sha256 differs)")
    return np.asarray(weights, np.float32), training.TrainingParams.from_dict(record["training"]), state.round


def decrypted_model(store: ObjectStore, codec, round_no: int | None = None):
    """(weights, training params, round) from a single-key round's aggregate, decrypted with
    the secret context ``codec``; a threshold or stateful-strategy round is refused with what
    to do instead."""
    state, record = _round(store, round_no)
    params = training.TrainingParams.from_dict(record["training"])
    if record.get("codec_profile") == "threshold":
        raise DataError(f"round {state.round} is a threshold round: no key decrypts its aggregate; "
                        "evaluate the model a hospital holds (--hospital ID)")
    strategy = strategies.make(params)
    if strategy.stateful:
        raise DataError(f"round {state.round} used strategy {strategy.name}: its aggregate is not the model "
                        "(the hospitals take the server step); evaluate the model a hospital holds (--hospital ID)")
    raw = store.get_bytes(state.model_key, sha256=state.model_sha256)
    weights = codec.decrypt_aggregate(io.BytesIO(raw), state.total_samples)
    return np.asarray(weights, dtype=np.float32), params, state.round


def as_model(weights: np.ndarray, params: training.TrainingParams):
    model = training.build_model(params)
    training.load_flat_weights(model, np.asarray(weights, dtype=np.float32))
    return model


def evaluate_label_file(model, params: training.TrainingParams, label_file, skip_bad=False) -> dict:
    """Metrics of ``model`` on every image of a label file; ``skip_bad`` skips malformed lines,
    missing and unreadable images (with a warning) instead of failing on the first."""
    data = training.LocalData.for_evaluation(label_file, params, skip_bad=skip_bad)
    return training.evaluate(model, data)
