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
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from . import messages
from .storage.base import ObjectNotFound, ObjectStore, PreconditionFailed

OPEN, COMPLETE, ABORTED = "open", "complete", "aborted"
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


def record_hospital_refusal(store: ObjectStore, round_no: int, hospital: str, message: str,
                            reason: str, at: float) -> None:
    """Add a hospital's refusal to its own record of the round (only it writes there)."""
    key = hospital_refusals_key(round_no, hospital)
    kept = read_json(store, key) or {"refused": []}
    kept["refused"] = kept["refused"][-49:] + [{"hospital": hospital, "message": message,
                                                "reason": reason, "at": at, "by": "hospital"}]
    write_json(store, key, kept)


def hospital_refusals(store: ObjectStore, round_no: int) -> list[dict]:
    """Every hospital's refusals in a round, oldest first."""
    found = []
    for key in store.list(f"{round_prefix(round_no)}/updates/"):
        if key.endswith(".refused"):
            found += (read_json(store, key) or {}).get("refused", [])
    return sorted(found, key=lambda entry: entry.get("at", 0))


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
