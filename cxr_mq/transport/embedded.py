"""An in-process broker with RabbitMQ's semantics as cxr-mq uses them (demo and tests).

:class:`EmbeddedServer` plays the RabbitMQ node: exchanges, queues and bindings, shared by any
number of threads. :class:`EmbeddedBroker` plays one AMQP connection of one worker. What
carries over from RabbitMQ, because the workers' correctness depends on it:

- topic exchanges route by routing key (``*`` = one word, ``#`` = zero or more) to every
  bound queue; publishing is confirmed and ``mandatory``, so a missing exchange or an
  unroutable message is a TransportError, never a silent loss;
- queued messages stay in the server whoever is connected;
- a consumer holds up to ``prefetch`` unacked messages; a message is acked only when its
  handler returns, and every unacked message goes back to the head of its queue, marked
  redelivered, when the handler requeues it or the connection closes or aborts;
- refused messages go to the dead-letter queue with their reason and origin queue headers;
- a message given back more than ``delivery_limit`` times (a handler failing on every
  delivery) is dead-lettered with an ``x-death`` header, reason ``delivery_limit``, as a
  quorum queue with ``x-delivery-limit`` does;
- temporary queues are exclusive to their connection and deleted with it;
- a connection has a user: every message it publishes carries it as ``user_id``, as RabbitMQ
  validates ``user_id`` against the login; given that user's ``Permissions``
  (``transport/permissions.py``), the connection may configure, publish (per routing key),
  bind and read only what RabbitMQ would let it, and a login that may not configure checks
  passively that the topology is there, as ``RabbitMQBroker`` does; temporary queues are
  named ``amq.gen-...`` as RabbitMQ names them.

Everything is guarded by the server's one condition variable; handlers run on the thread
calling :meth:`EmbeddedBroker.run` and never while that lock is held.
"""
from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from ..log import get_logger
from .permissions import Permissions
from .base import (AGGREGATOR_BINDINGS, DELIVERY_LIMIT, HOSPITAL_BINDINGS, ORIGIN_HEADER,
                   REASON_HEADER, USER_HEADER, Broker, Delivery, Handler, Refuse, Requeue, Topology,
                   TransportError)

IDLE_POLL = 0.05  # how often an idle run() loop looks at ``stop``
ROUTING_KEY_HEADER = "x-cxr-routing-key"  # as RabbitMQBroker adds on dead-lettering


@dataclass
class _Message:
    body: bytes
    routing_key: str
    headers: dict = field(default_factory=dict)
    message_id: str | None = None
    redelivered: bool = False
    returns: int = 0  # times given back unacked (a quorum queue's delivery-count)
    user_id: str | None = None


@dataclass
class _Queue:
    name: str
    owner: "EmbeddedBroker | None" = None  # set for exclusive queues
    messages: deque = field(default_factory=deque)


@dataclass
class _Consumer:
    queue: str
    handler: Handler
    prefetch: int
    buffer: deque = field(default_factory=deque)  # (tag, message) prefetched, not yet handled
    in_flight: int = 0
    prepare: Handler | None = None  # sees each message when it enters the buffer


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on ``.``, ``*`` one word, ``#`` zero or more."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


class EmbeddedServer:
    """The shared broker state: topic exchanges with their bindings, and queues."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._exchanges: dict[str, list[tuple[str, str]]] = {}  # name -> [(pattern, queue)]
        self._queues: dict[str, _Queue] = {}

    def declare_exchange(self, name: str) -> None:
        with self.cond:
            self._exchanges.setdefault(name, [])

    def declare_queue(self, name: str, owner: "EmbeddedBroker | None" = None) -> None:
        with self.cond:
            queue = self._queues.get(name)
            if queue is None:
                self._queues[name] = _Queue(name, owner)
            elif queue.owner is not None and queue.owner is not owner:
                raise TransportError(f"queue {name} is exclusive to another connection")

    def bind(self, queue: str, exchange: str, pattern: str) -> None:
        with self.cond:
            self.queue(queue)
            bindings = self._exchange(exchange)
            if (pattern, queue) not in bindings:
                bindings.append((pattern, queue))

    def delete_queue(self, name: str) -> None:
        with self.cond:
            self._queues.pop(name, None)
            for bindings in self._exchanges.values():
                bindings[:] = [b for b in bindings if b[1] != name]

    def delete_exchange(self, name: str) -> None:
        with self.cond:
            self._exchanges.pop(name, None)

    def route(self, exchange: str, message: _Message) -> int:
        """Put a copy of ``message`` on every queue bound to it; returns how many queues."""
        with self.cond:
            targets = {queue for pattern, queue in self._exchange(exchange)
                       if topic_matches(pattern, message.routing_key)}
            for name in sorted(targets):
                self._queues[name].messages.append(replace(message, headers=dict(message.headers)))
            if targets:
                self.cond.notify_all()
            return len(targets)

    def queue(self, name: str) -> _Queue:
        with self.cond:
            found = self.find_queue(name)
            if found is None:
                raise TransportError(f"no queue {name!r}")
            return found

    def find_queue(self, name: str) -> _Queue | None:
        with self.cond:
            return self._queues.get(name)

    def has_exchange(self, name: str) -> bool:
        with self.cond:
            return name in self._exchanges

    def _exchange(self, name: str) -> list[tuple[str, str]]:
        try:
            return self._exchanges[name]
        except KeyError:
            raise TransportError(f"no exchange {name!r}") from None


class EmbeddedBroker(Broker):
    """One worker's connection to an :class:`EmbeddedServer`."""

    def __init__(self, server: EmbeddedServer, topology: Topology = Topology(),
                 retry_delay: float = 0.2, max_retry_delay: float = 5.0,
                 delivery_limit: int = DELIVERY_LIMIT, user: str | None = None,
                 permissions: Permissions | None = None):
        self.server = server
        self.permissions = permissions  # None: everything allowed (an admin, or tests)
        self.delivery_limit = delivery_limit
        self.user = user  # the connection's login: the user_id of everything it publishes
        self.topology = topology
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self._consumers: list[_Consumer] = []
        self._unacked: dict[int, tuple[str, _Message]] = {}
        self._tags = itertools.count(1)
        self._own_queues: set[str] = set()
        self._closed = False
        self._running = False
        self._failures = 0  # consecutive transient handler failures, for back-off
        self._log = get_logger(component="embedded-broker", namespace=topology.namespace)

    # -- topology -----------------------------------------------------------------------------

    def _require(self, kind: str, name: str) -> None:
        if self.permissions is not None and not self.permissions.allows(kind, name):
            raise TransportError(f"broker refused: 403 ACCESS_REFUSED - {kind} access to {name!r} "
                                 f"refused for user {self.user!r}")

    def _require_topic(self, kind: str, routing_key: str) -> None:
        exchange = self.topology.control_exchange
        if self.permissions is not None and not self.permissions.allows_topic(kind, exchange, routing_key):
            raise TransportError(f"broker refused: 403 ACCESS_REFUSED - access to topic {routing_key!r} "
                                 f"in exchange {exchange!r} refused for user {self.user!r}")

    def _check_topology(self, hospitals: Iterable[str]) -> None:
        """Passive declares: what a login without configure permission does."""
        topo = self.topology
        for exchange in (topo.control_exchange, topo.dead_letter_exchange):
            if not self.server.has_exchange(exchange):
                raise TransportError(f"broker topology missing (no exchange {exchange!r}): an admin "
                                     "must run 'cxr-mq broker declare'")
        for queue in [topo.aggregator_queue, topo.dead_letter_queue,
                      *(topo.hospital_queue(h) for h in hospitals)]:
            if self.server.find_queue(queue) is None:
                raise TransportError(f"broker topology missing (no queue {queue!r}): an admin "
                                     "must run 'cxr-mq broker declare'")

    def declare_topology(self, hospitals: Iterable[str] = ()) -> None:
        self._check_open()
        topo = self.topology
        if self.permissions is not None and not self.permissions.allows("configure", topo.control_exchange):
            self._check_topology(hospitals)
            return
        self.server.declare_exchange(topo.control_exchange)
        self._declare_dead_letter()
        self._declare_bound(topo.aggregator_queue, AGGREGATOR_BINDINGS)
        for hospital in hospitals:
            self._declare_bound(topo.hospital_queue(hospital), HOSPITAL_BINDINGS)

    def delete_topology(self, hospitals: Iterable[str] = ()) -> None:
        topo = self.topology
        self._require("configure", topo.control_exchange)
        for name in [topo.aggregator_queue, topo.dead_letter_queue,
                     *(topo.hospital_queue(h) for h in hospitals)]:
            self.server.delete_queue(name)
        self.server.delete_exchange(topo.control_exchange)
        self.server.delete_exchange(topo.dead_letter_exchange)

    def _declare_bound(self, queue: str, routing_keys: Iterable[str], owner=None) -> None:
        self.server.declare_queue(queue, owner)
        for key in routing_keys:
            self.server.bind(queue, self.topology.control_exchange, key)

    def _declare_dead_letter(self) -> None:
        self.server.declare_exchange(self.topology.dead_letter_exchange)
        self.server.declare_queue(self.topology.dead_letter_queue)
        self.server.bind(self.topology.dead_letter_queue, self.topology.dead_letter_exchange, "#")

    def temporary_queue(self, routing_keys: Iterable[str]) -> str:
        self._check_open()
        name = f"amq.gen-{uuid.uuid4().hex[:22]}"  # server-named, as RabbitMQ does
        keys = tuple(routing_keys)
        self._require("configure", name)
        self._require("write", name)  # binding: write on the queue, read on the exchange
        self._require("read", self.topology.control_exchange)
        for key in keys:
            self._require_topic("read", key)
        if self.permissions is None:
            self.server.declare_exchange(self.topology.control_exchange)
        with self.server.cond:
            self._own_queues.add(name)
            self._declare_bound(name, keys, owner=self)
        return name

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, routing_key: str, body: bytes, headers: dict | None = None,
                message_id: str | None = None) -> None:
        self._check_open()
        self._require("write", self.topology.control_exchange)
        self._require_topic("write", routing_key)
        message = _Message(bytes(body), routing_key, dict(headers or {}), message_id,
                           user_id=self.user)
        if not self.server.route(self.topology.control_exchange, message):
            raise TransportError(f"broker refused {routing_key}: no queue is bound to it")

    # -- consuming ----------------------------------------------------------------------------

    def consume(self, queue: str, handler: Handler, prefetch: int = 1,
                prepare: Handler | None = None) -> None:
        self._check_open()
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self._require("read", queue)
        with self.server.cond:
            self._usable_queue(queue)
            self._consumers.append(_Consumer(queue, handler, prefetch, prepare=prepare))

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None,
            tick_interval: float = 1.0) -> None:
        with self.server.cond:
            self._check_open()
            if self._running:
                raise TransportError("run() is already dispatching on another thread")
            self._running = True
        try:
            next_tick = time.monotonic()  # tick once straight away, like RabbitMQBroker
            while not stop.is_set() and not self._closed:
                now = time.monotonic()
                if tick is not None and now >= next_tick:
                    tick()
                    next_tick = time.monotonic() + tick_interval
                    continue
                wait = IDLE_POLL if tick is None else min(IDLE_POLL, next_tick - now)
                work = self._next_delivery(wait)
                if work is not None:
                    self._dispatch(*work, stop=stop)
        finally:
            with self.server.cond:
                self._running = False

    def _next_delivery(self, wait: float) -> tuple[_Consumer, int, _Message] | None:
        arrived: list = []
        with self.server.cond:
            work = self._take(arrived)
            if work is None and wait > 0:
                self.server.cond.wait(wait)
                work = self._take(arrived)
        for consumer, tag, message in arrived:  # outside the lock, like handlers
            try:
                consumer.prepare(self._delivery(consumer.queue, message, tag))
            except Exception:  # noqa: BLE001 - an optimisation only: the handler decides
                self._log.warning("prepare_failed", queue=consumer.queue, exc_info=True)
        return work

    def _take(self, arrived: list) -> tuple[_Consumer, int, _Message] | None:
        """Top up every consumer's prefetch window (collecting the new messages of consumers
        with a ``prepare`` step in ``arrived``), then hand out the next buffered message,
        rotating between consumers so one busy queue cannot starve another."""
        if self._closed:
            return None
        for consumer in self._consumers:
            queue = self.server.find_queue(consumer.queue)
            while queue is not None and queue.messages and \
                    len(consumer.buffer) + consumer.in_flight < consumer.prefetch:
                tag = next(self._tags)
                message = queue.messages.popleft()
                self._unacked[tag] = (consumer.queue, message)
                consumer.buffer.append((tag, message))
                if consumer.prepare is not None:
                    arrived.append((consumer, tag, message))
        for i, consumer in enumerate(self._consumers):
            if consumer.buffer:
                self._consumers.append(self._consumers.pop(i))
                tag, message = consumer.buffer.popleft()
                consumer.in_flight += 1
                return consumer, tag, message
        return None

    def _dispatch(self, consumer: _Consumer, tag: int, message: _Message,
                  stop: threading.Event) -> None:
        delivery = self._delivery(consumer.queue, message, tag)
        try:
            consumer.handler(delivery)
        except Refuse as refusal:
            self._log.warning("message_refused", queue=consumer.queue,
                              routing_key=message.routing_key, message_id=message.message_id,
                              reason=refusal.reason)
            self._settle(tag, dead_letter_reason=refusal.reason)
        except Requeue:
            self._settle(tag, requeue=True)
        except Exception:  # noqa: BLE001 - transient by contract: back off, requeue, go on
            self._failures += 1
            delay = min(self.retry_delay * 2 ** (self._failures - 1), self.max_retry_delay)
            self._log.warning("handler_failed_requeueing", queue=consumer.queue,
                              routing_key=message.routing_key, message_id=message.message_id,
                              retry_in=round(delay, 3), exc_info=True)
            stop.wait(delay)
            self._settle(tag, requeue=True)
        else:
            self._failures = 0
            self._settle(tag)
        finally:
            with self.server.cond:
                consumer.in_flight -= 1

    def _settle(self, tag: int, requeue: bool = False,
                dead_letter_reason: str | None = None) -> None:
        """Ack, requeue or dead-letter an unacked message. A tag this connection no longer holds
        (it was closed or aborted meanwhile, so the message is back on its queue) is ignored,
        as an ack on a dead AMQP channel never reaches the broker."""
        with self.server.cond:
            entry = self._unacked.pop(tag, None)
            if entry is None:
                self._log.info("settle_after_close_ignored", tag=tag)
                return
            queue, message = entry
            if requeue:
                self._return_to_queue(queue, message)
            elif dead_letter_reason is not None:
                headers = {REASON_HEADER: dead_letter_reason, ORIGIN_HEADER: queue,
                           ROUTING_KEY_HEADER: message.routing_key}
                if message.user_id:
                    headers[USER_HEADER] = message.user_id
                # the consumer republishes it, as RabbitMQBroker does: the copy is its own
                self._dead_letter(message, headers, user_id=self.user)

    def _dead_letter(self, message: _Message, headers: dict, user_id: str | None = None) -> None:
        # Never drop a dead-lettered message for want of a declared dead-letter queue.
        self._declare_dead_letter()
        self.server.route(self.topology.dead_letter_exchange,
                          replace(message, headers={**message.headers, **headers}, redelivered=False,
                                  returns=0, user_id=user_id or message.user_id))

    def _return_to_queue(self, queue: str, message: _Message) -> None:
        target = self.server.find_queue(queue)
        if target is None:
            self._log.warning("requeue_to_deleted_queue_dropped", queue=queue,
                              message_id=message.message_id)
            return
        message.returns += 1
        if message.returns > self.delivery_limit:
            self._log.warning("delivery_limit_dead_lettered", queue=queue,
                              message_id=message.message_id, deliveries=message.returns)
            self._dead_letter(message, {"x-death": [{"reason": "delivery_limit", "queue": queue,
                                                     "count": 1}]})
            return
        message.redelivered = True
        target.messages.appendleft(message)
        self.server.cond.notify_all()

    # -- one-off gets -------------------------------------------------------------------------

    def get(self, queue: str, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + max(timeout, 0.0)
        self._require("read", queue)
        with self.server.cond:
            while True:
                self._check_open()
                source = self._usable_queue(queue)
                if source.messages:
                    return self._delivery(queue, source.messages.popleft(), None)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.server.cond.wait(remaining)

    def unsettled(self) -> int:
        """Messages delivered to this connection's consumers and not yet acked, requeued or
        dead-lettered (its prefetch buffers and the one being handled)."""
        with self.server.cond:
            return len(self._unacked)

    def queue_depth(self, queue: str) -> int:
        with self.server.cond:
            self._check_open()
            return len(self._usable_queue(queue).messages)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(seconds, 0.0))

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Give every unacked message back to its queue (redelivered) and drop temporary queues,
        as RabbitMQ does when a connection goes away for whatever reason."""
        with self.server.cond:
            if self._closed:
                return
            self._closed = True
            for tag in sorted(self._unacked, reverse=True):  # appendleft: keep delivery order
                self._return_to_queue(*self._unacked[tag])
            self._unacked.clear()
            for consumer in self._consumers:
                consumer.buffer.clear()
            self._consumers.clear()
            for name in self._own_queues:
                self.server.delete_queue(name)
            self._own_queues.clear()
            self.server.cond.notify_all()

    def abort(self) -> None:
        """Simulate a crash (the socket dropping mid-handler). Nothing is acked on the way
        out; for the embedded broker that is exactly what :meth:`close` does."""
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- helpers ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the embedded broker connection is closed")

    def _usable_queue(self, name: str) -> _Queue:
        queue = self.server.queue(name)
        if queue.owner is not None and queue.owner is not self:
            raise TransportError(f"queue {name} is exclusive to another connection")
        return queue

    @staticmethod
    def _delivery(queue: str, message: _Message, tag: int | None) -> Delivery:
        return Delivery(body=message.body, routing_key=message.routing_key, queue=queue,
                        headers=dict(message.headers), redelivered=message.redelivered,
                        message_id=message.message_id, tag=tag, user_id=message.user_id)
