"""The broker interface every transport implements (RabbitMQ via pika, and the embedded one).

Topology, the same on every broker:

Names below are for the default namespace ``cxr`` (see :class:`Topology`).

- ``cxr.control``: a durable topic exchange; the routing key of a message is its schema name
  (``round_start``, ``update_ready``, ``model_ready``, ``round_aborted``).
- ``cxr.hospital.<id>``: one durable queue per hospital, bound to ``round_start``,
  ``model_ready``, ``round_aborted``, and the threshold key ceremony's ``ceremony_start`` and
  ``ceremony_finalize``.
- ``cxr.aggregator``: the aggregator's durable queue, bound to ``round_start`` and
  ``update_ready``.
- ``cxr.dlx`` / ``cxr.dead-letter``: where refused messages go, each with its reason in the
  ``x-cxr-reason`` header and its origin queue in ``x-cxr-queue``.

A consumer handler returns normally to have its message acked; it raises :class:`Refuse`
to dead-letter it with a reason, or :class:`Requeue` to give it back for later. Any other
exception is treated as transient: the message is requeued after a back-off pause so a
short S3 or broker hiccup never loses it.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

HOSPITAL_BINDINGS = ("round_start", "model_ready", "round_aborted", "ceremony_start", "ceremony_finalize")
AGGREGATOR_BINDINGS = ("round_start", "update_ready")
REASON_HEADER = "x-cxr-reason"
USER_HEADER = "x-cxr-user-id"  # on a dead letter: the user_id the refused message carried
ORIGIN_HEADER = "x-cxr-queue"
# Deliveries of one message before the broker dead-letters it (a handler that fails on every
# delivery must not loop for ever). Past the limit a message reaches the dead-letter queue
# with RabbitMQ's ``x-death`` header (reason ``delivery_limit``) instead of ``x-cxr-reason``.
DELIVERY_LIMIT = 100


@dataclass(frozen=True)
class Topology:
    """Names of exchanges and queues; ``namespace`` lets federations (and tests) share a broker."""

    namespace: str = "cxr"

    @property
    def control_exchange(self) -> str:
        return f"{self.namespace}.control"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.namespace}.dead-letter"

    @property
    def aggregator_queue(self) -> str:
        return f"{self.namespace}.aggregator"

    def hospital_queue(self, hospital_id: str) -> str:
        return f"{self.namespace}.hospital.{hospital_id}"


class TransportError(Exception):
    """The broker could not do what was asked (after retries)."""


class Refuse(Exception):
    """Raised by a handler: dead-letter this message with ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Requeue(Exception):
    """Raised by a handler: put this message back on its queue (e.g. shutting down)."""


@dataclass
class Delivery:
    body: bytes
    routing_key: str
    queue: str
    headers: dict = field(default_factory=dict)
    redelivered: bool = False
    message_id: str | None = None
    tag: object = None  # broker-specific handle
    user_id: str | None = None  # the broker login that published it, as the broker validated it


Handler = Callable[[Delivery], None]


class Broker(abc.ABC):
    """A message broker with confirmed publishing and acknowledged, dead-lettering consumers."""

    topology: Topology

    @abc.abstractmethod
    def declare_topology(self, hospitals: Iterable[str] = ()) -> None:
        """Declare exchanges, the aggregator and dead-letter queues, and the given hospital queues.
        Idempotent; called again after every reconnect. A login that may not configure them
        (least privilege: only the admin does) checks passively that they exist instead."""

    @abc.abstractmethod
    def publish(self, routing_key: str, body: bytes, headers: dict | None = None,
                message_id: str | None = None) -> None:
        """Publish a persistent message on the control exchange and wait for the broker's confirm.
        The message carries the connection's user name as its AMQP ``user_id`` (the broker
        refuses any other). Raises TransportError if the broker refuses it or is unreachable
        after retries."""

    @abc.abstractmethod
    def consume(self, queue: str, handler: Handler, prefetch: int = 1,
                prepare: Handler | None = None) -> None:
        """Register ``handler`` for ``queue``; deliveries are dispatched by :meth:`run`, one
        at a time and in order, each settled by its handler's outcome.

        ``prepare`` (optional) sees each delivery as soon as it is in this consumer's
        prefetch window, in arrival order, before its handler runs: it may start background
        work the handler will use (the aggregator downloads the next updates while it sums
        the current one). It settles nothing and its exceptions are logged and ignored; a
        delivery it saw may still never reach the handler (a lost connection: the broker
        delivers it again), so what it starts must be bounded and disposable."""

    @abc.abstractmethod
    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None,
            tick_interval: float = 1.0) -> None:
        """Dispatch deliveries to handlers until ``stop`` is set, calling ``tick`` about every
        ``tick_interval`` seconds (deadlines, housekeeping). Reconnects on connection loss."""

    @abc.abstractmethod
    def sleep(self, seconds: float) -> None:
        """Wait while keeping the connection alive (heartbeats); safe inside a handler."""

    @abc.abstractmethod
    def temporary_queue(self, routing_keys: Iterable[str]) -> str:
        """An exclusive, auto-deleted queue bound to ``routing_keys``; for waiting on results."""

    @abc.abstractmethod
    def get(self, queue: str, timeout: float) -> Delivery | None:
        """Take one message from ``queue`` (auto-acked), waiting up to ``timeout`` seconds."""

    @abc.abstractmethod
    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting unacked ones)."""

    @abc.abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
