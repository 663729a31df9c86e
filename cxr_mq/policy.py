"""The aggregator's policy as one readable object, after Flower's ``Strategy``.

``RoundPolicy`` answers the three questions the aggregator asks: should this update be
refused (and why), how much does it weigh, and is the round finished (complete or aborted)?
FedAvg weighs each update by its sample count; hospitals pre-multiply their weights by it
before encryption, so the aggregator's sum is already the weighted sum.
"""
from __future__ import annotations

from .rounds import ABORTED, COMPLETE, OPEN, RoundState, update_key


class RoundPolicy:
    """FedAvg with a quorum, a deadline and a minimum number of contributors."""

    def refuse_reason(self, state: RoundState | None, update: dict, now: float) -> str | None:
        hospital = update["hospital"]
        if state is None:
            return f"unknown round {update['round']}"
        if state.status != OPEN:
            return f"round {state.round} is closed ({state.status})"
        if now > state.deadline:
            return f"round {state.round} deadline has passed"
        if state.hospitals and hospital not in state.hospitals:
            return f"unknown sender {hospital!r}: not a participant of round {state.round}"
        if update["key"] != update_key(state.round, hospital):
            return (f"wrong object key {update['key']!r}: hospital {hospital!r}'s update for round "
                    f"{state.round} lives only at {update_key(state.round, hospital)!r}")
        if update["key_fingerprint"] != state.key_fingerprint:
            return (f"key fingerprint mismatch: update has {update['key_fingerprint'][:16]}…, "
                    f"round uses {state.key_fingerprint[:16]}…")
        if update["n_params"] != state.n_params:
            return f"wrong shape: update has {update['n_params']} parameters, model has {state.n_params}"
        starts = {a["start_sha256"] for a in state.accepted if a.get("start_sha256")}
        if update.get("start_sha256") and starts and update["start_sha256"] not in starts:
            return (f"diverged base model: {hospital!r} trained from {update['start_sha256'][:16]}…, "
                    f"the round's other contributors from {sorted(starts)[0][:16]}… (a hospital "
                    f"whose strategy state differs; see docs/model-quality.md)")
        previous = state.accepted_from(hospital)
        if previous is not None and previous["sha256"] != update["sha256"]:
            return f"duplicate hospital {hospital!r} with different content"
        if len(state.accepted) >= state.most_contributors:
            return (f"round {state.round} takes at most {state.most_contributors} contributors: "
                    "one more could make the sum wrap")
        return None

    def is_duplicate(self, state: RoundState, update: dict) -> bool:
        previous = state.accepted_from(update["hospital"])
        return previous is not None and previous["sha256"] == update["sha256"]

    def weight(self, update: dict) -> int:
        return update["n_samples"]

    def outcome(self, state: RoundState, now: float) -> str | None:
        """COMPLETE at quorum, or at the deadline with at least the minimum; ABORTED at the
        deadline below it; None while the round should keep waiting."""
        if state.status != OPEN:
            return None
        accepted = len(state.accepted)
        if accepted >= state.quorum:
            return COMPLETE
        if now >= state.deadline:
            return COMPLETE if accepted >= state.min_clients else ABORTED
        return None

    def abort_reason(self, state: RoundState) -> str:
        return (f"deadline passed with {len(state.accepted)} update(s), "
                f"fewer than the minimum of {state.min_clients}")
