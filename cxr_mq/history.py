"""What a federation's store says happened, round by round: the input of ``cxr-mq report``.

Everything here is read from objects the federation writes anyway, holding no key:

- the round record (``rounds/<r>/round``: training parameters, quorum, when it was opened);
- the aggregator's state (``rounds/<r>/state``): the updates it accepted, each with the
  ``update_ready`` metrics of its hospital (``train``: the last local epoch's loss and
  accuracy; ``global``: the previous round's global model on the hospital's validation
  split; ``timings``: train, encrypt and upload seconds), the refusals with their reasons,
  and its own aggregate and finalize seconds;
- the hospitals' own refusals (``rounds/<r>/updates/<h>.refused``: a ``round_start`` or an
  aggregate a hospital would not take), listed with the aggregator's, ``by`` saying whose;
- the hospitals' evaluation records (``rounds/<r>/evaluations/<hospital>``): round r's global
  model on each hospital's validation split, written after ``model_ready``.

A round's global model is judged on the hospitals' validation splits. ``overall`` pools the
hospitals' confusion matrices, so accuracy, sensitivity and PPV are those of all validation
images together; AUC cannot be pooled from matrices, so the overall AUC is the hospitals'
AUCs weighted by their validation sizes (``auc_pooling`` says so in the report).
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import messages, metrics, rounds
from .rounds import RoundState
from .storage.base import ObjectStore

AUC_POOLING = "mean of the hospitals' AUCs weighted by validation size"
_RANGE = re.compile(r"^\s*(\d*)\s*(?:\.\.\s*(\d*))?\s*$")


@dataclass
class RoundHistory:
    """One round as the report shows it. The field names the demo's rows share (contributors,
    metrics, bytes_uploaded, *_seconds) mean the same thing there."""

    round: int
    status: str
    contributors: list[str]
    refused: list[dict]
    total_samples: int
    metrics: dict                     # the round's global model, pooled over hospitals
    per_hospital: dict                # hospital -> metrics of the global model on its split
    train: dict                       # hospital -> last local epoch's loss and accuracy
    bytes_uploaded: int
    train_seconds: float              # summed over contributing hospitals
    encrypt_seconds: float
    upload_seconds: float
    aggregate_seconds: float          # the aggregator's sum and finalize
    wall_seconds: float               # round latency: opened to finished
    hospital_timings: dict = field(default_factory=dict)
    model: str | None = None
    codec_profile: str | None = None


def parse_rounds(text: str | None) -> tuple[int | None, int | None]:
    """``A..B``, ``A..``, ``..B`` or ``N`` into inclusive bounds (None: open)."""
    if text is None:
        return None, None
    match = _RANGE.match(text)
    if not match or not (match.group(1) or match.group(2)):
        raise ValueError(f"--rounds must look like A..B, A.., ..B or N, got {text!r}")
    low = int(match.group(1)) if match.group(1) else None
    high = int(match.group(2)) if match.group(2) else None
    if ".." not in text:  # a single round number
        high = low
    if low is not None and high is not None and low > high:
        raise ValueError(f"--rounds {text}: the first round is after the last")
    return low, high


def pooled_metrics(per_hospital: dict) -> dict:
    """One report over all hospitals' validation images (see the module docstring)."""
    reports = [m for m in per_hospital.values() if m.get("confusion_matrix")]
    if not reports:
        return {}
    classes = reports[0]["classes"]
    matrix = sum(np.asarray(m["confusion_matrix"], dtype=np.int64) for m in reports
                 if m.get("classes") == classes)
    pooled = metrics.report_from_matrix(matrix, classes)
    with_auc = [(m["auc"], m.get("n") or 0) for m in reports if m.get("auc") is not None]
    weight = sum(n for _, n in with_auc)
    pooled["auc"] = (float(sum(a * n for a, n in with_auc) / weight) if weight
                     else (float(np.mean([a for a, _ in with_auc])) if with_auc else None))
    pooled["auc_pooling"] = AUC_POOLING
    pooled["hospitals"] = len(reports)
    return pooled


def _global_metrics(store: ObjectStore, round_no: int, next_state: RoundState | None) -> dict:
    """Round ``round_no``'s global model per hospital: the evaluation records, completed by
    what the next round's update_ready messages carried."""
    found = {}
    prefix = rounds.evaluation_key(round_no, "")
    for key in store.list(prefix):
        record = rounds.read_json(store, key) or {}
        if record.get("metrics"):
            found[record.get("hospital") or key[len(prefix):]] = record["metrics"]
    for accepted in (next_state.accepted if next_state else []):
        carried = (accepted.get("metrics") or {}).get("global") or {}
        if carried.get("round") == round_no and accepted["hospital"] not in found:
            found[accepted["hospital"]] = carried
    return dict(sorted(found.items()))


def _update_message(store: ObjectStore, round_no: int, hospital: str) -> dict:
    try:
        return messages.decode(store.get_bytes(rounds.update_message_key(round_no, hospital)))
    except Exception:  # noqa: BLE001 - the state's copy of the metrics is enough
        return {}


def collect(store: ObjectStore, low: int | None = None, high: int | None = None) -> list[RoundHistory]:
    """The rounds from ``low`` to ``high`` (inclusive; None: from the first / to the last)."""
    numbers = [r for r in rounds.list_rounds(store)
               if (low is None or r >= low) and (high is None or r <= high)]
    states: dict[int, RoundState | None] = {}

    def state(r):
        if r not in states:
            states[r] = RoundState.load(store, r)
        return states[r]

    out = []
    for round_no in numbers:
        record = rounds.read_json(store, rounds.round_key(round_no)) or {}
        current = state(round_no)
        per_hospital = _global_metrics(store, round_no, state(round_no + 1))
        accepted = current.accepted if current else []
        timings, train = {}, {}
        for a in accepted:
            carried = a.get("metrics") or _update_message(store, round_no, a["hospital"]).get("metrics", {})
            timings[a["hospital"]] = carried.get("timings") or {}
            train[a["hospital"]] = carried.get("train") or {}
        issued = record.get("issued_at") or (current.opened_at if current else None)
        finished = current.finished_at if current else None
        own = current.timings if current else {}
        out.append(RoundHistory(
            round=round_no, status=rounds.shown_status(record, current, time.time())[0],
            contributors=current.contributors if current else [],
            refused=[{"hospital": r.get("hospital"), "reason": r.get("reason"), "by": "aggregator"}
                     for r in (current.refused if current else [])]
            + [{"hospital": r.get("hospital"), "reason": r.get("reason"), "by": "hospital"}
               for r in rounds.hospital_refusals(store, round_no)],
            total_samples=current.total_samples if current else 0,
            metrics=pooled_metrics(per_hospital), per_hospital=per_hospital, train=train,
            bytes_uploaded=int(sum(a.get("size", 0) for a in accepted)),
            train_seconds=_total(timings, "train_seconds"),
            encrypt_seconds=_total(timings, "encrypt_seconds"),
            upload_seconds=_total(timings, "upload_seconds"),
            aggregate_seconds=float(own.get("aggregate_seconds", 0.0) + own.get("finalize_seconds", 0.0)),
            wall_seconds=float(finished - issued) if finished is not None and issued else 0.0,
            hospital_timings=timings,
            model=(record.get("training") or {}).get("model"),
            codec_profile=record.get("codec_profile")))
    return out


def _total(timings: dict, key: str) -> float:
    return float(sum(t.get(key, 0.0) for t in timings.values()))


def as_dict(history: RoundHistory) -> dict:
    return asdict(history)
