"""Where a round lives in the object store, and the aggregator's durable record of it.

Layout (``<r>`` is the round number, zero-padded so keys sort by round):

- ``keys/public-context``: the public CKKS context (no secret key)
- ``rounds/<r>/round``: the round record (the ``round_start`` message, JSON)
- ``rounds/<r>/base``: round 1 only: the plaintext initial model (float32 ``.npy``)
- ``rounds/<r>/updates/<hospital>``: a hospital's encrypted, sample-weighted update
- ``rounds/<r>/updates/<hospital>.msg``: the ``update_ready`` message for it, so a hospital
  restarted after uploading republishes the same update instead of training a different one
- ``rounds/<r>/updates/<hospital>.refused``: what that hospital refused in the round, and why
  (a ``round_start`` it would not take part in, an aggregate it would not decrypt)
- ``rounds/<r>/state``: the aggregator's record (accepted and refused updates, outcome)
- ``rounds/<r>/aggregate``: the encrypted sum of the accepted updates
- ``rounds/<r>/evaluations/<hospital>``: the round's global model's metrics on that
  hospital's validation split (plaintext figures, as in ``update_ready``; for reports)
- ``hospitals/<hospital>/refusals``: messages the hospital refused that its round records do
  not hold (forged, undecodable, or naming a round or object they should not), the last 200
- ``aggregator/refusals``: the same for the aggregator, the last 500
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from . import messages
from .storage.base import ObjectNotFound, ObjectStore, PreconditionFailed

OPEN, COMPLETE, ABORTED = "open", "complete", "aborted"
# shown for a claimed round the aggregator holds no record of: before its deadline it may
# still be picked up (STARTED); after it, nothing will ever sum it (ABANDONED)
STARTED, ABANDONED = "started", "abandoned"
_ROUND_KEY = re.compile(r"^rounds/(\d+)/round$")


UNROUTED_REFUSALS_KEY = "aggregator/refusals"  # refusals that belong to no open round


def round_prefix(round_no: int) -> str:
    return f"rounds/{round_no:06d}"


def round_key(round_no: int) -> str:
    return f"{round_prefix(round_no)}/round"


def base_key(round_no: int) -> str:
    return f"{round_prefix(round_no)}/base"


def update_key(round_no: int, hospital: str) -> str:
    return updates_prefix(round_no) + hospital


def updates_prefix(round_no: int) -> str:
    return f"{round_prefix(round_no)}/updates/"


def update_message_key(round_no: int, hospital: str) -> str:
    return update_key(round_no, hospital) + ".msg"


def evaluation_key(round_no: int, hospital: str) -> str:
    return f"{round_prefix(round_no)}/evaluations/{hospital}"


def hospital_refusals_key(round_no: int, hospital: str) -> str:
    return update_key(round_no, hospital) + ".refused"


def append_refusal(store: ObjectStore, key: str, entry: dict, keep: int) -> None:
    """Add ``entry`` to the refusal list at ``key``, keeping its last ``keep`` entries (a flood
    of refused messages costs bounded space). One writer per key."""
    kept = read_json(store, key) or {"refused": []}
    kept["refused"] = (kept["refused"] + [entry])[-keep:]
    write_json(store, key, kept)


def _refusals_under(store: ObjectStore, prefix: str, suffix: str) -> list[dict]:
    """The entries of every refusal list whose key starts with ``prefix`` and ends with
    ``suffix``, oldest first."""
    found = []
    for key in store.list(prefix):
        if key.endswith(suffix):
            found += (read_json(store, key) or {}).get("refused", [])
    return sorted(found, key=lambda entry: entry.get("at", 0))


def record_hospital_refusal(store: ObjectStore, round_no: int, hospital: str, message: str,
                            reason: str, at: float) -> None:
    """Add a hospital's refusal to its own record of the round (only it writes there)."""
    append_refusal(store, hospital_refusals_key(round_no, hospital),
                   {"hospital": hospital, "message": message, "reason": reason, "at": at, "by": "hospital"},
                   keep=50)


HOSPITAL_UNROUTED_KEPT = 200  # per hospital: a flood of forged messages costs bounded space


def hospital_unrouted_key(hospital: str) -> str:
    return f"hospitals/{hospital}/refusals"


def record_hospital_unrouted(store: ObjectStore, hospital: str, entry: dict) -> None:
    """Keep a message the hospital refused outside its round records (one whose signature,
    sender or role did not check out, one that did not decode, one naming a round or object
    it should not): ``cxr-mq status`` lists it under the round it claims. Only the hospital
    writes there; nothing in ``entry`` but the hospital's own reason is trusted."""
    append_refusal(store, hospital_unrouted_key(hospital), {**entry, "hospital": hospital, "by": "hospital"},
                   keep=HOSPITAL_UNROUTED_KEPT)


def hospital_unrouted_refusals(store: ObjectStore) -> list[dict]:
    """Every hospital's refusals kept outside round records, oldest first."""
    return _refusals_under(store, "hospitals/", "/refusals")


def hospital_refusals(store: ObjectStore, round_no: int) -> list[dict]:
    """Every hospital's refusals in a round, oldest first."""
    return _refusals_under(store, f"{round_prefix(round_no)}/updates/", ".refused")


def state_key(round_no: int) -> str:
    return f"{round_prefix(round_no)}/state"


def aggregate_key(round_no: int) -> str:
    return f"{round_prefix(round_no)}/aggregate"


def list_rounds(store: ObjectStore) -> list[int]:
    numbers = []
    for key in store.list("rounds/"):
        match = _ROUND_KEY.match(key)
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def read_json(store: ObjectStore, key: str) -> dict | None:
    try:
        return json.loads(store.get_bytes(key))
    except ObjectNotFound:
        return None


def write_json(store: ObjectStore, key: str, value: dict, **condition):
    """``condition``: ``if_none_match=True`` or ``if_match=<etag>`` (see ``put_bytes``)."""
    return store.put_bytes(key, json.dumps(value, sort_keys=True, indent=1).encode(), **condition)


def shown_status(record: dict | None, state: "RoundState | None", now: float) -> tuple[str, str | None]:
    """A round's status and reason as ``status``, ``watch`` and ``history`` show them: the
    aggregator's record when there is one. A round record without one is a claimed number
    whose ``round_start`` no aggregator has handled: ``started`` until its deadline,
    ``abandoned`` after it (the controller stopped between claiming the number and publishing,
    or no aggregator ran; one that handles it later aborts it, the deadline having passed)."""
    if state is not None:
        return state.status, state.reason
    deadline = (record or {}).get("deadline")
    if deadline is not None and now > deadline:
        return ABANDONED, ("no aggregator record by the round's deadline: round_start was "
                           "never handled (the controller stopped after claiming the number, "
                           "before publishing, or no aggregator was running)")
    return STARTED, None


class StateConflict(PreconditionFailed):
    """Another aggregator wrote this round's record since this one read it."""


@dataclass
class RoundState:
    """The aggregator's durable record of one round; written before any message is acked."""

    round: int
    quorum: int
    min_clients: int
    deadline: float
    n_params: int
    key_fingerprint: str
    hospitals: list[str] = field(default_factory=list)
    max_contributors: int | None = None  # None (older records): the quorum
    status: str = OPEN
    accepted: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    opened_at: float = 0.0
    finished_at: float | None = None
    reason: str | None = None
    model_key: str | None = None
    model_sha256: str | None = None
    total_samples: int = 0
    announced: bool = False
    updates_deleted: bool = False  # retention done: the individual updates are gone
    timings: dict = field(default_factory=dict)
    # the stored version this state was read as or written to (not persisted)
    etag: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_round_start(cls, msg: dict, now: float) -> "RoundState":
        return cls(round=msg["round"], quorum=msg["quorum"], min_clients=msg["min_clients"],
                   deadline=msg["deadline"], n_params=msg["n_params"],
                   key_fingerprint=msg["key_fingerprint"], hospitals=list(msg.get("hospitals", [])),
                   max_contributors=msg.get("max_contributors"), opened_at=now)

    @classmethod
    def from_dict(cls, data: dict) -> "RoundState":
        return cls(**data)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("etag")
        return data

    @property
    def most_contributors(self) -> int:
        """The most updates this round's sum may take (it closes at its quorum anyway)."""
        return self.max_contributors or self.quorum

    def accepted_from(self, hospital: str) -> dict | None:
        return next((a for a in self.accepted if a["hospital"] == hospital), None)

    @property
    def contributors(self) -> list[str]:
        return sorted(a["hospital"] for a in self.accepted)

    def outcome_message(self) -> dict:
        """The ``model_ready`` (complete) or ``round_aborted`` message for a finished round."""
        if self.status == COMPLETE:
            return messages.make(
                "model_ready", round=self.round, key=self.model_key, sha256=self.model_sha256,
                contributors=self.contributors, total_samples=self.total_samples,
                n_params=self.n_params, key_fingerprint=self.key_fingerprint,
                metrics={a["hospital"]: a.get("metrics", {}) for a in self.accepted},
                finished_at=self.finished_at)
        if self.status == ABORTED:
            return messages.make("round_aborted", round=self.round, reason=self.reason,
                                 contributors=self.contributors, finished_at=self.finished_at)
        raise ValueError(f"round {self.round} is {self.status}: no outcome yet")

    def save(self, store: ObjectStore) -> None:
        """Write the record only over the version this process read or wrote last (a new one
        only if none exists): two aggregators can never both move one round on from the
        same state. The loser gets :class:`StateConflict` and must re-read."""
        condition = {"if_match": self.etag} if self.etag else {"if_none_match": True}
        try:
            info = write_json(store, state_key(self.round), self.to_dict(), **condition)
        except PreconditionFailed as exc:
            raise StateConflict(f"round {self.round}: {exc}") from None
        self.etag = info.etag

    @classmethod
    def load(cls, store: ObjectStore, round_no: int) -> "RoundState | None":
        try:
            body, etag = store.get_versioned(state_key(round_no))
        except ObjectNotFound:
            return None
        state = cls.from_dict(json.loads(body))
        state.etag = etag
        return state
