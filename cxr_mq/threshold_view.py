"""What the threshold profile's ceremony and committee did, read from the store: for the demo's
live view (``LiveView.add_panel``), its one-line-per-step output without a terminal, and its
report. Everything here is public: which objects exist, and each hospital's recorded outcome.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from rich import box
from rich.table import Table
from rich.text import Text

from . import threshold_flow as flow
from .storage.base import ObjectNotFound, ObjectStore


@dataclass
class CeremonyProgress:
    ceremony_id: str
    parties: tuple[str, ...]
    threshold: int
    dealt: list[str]          # published their signed contribution and sealed shares
    kept: list[str]           # received their committee share and acknowledged it
    fingerprint: str | None   # the collective public key's, once finalized

    def line(self) -> str:
        key = f"collective key {self.fingerprint[:16]}" if self.fingerprint else "collective key pending"
        return (f"key ceremony {self.ceremony_id}: {len(self.dealt)}/{len(self.parties)} hospitals dealt, "
                f"{len(self.kept)}/{len(self.parties)} keep their share; {key}; "
                f"T = {self.threshold} of {len(self.parties)} decrypt")


def ceremony_progress(store: ObjectStore, params, fingerprint: str | None = None) -> CeremonyProgress:
    return CeremonyProgress(params.ceremony_id, tuple(params.parties), params.threshold,
                            flow.dealt(store, params.ceremony_id, params),
                            flow.received(store, params.ceremony_id, params), fingerprint)


def render_ceremony(progress: CeremonyProgress) -> Table:
    table = Table(title=f"key ceremony {progress.ceremony_id}: T = {progress.threshold} of "
                        f"{len(progress.parties)}, collective key "
                        f"{(progress.fingerprint or 'pending')[:16]}",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("hospital", "contribution + sealed shares", "committee share"):
        table.add_column(name, no_wrap=True)
    for party in progress.parties:
        table.add_row(party, _mark(party in progress.dealt, "dealt", "waiting"),
                      _mark(party in progress.kept, "kept", "waiting"))
    return table


@dataclass
class CommitteeRound:
    """One round's committee: the active set, each member's part, each hospital's outcome."""
    round: int
    ready: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)     # active members that answered
    outcomes: dict = field(default_factory=dict)          # hospital -> None (decrypted) or reason

    @property
    def decrypted_by(self) -> list[str]:
        return sorted(h for h, reason in self.outcomes.items() if reason is None)

    def member_state(self, hospital: str) -> str:
        reason = self.outcomes.get(hospital, "")
        if hospital in self.partials:
            return "partial given"
        if hospital in self.active:
            return "refused" if reason and "refus" in reason.lower() else "partial missing"
        return "ready, not needed" if hospital in self.ready else "not ready"

    def result(self) -> str:
        if self.decrypted_by:
            return "check coefficients ok: decrypted"
        refusals = [self.outcomes[h] for h in self.active if self.member_state(h) == "refused"]
        reasons = refusals or sorted({r for r in self.outcomes.values() if r})
        return f"undecryptable: {reasons[0]}" if reasons else "pending"

    def line(self) -> str:
        members = ", ".join(f"{h} {self.member_state(h)}" for h in sorted(set(self.ready) | set(self.active)))
        return (f"round {self.round} committee: active {'+'.join(self.active) or '-'} ({members or 'none ready'}); "
                f"{self.result()} by {len(self.decrypted_by)} hospital(s)")

    def to_dict(self) -> dict:
        return {**asdict(self), "decrypted_by": self.decrypted_by, "result": self.result()}


def committee_round(store: ObjectStore, round_no: int, parties) -> CommitteeRound:
    found = CommitteeRound(round_no)
    for party in parties:
        if store.exists(flow.committee_key(round_no, "ready", party)):
            found.ready.append(party)
        if store.exists(flow.committee_key(round_no, "partials", party)):
            found.partials.append(party)
    try:
        found.active = list(json.loads(store.get_bytes(flow.committee_key(round_no, "active"))))
    except (ObjectNotFound, ValueError):
        pass
    found.outcomes = {h: (None if entry.get("decrypted") else str(entry.get("reason")))
                      for h, entry in flow.outcomes(store, round_no).items()}
    return found


def render_committee(rows: list[CommitteeRound], parties) -> Table:
    table = Table(title="committee: who decrypted each round's key sum", box=box.SIMPLE_HEAD,
                  title_justify="left")
    table.add_column("round", justify="right", no_wrap=True)
    for party in parties:
        table.add_column(party, no_wrap=True)
    table.add_column("result", overflow="fold")
    for row in rows:
        table.add_row(str(row.round), *[_member_text(row.member_state(p)) for p in parties],
                      Text(row.result(), style="green" if row.decrypted_by else "red"))
    return table


def _member_text(state: str) -> Text:
    style = {"partial given": "green", "partial missing": "red", "not ready": "dim"}.get(
        state, "red" if state == "refused" else "dim")
    return Text(state, style=style)


def _mark(done: bool, yes: str, no: str) -> Text:
    return Text(yes, style="green") if done else Text(no, style="dim")
