"""The aggregator: validates ``update_ready`` messages, adds accepted ciphertexts into one
running sum per round, and publishes ``model_ready`` (or ``round_aborted``).

It holds only the public CKKS context. Its durable record of a round (``rounds/<r>/state``)
is written before an update's message is acked, so a killed aggregator, restarted, rebuilds
each open round's sum from the accepted updates in the store; ciphertext addition is modular
and order-independent, so the aggregate comes out byte-identical.

An ``update_ready`` seen again (a redelivery, or a hospital republishing after a restart) is
recognised by hospital and sha256 and acked without being counted again, whatever the
round's state. A refused update is dead-lettered with its reason and recorded in the round's
state; refusals that belong to no known round (and malformed messages) are recorded in
``aggregator/refusals`` so that ``cxr-mq status`` shows them too. A permanent S3 fault on an
update refuses that update; a transient one (after the store's retries) requeues it.

Retention: once a round's outcome is durable (state complete or aborted, aggregate written)
and announced, nothing can need its individual updates any more (a restarted aggregator
rebuilds only rounds that are open; a hospital asked again about a finished round ignores
it), so they are deleted, with their ``.msg`` manifests, unless ``retain_updates`` is set:
a later compromise of the key finds no old uploads. The state records ``updates_deleted``;
a deletion cut short (crash, store error) is finished at the next start.

Look-ahead (``prefetch`` > 0, config ``aggregator_prefetch``): the broker hands the
aggregator up to ``prefetch + 1`` messages at once. Messages are still handled one at a
time, in order, exactly as without it; but as each ``update_ready`` arrives, if its round is
open here and the policy would not refuse it outright, its signature is checked and its
object downloaded and hash-checked on one of ``prefetch`` background threads
(``cxr_mq.storage.prefetch``), so fetching the next updates overlaps adding the current one.
The handler uses such a copy only if it hashed to the sha256 of the (verified) message being
handled; otherwise it fetches the object itself, as it always did.
"""
from __future__ import annotations

import os
import tempfile
import time

from cxr_mq import bound, contexts, messages, rounds
from cxr_mq.config import Settings
from cxr_mq.crypto import CodecError
from cxr_mq.faults import CrashPoints
from cxr_mq.policy import RoundPolicy
from cxr_mq.rounds import ABORTED, COMPLETE, OPEN, RoundState, StateConflict
from cxr_mq.storage.base import IntegrityError, ObjectNotFound, ObjectStore, StoreError
from cxr_mq.storage.prefetch import Prefetcher
from cxr_mq.transport.base import Broker, Delivery, Refuse

from .base import Worker

UNROUTED_REFUSALS_KEPT = 500
DEFAULT_PREFETCH = Settings.aggregator_prefetch  # updates fetched ahead of the one being summed


class AggregatorWorker(Worker):
    def __init__(self, broker: Broker, store: ObjectStore, codec, policy: RoundPolicy | None = None,
                 hospitals=(), work_dir: str | None = None, stop=None, clock=time.time,
                 metrics=None, lease=None, retain_updates: bool = False,
                 prefetch: int = DEFAULT_PREFETCH, *, identity, verifier,
                 context_key: str = contexts.PUBLIC_CONTEXT_KEY):
        super().__init__(broker, stop, metrics=metrics, role="aggregator", identity=identity,
                         verifier=verifier)
        self.metrics.watch(self.role, store=store)
        self.crash = CrashPoints()
        codec.require_public_only()
        self.store = store
        # the public contexts by fingerprint: a round naming a new one (a key ceremony since
        # this worker started) loads it from the store, no restart needed
        self.contexts = contexts.ContextBook(store, codec, context_key)
        self.policy = policy or RoundPolicy()
        self.hospitals = tuple(hospitals)
        self.work_dir = work_dir
        self.retain_updates = retain_updates
        self.clock = clock
        self.queue = broker.topology.aggregator_queue
        self.handlers = {"round_start": self._guarded(self.on_round_start),
                         "update_ready": self._guarded(self.on_update_ready)}
        self.states: dict[int, RoundState] = {}
        self.sums: dict[int, object] = {}
        self.events: list[tuple[str, int]] = []  # (event, round) for observers such as the demo
        self._rescan = False
        self.lease = lease  # a cxr_mq.lease.Lease: active only while holding it (standby)
        self.lease_lost: str | None = None
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more, got {prefetch}")
        self.prefetch = prefetch + 1  # the broker's window: the message handled + those ahead
        self.prefetcher = Prefetcher(store, work_dir, prefetch) if prefetch else None

    # -- start-up ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()

    def _run(self) -> None:
        """With a lease, stand by until it is ours, then consume (and tick deadlines) only
        while holding it. Losing it (paused past its TTL, a standby took over) stops this
        worker; what it was doing is redelivered to the new holder."""
        if self.lease is None:
            super().run()
            return
        if not self.lease.wait_acquire(self.stop):
            self.log.info("worker_stopped", standby=True)
            return
        self.log.info("aggregator_active", holder=self.lease.holder)
        self.lease.keep(self._on_lease_lost)
        try:
            super().run()
        finally:
            self.lease.release()

    def _on_lease_lost(self, reason: str) -> None:
        self.lease_lost = reason
        self.stop.set()

    def setup(self) -> None:
        self.broker.declare_topology(self.hospitals)
        self._restore_unfinished()

    def _restore_unfinished(self) -> None:
        self._rescan = False
        for round_no in rounds.list_rounds(self.store):
            if round_no in self.states:
                continue
            state = RoundState.load(self.store, round_no)
            if state is not None and (state.status == OPEN or not state.announced):
                self._restore(state)
            elif state is not None and not state.updates_deleted:
                self._delete_updates(state)

    def _restore(self, state: RoundState) -> None:
        """Rebuild an open round's running sum from the updates it already accepted."""
        self.states[state.round] = state
        if state.status == OPEN and self._open_sum(state):
            for accepted in state.accepted:
                self._add_object(self.sums[state.round], state.round, accepted)
        self.log.info("round_restored", round=state.round, status=state.status,
                      accepted=len(state.accepted))
        self._finish_if_due(state)

    # -- messages ---------------------------------------------------------------------------
    def _state(self, round_no: int) -> RoundState | None:
        if round_no in self.states:
            return self.states[round_no]
        state = RoundState.load(self.store, round_no)
        if state is None:
            record = rounds.read_json(self.store, rounds.round_key(round_no))
            if record is None:
                return None
            state = self._create(RoundState.from_round_start(record, self.clock()))
        self.states[round_no] = state
        if state.status == OPEN and round_no not in self.sums:
            self._restore(state)
        return state

    def on_round_start(self, message: dict, delivery: Delivery) -> None:
        state = self._state(message["round"])
        if state is None:  # the controller writes the record first; be robust anyway
            state = self._create(RoundState.from_round_start(message, self.clock()))
            self.states[state.round] = state
        if state.status == OPEN and state.round not in self.sums and not self._open_sum(state):
            self._finish_if_due(state)  # announces round_aborted with the reason
            return
        self.log.info("round_opened", round=state.round, quorum=state.quorum,
                      min_clients=state.min_clients, deadline=state.deadline)

    @property
    def codec(self):
        """The newest public context this aggregator holds."""
        return self.contexts.current

    def _open_sum(self, state: RoundState) -> bool:
        """Start the round's running sum under the context its signed ``round_start`` names
        (loaded from the store if new). A context neither held nor in the store aborts the
        round with the reason: no update of it could be added."""
        held = state.key_fingerprint in self.contexts.known
        try:
            codec = self.contexts.get(state.key_fingerprint)
        except contexts.UnknownContext as exc:
            reason = f"round {state.round}: the aggregator cannot add its updates: {exc}"
            self.log.warning("round_context_unknown", round=state.round, reason=reason)
            state.status, state.reason, state.finished_at = ABORTED, reason, self.clock()
            state.save(self.store)
            return False
        if not held:
            self.log.info("public_context_loaded", round=state.round, profile=codec.profile,
                          fingerprint=codec.fingerprint[:16])
        self.sums[state.round] = codec.new_sum(state.n_params, max_updates=state.most_contributors)
        return True

    def _create(self, state: RoundState) -> RoundState:
        """Write a new round's first record, or take the one another aggregator just wrote."""
        try:
            state.save(self.store)
            return state
        except StateConflict:
            return RoundState.load(self.store, state.round)

    def _guarded(self, handler):
        """Run ``handler``; if another aggregator moved the round on meanwhile (a conditional
        write lost), forget this process's copy and let the message come back: it is then
        handled against the stored record, whose updates are summed afresh."""
        def run(message: dict, delivery: Delivery) -> None:
            try:
                handler(message, delivery)
            except StateConflict as exc:
                self._forget(message["round"], exc)
                raise
        return run

    def _forget(self, round_no: int, exc: Exception) -> None:
        self.log.warning("round_state_conflict_reloading", round=round_no, error=str(exc))
        self.states.pop(round_no, None)
        self.sums.pop(round_no, None)
        self._rescan = True  # deadlines of forgotten rounds are picked up again on the next tick

    def prepare(self, delivery: Delivery) -> None:
        """Start fetching the object of an ``update_ready`` that is still queued behind the
        message being handled. Only a hint: nothing here counts, refuses or settles."""
        if self.prefetcher is None:
            return
        try:
            message = messages.decode(delivery.body)
        except messages.MessageError:
            return  # the handler dead-letters it
        if message["schema"] != "update_ready":
            return
        state = self.states.get(message["round"])
        if state is None or self.policy.is_duplicate(state, message) or \
                self.policy.refuse_reason(state, message, self.clock()) is not None:
            return  # the handler decides; nothing worth fetching yet

        def verified() -> None:  # on the fetching thread: no download for a forged message
            self.verifier.verify(message, broker_user=delivery.user_id)
        self.prefetcher.start(message["key"], message["sha256"], before=verified)

    def on_update_ready(self, message: dict, delivery: Delivery) -> None:
        log = self.log.bind(round=message["round"], hospital=message["hospital"], key=message["key"])
        state = self._state(message["round"])
        if state is not None and self.policy.is_duplicate(state, message):
            # before any other check: a late redelivery of an update that was counted is not
            # a refusal, even once the round has closed
            log.info("duplicate_update_ignored", sha256=message["sha256"], status=state.status,
                     redelivered=delivery.redelivered)
            self.metrics.updates_duplicate.labels(role=self.role).inc()
            return
        reason = self.policy.refuse_reason(state, message, self.clock())
        if reason is None:
            reason = self._accept(state, message)
        if reason is not None:
            self._record_refusal(state, message, reason)
            log.warning("update_refused", reason=reason)
            if state is not None and state.announced:
                self._delete_late_update(state, message["hospital"])
            raise Refuse(reason)
        self.metrics.updates_accepted.labels(role=self.role).inc()
        self.metrics.bytes.labels(role=self.role, direction="downloaded").inc(message["size"])
        log.info("update_accepted", accepted=len(state.accepted), quorum=state.quorum,
                 contributors=state.contributors)
        self._finish_if_due(state)

    def _accept(self, state: RoundState, update: dict) -> str | None:
        started = time.perf_counter()
        try:
            download_seconds, prefetched = self._add_object(self.sums[state.round], state.round,
                                                            update)
        except bound.BindingError as exc:
            return f"unbound update: {exc}"
        except IntegrityError as exc:
            return f"sha256 mismatch: {exc}"
        except ObjectNotFound as exc:
            return f"update object missing: {exc}"
        except CodecError as exc:
            return f"bad ciphertext: {exc}"
        except StoreError as exc:
            if exc.transient:
                raise  # requeued and retried after a pause: the store may recover
            return f"update object unreadable: {exc}"
        self.metrics.duration.labels(role=self.role, phase="aggregate").observe(
            time.perf_counter() - started)
        state.accepted.append({
            "hospital": update["hospital"], "key": update["key"], "sha256": update["sha256"],
            "start_sha256": update.get("start_sha256"),
            "n_samples": self.policy.weight(update), "metrics": update.get("metrics", {}),
            "size": update["size"], "accepted_at": self.clock()})
        state.timings["aggregate_seconds"] = (state.timings.get("aggregate_seconds", 0.0)
                                              + time.perf_counter() - started)
        # of which getting the hash-checked object: fetching it, or waiting for its prefetch
        # to finish (the rest: the ciphertext add)
        state.timings["download_seconds"] = (state.timings.get("download_seconds", 0.0)
                                             + download_seconds)
        # of the accepted updates, how many were fetched ahead (while another was summed)
        state.timings["prefetched_updates"] = (state.timings.get("prefetched_updates", 0)
                                               + int(prefetched))
        state.save(self.store)  # durable before the ack
        self.crash.reached("aggregator.after_accept", round=state.round, hospital=update["hospital"])
        return None

    def _add_object(self, total, round_no: int, update: dict) -> tuple[float, bool]:
        """Verify the object's hash on a local copy and that it is bound to this round and
        hospital, then stream it into the sum; returns the seconds spent getting the checked
        copy (downloading it, or waiting for its prefetch to finish) and whether it was
        prefetched."""
        started = time.perf_counter()
        path = (self.prefetcher.take(update["key"], update["sha256"])
                if self.prefetcher is not None else None)
        fetch = path is None  # no checked copy fetched ahead: fetch and check it here
        if fetch:
            fd, path = tempfile.mkstemp(prefix="update-", dir=self.work_dir)
            os.close(fd)
        try:
            if fetch:
                self.store.download(update["key"], path, sha256=update["sha256"])
            downloaded = time.perf_counter() - started
            with open(path, "rb") as fh:
                bound.check_header(fh, round_no, update["hospital"])
                total.add(fh)
            return downloaded, not fetch
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def _record_refusal(self, state: RoundState | None, update: dict, reason: str) -> None:
        entry = {"hospital": update["hospital"], "reason": reason, "key": update["key"],
                 "sha256": update["sha256"], "at": self.clock()}
        if state is None:
            self._record_unrouted({**entry, "round": update["round"]})
            return
        state.refused.append(entry)
        state.save(self.store)

    def on_unverified(self, message: dict, delivery: Delivery, reason: str) -> None:
        """Kept apart from the rounds' records (whose entries are trusted) but shown by
        ``cxr-mq status`` under the round the message claims."""
        self._record_unrouted({"round": message.get("round"), "kind": message.get("schema"),
                               "hospital": message.get("hospital") or message.get("signer") or "unknown",
                               "signer": message.get("signer"), "broker_user": delivery.user_id,
                               "key": message.get("key"), "reason": reason, "at": self.clock()})

    def on_malformed(self, delivery: Delivery, reason: str) -> None:
        self._record_unrouted({"round": None, "hospital": "unknown", "reason": reason,
                               "routing_key": delivery.routing_key, "size": len(delivery.body),
                               "at": self.clock()})

    def _record_unrouted(self, entry: dict) -> None:
        """Keep refusals that belong to no known round where ``cxr-mq status`` finds them.
        Best effort: failing to record must not change what happens to the message."""
        try:
            rounds.append_refusal(self.store, rounds.UNROUTED_REFUSALS_KEY, entry, keep=UNROUTED_REFUSALS_KEPT)
        except Exception as exc:  # noqa: BLE001
            self.log.warning("refusal_not_recorded", error=repr(exc), reason=entry["reason"])

    # -- finishing --------------------------------------------------------------------------
    def tick(self) -> None:
        if self._rescan:
            self._restore_unfinished()
        for state in list(self.states.values()):
            try:
                self._finish_if_due(state)
            except StateConflict as exc:
                self._forget(state.round, exc)

    def _finish_if_due(self, state: RoundState) -> None:
        outcome = self.policy.outcome(state, self.clock())
        if outcome == COMPLETE:
            self._complete(state)
        elif outcome == ABORTED:
            state.status, state.reason, state.finished_at = ABORTED, self.policy.abort_reason(state), self.clock()
            state.save(self.store)
        if outcome is not None:
            self.metrics.rounds.labels(role=self.role, outcome=state.status).inc()
            if state.finished_at is not None and state.opened_at:
                self.metrics.duration.labels(role=self.role, phase="round").observe(
                    max(0.0, state.finished_at - state.opened_at))
        if state.status != OPEN and not state.announced:
            self._announce(state)
        self.metrics.open_rounds.labels(role=self.role).set(
            sum(1 for s in self.states.values() if s.status == OPEN))

    def _complete(self, state: RoundState) -> None:
        started = time.perf_counter()
        fd, path = tempfile.mkstemp(prefix="aggregate-", dir=self.work_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                self.sums[state.round].write(fh)
            info = self.store.put_file(rounds.aggregate_key(state.round), path)
        finally:
            os.unlink(path)
        self.crash.reached("aggregator.after_aggregate", round=state.round)
        state.status, state.finished_at = COMPLETE, self.clock()
        state.model_key, state.model_sha256 = info.key, info.sha256
        state.total_samples = sum(a["n_samples"] for a in state.accepted)
        state.timings["finalize_seconds"] = time.perf_counter() - started
        state.save(self.store)
        self.crash.reached("aggregator.after_complete", round=state.round)
        self.metrics.duration.labels(role=self.role, phase="finalize").observe(
            state.timings["finalize_seconds"])
        self.metrics.bytes.labels(role=self.role, direction="uploaded").inc(info.size)
        self.sums.pop(state.round, None)

    def _announce(self, state: RoundState) -> None:
        message = self.sign(state.outcome_message())
        self.broker.publish(message["schema"], messages.encode(message),
                            message_id=f"{message['schema']}:{state.round}")
        state.announced = True
        state.save(self.store)
        self.states.pop(state.round, None)
        self.events.append((message["schema"], state.round))
        self.log.info(message["schema"], round=state.round, contributors=state.contributors,
                      total_samples=state.total_samples, reason=state.reason)
        self.crash.reached("aggregator.after_announce", round=state.round)
        self._delete_updates(state)

    # -- retention --------------------------------------------------------------------------
    def _delete_updates(self, state: RoundState) -> None:
        """Delete a finished, announced round's individual updates and manifests. Best
        effort: what a failure leaves is deleted at the next start."""
        if self.retain_updates or state.updates_deleted:
            return
        try:
            keys = self.store.list(rounds.updates_prefix(state.round))
            for key in keys:
                self.store.delete(key)
            state.updates_deleted = True
            state.save(self.store)
        except StoreError as exc:
            self.log.warning("updates_not_deleted", round=state.round, error=str(exc))
            return
        self.log.info("updates_deleted", round=state.round, objects=len(keys))

    def _delete_late_update(self, state: RoundState, hospital: str) -> None:
        """An update uploaded after its round was announced is refused; nothing will ever
        read it, so retention removes it too."""
        if self.retain_updates:
            return
        try:
            self.store.delete(rounds.update_key(state.round, hospital))
            self.store.delete(rounds.update_message_key(state.round, hospital))
        except StoreError as exc:
            self.log.warning("late_update_not_deleted", round=state.round, hospital=hospital,
                             error=str(exc))
