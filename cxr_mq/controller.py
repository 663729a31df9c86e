"""The round controller: opens rounds and reports on them. It holds no secret key.

``start_round`` writes the round record, then publishes ``round_start``; with ``wait`` it
listens (on a queue declared before publishing, so nothing is missed) for the round's
``model_ready`` or ``round_aborted``.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np

from . import identity, messages, rounds, strategies, training
from .faults import CrashPoints
from .log import get_logger
from .rounds import ABORTED, COMPLETE, RoundState
from .storage.base import ObjectStore, PreconditionFailed, sha256_bytes
from .transport.base import Broker, TransportError


class RoundTimeout(Exception):
    pass


@dataclass
class RoundRequest:
    quorum: int
    min_clients: int
    deadline_seconds: float
    training: training.TrainingParams
    hospitals: tuple[str, ...] = ()
    synthetic_params: int = 0  # >0: a benchmark round on a synthetic model of this size
    max_samples: int = 100_000  # threshold profile: the sample count that weighs 1 (and the cap)
    weight_bound: float = 8.0  # threshold profile: the largest |weight| an update may carry
    min_clients_floor: int = 3  # settings.min_clients_floor: the smallest min_clients allowed
    max_contributors: int | None = None  # the most updates the aggregate may sum (default: quorum)

    def check(self) -> None:
        """Refuse a round whose aggregate could reveal a hospital's update or wrap."""
        if self.min_clients < self.min_clients_floor:
            raise ValueError(
                f"--min-clients {self.min_clients} is below the floor of {self.min_clients_floor} "
                "(min_clients_floor): an aggregate of so few updates reveals them to the other hospitals")
        if self.min_clients > self.quorum:
            raise ValueError(f"--min-clients ({self.min_clients}) cannot exceed --quorum ({self.quorum})")
        if self.most_contributors < self.quorum:
            raise ValueError(f"max_contributors ({self.max_contributors}) cannot be below --quorum ({self.quorum})")

    @property
    def most_contributors(self) -> int:
        """The round completes at its quorum, so it never sums more than that by default."""
        return self.max_contributors or self.quorum


def latest_complete(store: ObjectStore) -> RoundState | None:
    """The last round whose model the hospitals hold: complete and, under the threshold
    profile, decrypted by its committee (an undecryptable round is no base for the next)."""
    for round_no in reversed(rounds.list_rounds(store)):
        state = RoundState.load(store, round_no)
        if state is not None and state.status == COMPLETE and _decrypted(store, round_no):
            return state
    return None


def _decrypted(store: ObjectStore, round_no: int) -> bool:
    record = rounds.read_json(store, rounds.round_key(round_no)) or {}
    if record.get("codec_profile") != "threshold":
        return True
    from . import threshold_flow

    return any(entry.get("decrypted") for entry in threshold_flow.outcomes(store, round_no).values())


def _initial_model(request: RoundRequest) -> bytes:
    """The round-1 base model as ``.npy`` bytes: the model's seeded initial weights, or, for a
    synthetic benchmark round, ``synthetic_params`` seeded float32 values."""
    if request.synthetic_params:
        rng = np.random.default_rng(request.training.seed)
        weights = (rng.standard_normal(request.synthetic_params) * 0.05).astype(np.float32)
    else:
        weights = training.flat_weights(training.build_model(request.training)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, weights, allow_pickle=False)
    return buf.getvalue()


OPEN_ATTEMPTS = 20


def open_round(broker: Broker, store: ObjectStore, codec, request: RoundRequest,
               signer: identity.Identity, clock=time.time) -> dict:
    """Claim the next round number, write the round record and publish ``round_start``, both
    signed by ``signer`` (the controller's identity); returns the message.

    The number is claimed by creating ``rounds/<r>/round`` with ``If-None-Match: *``: of two
    controllers that listed the same rounds, exactly one creates the record; the other finds
    it taken and tries the next number. Only the winner writes the round's base model and
    publishes, so no round is opened twice and no record points at another's base model."""
    request.check()
    log = get_logger(role="controller")
    existing = rounds.list_rounds(store)
    round_no = (existing[-1] + 1) if existing else 1
    base = latest_complete(store)
    initial = _initial_model(request) if base is None else None
    for _ in range(OPEN_ATTEMPTS):
        message = identity.sign(_round_start(round_no, base, initial, codec, request, clock()),
                                signer)
        try:
            rounds.write_json(store, rounds.round_key(round_no), message, if_none_match=True)
            break
        except PreconditionFailed:
            log.info("round_number_taken", round=round_no)
            round_no += 1
    else:
        raise RoundTimeout(f"could not claim a round number in {OPEN_ATTEMPTS} attempts")
    CrashPoints().reached("controller.after_claim", round=round_no)  # tests only
    if initial is not None:
        store.put_bytes(rounds.base_key(round_no), initial)
    broker.publish("round_start", messages.encode(message), message_id=f"round_start:{round_no}")
    log.info("round_started", round=round_no, base_model_key=message["base_model_key"])
    return message


def _round_start(round_no: int, base: RoundState | None, initial: bytes | None, codec,
                 request: RoundRequest, now: float) -> dict:
    if base is None:
        # SCAFFOLD uploads [model ; control delta]: the round's vectors are longer than the model
        n_params = (int(np.load(io.BytesIO(initial), allow_pickle=False).size)
                    * strategies.make(request.training).upload_factor)
        base_fields = {"base_model_key": rounds.base_key(round_no),
                       "base_model_sha256": sha256_bytes(initial),
                       "base_model_encrypted": False, "base_total_samples": 0}
    else:
        n_params = base.n_params
        base_fields = {"base_model_key": base.model_key, "base_model_sha256": base.model_sha256,
                       "base_model_encrypted": True, "base_total_samples": base.total_samples}
    if codec.profile == "threshold":  # the round's encoding: no sum of quorum updates can wrap
        base_fields["encoding"] = {"max_samples": request.max_samples, "weight_bound": request.weight_bound}
    return messages.make(
        "round_start", round=round_no, **base_fields, quorum=request.quorum,
        min_clients=request.min_clients, max_contributors=request.most_contributors,
        deadline=now + request.deadline_seconds,
        training=request.training.to_dict(), key_fingerprint=codec.fingerprint,
        codec_profile=codec.profile, n_params=n_params, hospitals=list(request.hospitals),
        issued_at=now)


STORE_POLL_SECONDS = 5.0


def outcome_from_state(state: RoundState) -> dict | None:
    """The ``model_ready`` or ``round_aborted`` a finished, announced round published."""
    if state is None or not state.announced:
        return None
    return state.outcome_message()


def wait_for_round(broker: Broker, queue: str, round_no: int, timeout: float,
                   store: ObjectStore | None = None,
                   verifier: identity.Verifier | None = None) -> dict:
    """Block until the round's ``model_ready`` or ``round_aborted`` arrives on ``queue``.

    With ``verifier``, an outcome that is not signed by a registered aggregator (and
    published by its broker user) is ignored, so nobody but the aggregator can end a round
    in the controller's eyes.

    With ``store``, the aggregator's durable record is also polled: the temporary queue is
    exclusive to this connection, so an outcome published while the broker was restarting
    (and the queue with it) would otherwise never be seen. The queue is client-named, so
    the transport re-declares it on every reconnect."""
    log = get_logger(role="controller")
    deadline = time.monotonic() + timeout
    next_poll = time.monotonic() + STORE_POLL_SECONDS
    while time.monotonic() < deadline:
        try:
            delivery = broker.get(queue, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        except TransportError as exc:
            # e.g. the reply queue's node is gone in a cluster and its name is still held:
            # the round record in the store still tells the outcome
            log.warning("reply_queue_unavailable", error=str(exc))
            delivery, next_poll = None, time.monotonic()
            time.sleep(1.0)
        if delivery is not None:
            try:
                message = messages.decode(delivery.body)
                if verifier is not None:
                    verifier.verify(message, broker_user=delivery.user_id)
            except messages.MessageError as exc:  # IdentityError is one
                get_logger(role="controller").warning("outcome_ignored", reason=str(exc))
                message = {}
            if message.get("round") == round_no:
                log.info("round_outcome_received", round=round_no, via="queue")
                return message
        if store is not None and time.monotonic() >= next_poll:
            next_poll = time.monotonic() + STORE_POLL_SECONDS
            found = outcome_from_state(RoundState.load(store, round_no))
            if found is not None:
                log.info("round_outcome_received", round=round_no, via="store")
                return found
    raise RoundTimeout(f"round {round_no}: no model_ready or round_aborted within {timeout:.0f}s")


UNDECRYPTABLE = "undecryptable"


def committee_outcome(store: ObjectStore, round_no: int) -> dict | None:
    """A threshold round's committee result from the hospitals' signed outcome records:
    ``{"decrypted": True, "hospitals": [...]}`` once any hospital decrypted, ``{"decrypted":
    False, "reason": ...}`` if only failures are recorded, None while nothing is."""
    from . import threshold_flow

    found = threshold_flow.outcomes(store, round_no)
    if not found:
        return None
    decrypted = sorted(h for h, o in found.items() if o.get("decrypted"))
    if decrypted:
        return {"decrypted": True, "hospitals": decrypted}
    reasons = sorted({str(o.get("reason")) for o in found.values()})
    return {"decrypted": False, "reason": "; ".join(reasons), "hospitals": sorted(found)}


def wait_for_committee(store: ObjectStore, round_no: int, timeout: float, poll: float = 1.0,
                       clock=time.monotonic, sleep=time.sleep) -> dict:
    """After ``model_ready`` of a threshold round: the committee's result. Every live hospital
    gets the same partials, so the first recorded outcome decides, with a grace of two polls
    for a decrypted one after a failure."""
    deadline = clock() + timeout
    failed_at = None
    while True:
        result = committee_outcome(store, round_no)
        if result is not None and result["decrypted"]:
            return result
        if result is not None:
            failed_at = failed_at if failed_at is not None else clock()
            if clock() - failed_at >= 2 * poll:
                return result
        if clock() > deadline:
            return result or {"decrypted": False, "reason": f"no hospital reported the committee's result "
                                                             f"of round {round_no} within {timeout:.0f}s"}
        sleep(poll)


def round_result(start: dict, outcome: dict) -> dict:
    complete = outcome["schema"] == "model_ready"
    return {
        "round": start["round"],
        "status": COMPLETE if complete else ABORTED,
        "contributors": outcome.get("contributors", []),
        "total_samples": outcome.get("total_samples", 0),
        "base_model_key": start["base_model_key"],
        "model_key": outcome.get("key") if complete else None,
        "model_sha256": outcome.get("sha256") if complete else None,
        "reason": None if complete else outcome.get("reason"),
        "metrics": outcome.get("metrics", {}),
    }




def _timings(record: dict, state: RoundState | None) -> dict:
    timings = dict(state.timings) if state else {}
    if state and state.finished_at is not None and record.get("issued_at") is not None:
        timings["round_seconds"] = state.finished_at - record["issued_at"]
    if state:
        issued = record.get("issued_at") or state.opened_at
        timings["accepted_after_seconds"] = {a["hospital"]: a["accepted_at"] - issued
                                             for a in state.accepted if "accepted_at" in a}
    return timings


def status(store: ObjectStore, now: float | None = None) -> list[dict]:
    """Every round with its state, contributors, refusals (with reasons) and timings.

    ``refused``: updates the aggregator refused; ``refused_by_hospitals``: messages of the
    round a hospital refused (a ``round_start`` it would not take part in or encrypt for, an
    aggregate it would not decrypt, and a forged, undecodable or misdirected message claiming
    the round, kept in ``hospitals/<id>/refusals``).

    Refusals the aggregator could not attach to a round's record (an unknown round number, a
    message that did not decode, or one whose signature, sender or broker user did not check
    out) are listed with the round they claim when it exists; otherwise they come last, under
    their claimed round number with state ``unknown``, or under round 0 with state
    ``malformed`` for messages that did not decode."""
    now = time.time() if now is None else now
    rows = []
    for round_no in rounds.list_rounds(store):
        record = rounds.read_json(store, rounds.round_key(round_no)) or {}
        state = RoundState.load(store, round_no)
        shown, reason = rounds.shown_status(record, state, now)
        rows.append({
            "round": round_no,
            "state": shown,
            "quorum": record.get("quorum"), "min_clients": record.get("min_clients"),
            "deadline": record.get("deadline"),
            "contributors": state.contributors if state else [],
            "total_samples": state.total_samples if state else 0,
            "refused": state.refused if state else [],
            "refused_by_hospitals": rounds.hospital_refusals(store, round_no),
            "reason": reason,
            "model_key": state.model_key if state else None,
            "timings": _timings(record, state),
            "issued_at": record.get("issued_at"),
            "finished_at": state.finished_at if state else None,
            "announced": state.announced if state else False,
        })
        if record.get("codec_profile") == "threshold" and state is not None and state.status == COMPLETE:
            rows[-1]["committee"] = committee_outcome(store, round_no)
            if rows[-1]["committee"] is not None and not rows[-1]["committee"]["decrypted"]:
                rows[-1]["state"], rows[-1]["reason"] = UNDECRYPTABLE, rows[-1]["committee"]["reason"]
    known = {row["round"]: row for row in rows}
    unrouted: dict = {}  # claimed round (0: none) -> (the aggregator's, the hospitals')
    by_whom = ((rounds.read_json(store, rounds.UNROUTED_REFUSALS_KEY) or {}).get("refused", []),
               rounds.hospital_unrouted_refusals(store))
    for slot, entries in enumerate(by_whom):
        for entry in entries:
            round_no = entry.get("round")
            unrouted.setdefault(round_no if isinstance(round_no, int) else 0, ([], []))[slot].append(entry)
    for round_no in sorted(unrouted, key=lambda r: (r == 0, r)):
        by_aggregator, by_hospitals = unrouted[round_no]
        if round_no in known:  # e.g. a forged or replayed message claiming a real round
            known[round_no]["refused"] = known[round_no]["refused"] + by_aggregator
            known[round_no]["refused_by_hospitals"] = sorted(
                known[round_no]["refused_by_hospitals"] + by_hospitals, key=lambda e: e.get("at", 0))
            continue
        rows.append({"round": round_no, "state": "unknown" if round_no else "malformed",
                     "quorum": None, "min_clients": None, "deadline": None, "contributors": [],
                     "total_samples": 0, "refused": by_aggregator, "refused_by_hospitals": by_hospitals,
                     "reason": None,
                     "model_key": None, "timings": {}, "issued_at": None, "finished_at": None,
                     "announced": False})
    return rows
