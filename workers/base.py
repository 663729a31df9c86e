"""What every long-running worker shares: signal handling, decoding and dispatch by schema.

A worker registers one handler per message kind. A message that fails to decode or validate
is dead-lettered with the reason. Before anything else is done with a decoded message, its
signature, its sender's registry entry and role, the broker user that published it and its
age are checked (``cxr_mq.identity.Verifier``); a message that fails is dead-lettered with
the reason too. A handler raises ``Refuse`` for a verified message it will not use. SIGTERM and SIGINT set the stop event: the current message is finished or requeued and
the process exits 0. Housekeeping (``tick``) that fails, e.g. on an S3 outage, is logged and
tried again on the next tick: it never takes the worker down.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

from cxr_mq import identity, messages
from cxr_mq.identity import Identity, IdentityError, Verifier
from cxr_mq.log import get_logger
from cxr_mq.observability import Metrics, process_metrics
from cxr_mq.transport.base import Broker, Delivery, Refuse, Requeue


class Worker:
    queue: str
    handlers: dict[str, Callable[[dict, Delivery], None]]

    role: str = "worker"
    prefetch: int = 1  # deliveries held at once; more than one only with a look-ahead (prepare)

    def __init__(self, broker: Broker, stop: threading.Event | None = None,
                 metrics: Metrics | None = None, *, identity: Identity, verifier: Verifier,
                 **context):
        self.broker = broker
        self.identity, self.verifier = identity, verifier
        self.stop = stop or threading.Event()
        self.log = get_logger(**context)
        self.role = context.get("role", self.role)
        self.metrics = metrics or process_metrics()
        self.metrics.watch(self.role, broker=broker)

    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            self.log.info("shutdown_requested", signal=signal.Signals(signum).name)
            self.stop.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def on_delivery(self, delivery: Delivery) -> None:
        message = None
        try:
            try:
                message = messages.decode(delivery.body)
            except messages.MessageError as exc:
                raise Refuse(str(exc)) from None
            try:
                self.verifier.verify(message, broker_user=delivery.user_id)
            except IdentityError as exc:
                self.log.warning("unverified_message_refused", reason=str(exc),
                                 kind=message.get("schema"), signer=message.get("signer"),
                                 broker_user=delivery.user_id)
                self.on_unverified(message, delivery, str(exc))
                raise Refuse(str(exc)) from None
            handler = self.handlers.get(message["schema"])
            if handler is None:
                raise Refuse(f"{message['schema']} is not for {self.queue}")
            handler(message, delivery)
        except Refuse as exc:
            self.metrics.refusal(self.role, exc.reason)
            if message is None:
                self.log.warning("malformed_message_refused", reason=exc.reason,
                                 routing_key=delivery.routing_key, size=len(delivery.body))
                self.on_malformed(delivery, exc.reason)
            raise
        except Requeue:
            raise
        except Exception:
            self.metrics.handler_errors.labels(role=self.role).inc()
            raise  # the transport requeues it after a pause

    def on_malformed(self, delivery: Delivery, reason: str) -> None:
        """A message that did not decode or validate is about to be dead-lettered."""

    def on_unverified(self, message: dict, delivery: Delivery, reason: str) -> None:
        """A message whose signature, sender, broker user or age did not check out is about to
        be dead-lettered; nothing in it may be trusted."""

    def sign(self, message: dict) -> dict:
        return identity.sign(message, self.identity)

    def tick(self) -> None:
        """Periodic housekeeping (deadlines); called from the broker's loop."""

    def _safe_tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # noqa: BLE001 - housekeeping is retried on the next tick
            self.log.exception("tick_failed_will_retry", error=repr(exc))

    def setup(self) -> None:
        """Declare topology, restore state: called once before consuming."""

    def prepare(self, delivery: Delivery) -> None:
        """Look-ahead: sees each delivery of a worker with ``prefetch`` > 1 when it arrives,
        before earlier ones are handled (see ``Broker.consume``). Nothing it does may count."""

    def consume_options(self) -> dict:
        return {"prefetch": self.prefetch, "prepare": self.prepare if self.prefetch > 1 else None}

    def run(self) -> None:
        if self.stop.is_set():  # a signal during start-up: nothing taken, nothing to finish
            self.log.info("worker_stopped", before_start=True)
            return
        self.setup()
        self.broker.consume(self.queue, self.on_delivery, **self.consume_options())
        self.log.info("worker_started", queue=self.queue)
        self.broker.run(self.stop, tick=self._safe_tick, tick_interval=1.0)
        self.log.info("worker_stopped")
