"""RabbitMQ transport over pika: the one place for connect, confirm, ack, retry and dead-letter.

Queues are quorum queues (replicated, durable, with a delivery limit that dead-letters a
poison message instead of redelivering it for ever); messages are persistent and published
with confirms and ``mandatory`` so an unroutable message is an error, not a silent loss.
Handlers are acked only after they return, i.e. after their work is durable.

A lost connection (broker restart, network drop) is re-opened with exponential back-off and
jitter; every reconnect re-declares the topology and the consumers. A delivery is settled
(acked, nacked, dead-lettered) only on the channel it came from: if that channel has gone
(the broker restarted, or closed it for the delivery-acknowledgement timeout while a handler
was busy), the broker has already requeued the message and will deliver it again; acking
its stale tag on a new channel would be a protocol error, so it is left alone. Consumers
are idempotent, so the redelivery is harmless.
"""
from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import pika
import pika.exceptions as pex
from tenacity import (Retrying, retry_if_exception, stop_after_attempt, stop_after_delay,
                      stop_when_event_set, wait_exponential_jitter)

from ..log import get_logger
from .base import (AGGREGATOR_BINDINGS, DELIVERY_LIMIT, HOSPITAL_BINDINGS, ORIGIN_HEADER,
                   REASON_HEADER, USER_HEADER, Broker, Delivery, Handler, Refuse, Requeue, Topology,
                   TransportError)

CONNECTION_ERRORS = (pex.AMQPConnectionError, pex.ConnectionClosed, pex.StreamLostError,
                     pex.ChannelClosed, pex.ChannelWrongStateError, ConnectionError, OSError)
PERMANENT_CHANNEL_CODES = (403, 404, 405, 406)  # access refused, not found, locked, precondition
ACCESS_REFUSED = 403
HANDLER_ERROR_BACKOFF = 2.0
NACK_ATTEMPTS = 5  # a publisher nack means "not stored, try again", e.g. a queue electing a leader


def is_transient(exc: BaseException) -> bool:
    """Connection trouble is retried; a broker's refusal (404, 406, bad credentials) is not,
    nor a broker certificate that fails verification (wrong CA, wrong host name)."""
    if isinstance(exc, (ssl.SSLCertVerificationError, pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError,
                        pex.AuthenticationError)):
        return False
    if isinstance(exc, pex.ChannelClosedByBroker) and exc.reply_code in PERMANENT_CHANNEL_CODES:
        return False
    return isinstance(exc, CONNECTION_ERRORS)


@dataclass(frozen=True)
class TlsOptions:
    """AMQPS settings: the CA that signs the broker's certificate, an optional client
    certificate, and whether a plain ``amqp://`` URL is refused."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    required: bool = False


def connection_parameters(url: str, tls: TlsOptions | None = None) -> pika.URLParameters:
    """pika parameters for ``url``; for ``amqps://`` a context that verifies the broker's
    certificate against the CA and its name against the URL's host (CERT_REQUIRED and
    check_hostname, TLS 1.2 or later). Refuses a plain URL when TLS is set up or required,
    before anything is sent."""
    tls = tls or TlsOptions()
    params = pika.URLParameters(url)
    if params.ssl_options is None:
        if tls.required or tls.ca_file or tls.cert_file:
            why = "TLS is required (amqp_tls_required)" if tls.required else "a TLS CA/certificate is set"
            raise TransportError(f"{why} but the broker URL is plain amqp:// "
                                 f"({params.host}:{params.port}); use amqps://")
        return params
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)  # CERT_REQUIRED, check_hostname
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load the AMQP TLS files (CA {tls.ca_file}, "
                             f"certificate {tls.cert_file}): {exc}") from exc
    params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
    return params


def split_urls(url: str) -> list[str]:
    """``amqp://a,amqp://b``: the nodes of one cluster, tried in this order."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise TransportError("no AMQP URL given")
    return urls


class RabbitMQBroker(Broker):
    def __init__(self, url: str, topology: Topology | None = None, heartbeat: int = 30,
                 reconnect_for: float = 600.0, max_backoff: float = 15.0,
                 tls: TlsOptions | None = None, delivery_limit: int = DELIVERY_LIMIT):
        self.topology = topology or Topology()
        self.delivery_limit = delivery_limit
        # a comma-separated list is a cluster's nodes: each connect tries them in turn
        self._nodes = [connection_parameters(u, tls) for u in split_urls(url)]
        for params in self._nodes:
            params.heartbeat = heartbeat
            params.blocked_connection_timeout = 60
            params.connection_attempts = 1
        self._params = self._nodes[0]
        self._reconnect_for = reconnect_for
        self._max_backoff = max_backoff
        self._hospitals: set[str] = set()
        self._topology_declared = False
        self._passive = False  # set once the broker refuses this login to configure: check only
        # the login's name; None with EXTERNAL (certificate) authentication
        self.user = getattr(self._params.credentials, "username", None)
        self._consumers: dict[str, tuple[Handler, int, Handler | None]] = {}
        # deliveries of consumers with a ``prepare`` step: prepared on arrival, handled in
        # order by run() between polls of the connection
        self._waiting: deque = deque()
        self._temporary: dict[str, tuple[str, ...]] = {}
        self._conn: pika.BlockingConnection | None = None
        self._ch = None
        self._stop: threading.Event | None = None  # set by run(): stop waiting for the broker
        self.reconnects = 0
        self.node: str | None = None  # host:port of the node connected to
        self._connected_once = False
        self._log = get_logger(component="rabbitmq", namespace=self.topology.namespace)

    # -- connection -----------------------------------------------------------------------
    def _retrying(self) -> Retrying:
        stop = stop_after_delay(self._reconnect_for)
        sleep = time.sleep
        if self._stop is not None:
            stop = stop | stop_when_event_set(self._stop)  # a stopping worker stops waiting
            sleep = self._stop.wait
        return Retrying(retry=retry_if_exception(is_transient),
                        wait=wait_exponential_jitter(initial=0.5, max=self._max_backoff),
                        stop=stop, sleep=sleep, reraise=True,
                        before_sleep=lambda rs: self._log.warning(
                            "broker_unreachable", attempt=rs.attempt_number,
                            error=repr(rs.outcome.exception())))

    def _open(self) -> None:
        self._drop()
        conn = pika.BlockingConnection(self._nodes)
        node = getattr(getattr(conn, "_impl", None), "params", None)
        self.node = f"{node.host}:{node.port}" if node is not None else None
        ch = conn.channel()
        ch.confirm_delivery()
        self._conn, self._ch = conn, ch
        if self._topology_declared:
            self._ensure_topology()
            ch = self._ch
            self._log.info("topology_declared", reconnect=self._connected_once, passive=self._passive,
                           hospitals=sorted(self._hospitals))
        for queue, keys in self._temporary.items():
            # exclusive queues die with their connection: recreate under the same name
            ch.queue_declare(queue, exclusive=True, auto_delete=True)
            for key in keys:
                ch.queue_bind(queue, self.topology.control_exchange, routing_key=key)
        for queue, consumer in self._consumers.items():
            self._start_consumer(queue, *consumer)

    def _channel(self):
        if self._ch is None or not self._ch.is_open or not self._conn.is_open:
            for attempt in self._retrying():
                with attempt:
                    self._open()
            if self._connected_once:
                self.reconnects += 1
                self._log.info("broker_reconnected", reconnects=self.reconnects, node=self.node)
            self._connected_once = True
        return self._ch

    def _drop(self) -> None:
        conn, self._conn, self._ch = self._conn, None, None
        self._waiting.clear()  # their channel is gone: the broker delivers them again
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - the connection is being thrown away anyway
                pass

    def _with_retry(self, operation: Callable):
        try:
            for attempt in self._retrying():
                with attempt:
                    try:
                        return operation(self._channel())
                    except CONNECTION_ERRORS as exc:
                        if is_transient(exc):
                            self._drop()
                        raise
        except pex.ChannelClosedByBroker as exc:
            self._reopen_channel()
            raise TransportError(f"broker refused: {exc.reply_code} {exc.reply_text}") from exc
        except (pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError,
                pex.AuthenticationError) as exc:
            raise TransportError(f"broker refused the credentials: {exc!r}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(f"broker certificate refused ({self._params.host}:"
                                 f"{self._params.port}): {exc.verify_message}") from exc

    def _reopen_channel(self) -> None:
        """A refused operation closes only the channel: open a new one on the same connection,
        so exclusive queues (which belong to the connection) survive."""
        if self._conn is None or not self._conn.is_open:
            return
        self._waiting.clear()  # they were on the closed channel: the broker delivers them again
        try:
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
            for queue, consumer in self._consumers.items():
                self._start_consumer(queue, *consumer)
        except CONNECTION_ERRORS:
            self._drop()

    # -- topology -------------------------------------------------------------------------
    def _queue_args(self) -> dict:
        return {"x-queue-type": "quorum", "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": self.topology.dead_letter_exchange}

    def _declare(self, ch) -> None:
        t = self.topology
        ch.exchange_declare(t.control_exchange, exchange_type="topic", durable=True)
        ch.exchange_declare(t.dead_letter_exchange, exchange_type="fanout", durable=True)
        ch.queue_declare(t.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(t.dead_letter_queue, t.dead_letter_exchange)
        queues = [(t.aggregator_queue, AGGREGATOR_BINDINGS)]
        queues += [(t.hospital_queue(h), HOSPITAL_BINDINGS) for h in sorted(self._hospitals)]
        for queue, keys in queues:
            ch.queue_declare(queue, durable=True, arguments=self._queue_args())
            for key in keys:
                ch.queue_bind(queue, t.control_exchange, routing_key=key)

    def _check(self, ch) -> None:
        """What a login without configure permission can do: make sure the topology the admin
        declared is there (passive declares need no permission)."""
        t = self.topology
        for exchange in (t.control_exchange, t.dead_letter_exchange):
            ch.exchange_declare(exchange, passive=True)
        for queue in [t.aggregator_queue, t.dead_letter_queue] + [
                t.hospital_queue(h) for h in sorted(self._hospitals)]:
            ch.queue_declare(queue, passive=True)

    def _ensure_topology(self) -> None:
        """Declare the topology on the current channel; if this login may not configure it
        (least privilege), check passively that it exists. Either failure is permanent."""
        try:
            (self._check if self._passive else self._declare)(self._ch)
            return
        except pex.ChannelClosedByBroker as exc:
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
            if exc.reply_code == 404:
                raise TransportError(f"broker topology missing ({exc.reply_text}): an admin must "
                                     "run 'cxr-mq broker declare'") from exc
            if exc.reply_code != ACCESS_REFUSED or self._passive:
                raise TransportError(f"broker refused: {exc.reply_code} {exc.reply_text}") from exc
        self._passive = True
        self._log.info("topology_not_configurable_checking_passively", user=self.user)
        try:
            self._check(self._ch)
        except pex.ChannelClosedByBroker as exc:
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
            raise TransportError(f"broker topology missing ({exc.reply_text}): an admin must "
                                 "run 'cxr-mq broker declare'") from exc

    def declare_topology(self, hospitals: Iterable[str] = ()) -> None:
        self._hospitals.update(hospitals)
        self._topology_declared = True
        self._with_retry(lambda ch: self._ensure_topology())

    def delete_topology(self, hospitals: Iterable[str] = ()) -> None:
        """Remove this namespace's queues and exchanges (tests and decommissioning)."""
        t = self.topology
        names = [t.aggregator_queue, t.dead_letter_queue]
        names += [t.hospital_queue(h) for h in set(hospitals) | self._hospitals]

        def delete(ch):
            for name in names:
                ch.queue_delete(name)
            ch.exchange_delete(t.control_exchange)
            ch.exchange_delete(t.dead_letter_exchange)
        self._with_retry(delete)

    # -- publishing -----------------------------------------------------------------------
    def publish(self, routing_key: str, body: bytes, headers: dict | None = None,
                message_id: str | None = None) -> None:
        props = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                     content_type="application/msgpack", headers=headers or {},
                                     message_id=message_id, timestamp=int(time.time()),
                                     user_id=self.user)  # RabbitMQ refuses any other user_id

        def send(ch):
            ch.basic_publish(self.topology.control_exchange, routing_key, body, props, mandatory=True)
        nacked = Retrying(retry=retry_if_exception(lambda e: isinstance(e, pex.NackError)),
                          wait=wait_exponential_jitter(initial=0.2, max=2.0),
                          stop=stop_after_attempt(NACK_ATTEMPTS), reraise=True)
        try:
            nacked(lambda: self._with_retry(send))
        except (pex.UnroutableError, pex.NackError) as exc:
            raise TransportError(f"broker refused {routing_key}: {type(exc).__name__}") from exc
        except CONNECTION_ERRORS as exc:
            raise TransportError(f"could not publish {routing_key}: {exc!r}") from exc

    def _dead_letter(self, ch, method, props, body: bytes, queue: str, reason: str) -> None:
        headers = dict(props.headers or {})
        headers.update({REASON_HEADER: reason[:1000], ORIGIN_HEADER: queue,
                        "x-cxr-routing-key": method.routing_key})
        if props.user_id:  # the republished copy is ours; keep who sent the original
            headers[USER_HEADER] = props.user_id
        dead = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                    content_type=props.content_type, headers=headers,
                                    message_id=props.message_id, timestamp=int(time.time()))
        ch.basic_publish(self.topology.dead_letter_exchange, "", body, dead, mandatory=True)
        ch.basic_ack(method.delivery_tag)

    # -- consuming ------------------------------------------------------------------------
    def consume(self, queue: str, handler: Handler, prefetch: int = 1,
                prepare: Handler | None = None) -> None:
        if self._ch is not None and self._ch.is_open:
            try:
                self._start_consumer(queue, handler, prefetch, prepare)
            except pex.ChannelClosedByBroker as exc:
                self._reopen_channel()
                raise TransportError(f"cannot consume from {queue}: {exc.reply_text}") from exc
            except CONNECTION_ERRORS as exc:
                if not is_transient(exc):
                    raise
                # the connection died since its last use (a broker restart while the worker
                # set up): run() reconnects and starts every consumer, this one included
                self._log.warning("broker_connection_lost", error=repr(exc))
                self._drop()
        self._consumers[queue] = (handler, prefetch, prepare)

    def _start_consumer(self, queue: str, handler: Handler, prefetch: int,
                        prepare: Handler | None = None) -> None:
        ch = self._ch
        ch.basic_qos(prefetch_count=prefetch)

        def on_message(channel, method, props, body):
            delivery = Delivery(body=body, routing_key=method.routing_key, queue=queue,
                                headers=dict(props.headers or {}), redelivered=method.redelivered,
                                message_id=props.message_id, tag=method.delivery_tag,
                                user_id=props.user_id)
            if prepare is None:
                self._dispatch(channel, method, props, delivery, handler)
                return
            try:
                prepare(delivery)
            except Exception as exc:  # noqa: BLE001 - an optimisation only: the handler decides
                self._log.warning("prepare_failed", queue=queue, error=repr(exc))
            self._waiting.append((channel, method, props, delivery, handler))
        ch.basic_consume(queue, on_message, auto_ack=False)

    def _dispatch(self, ch, method, props, delivery: Delivery, handler: Handler) -> None:
        body, queue = delivery.body, delivery.queue
        try:
            handler(delivery)
        except Refuse as exc:
            reason = exc.reason
            self._log.warning("message_dead_lettered", queue=queue, reason=reason,
                              routing_key=method.routing_key)
            self._settle(ch, lambda: self._dead_letter(ch, method, props, body, queue, reason))
            return
        except Requeue:
            self._settle(ch, lambda: ch.basic_nack(method.delivery_tag, requeue=True))
            return
        except CONNECTION_ERRORS:
            if ch is self._ch:
                raise  # the message stays unacked and comes back after reconnecting
            self._log.warning("delivery_channel_gone_will_be_redelivered", queue=queue,
                              routing_key=method.routing_key)
            return
        except Exception as exc:  # noqa: BLE001 - transient by default: never lose the message
            self._log.exception("handler_failed_requeueing", queue=queue, error=repr(exc))
            self.sleep(HANDLER_ERROR_BACKOFF)
            self._settle(ch, lambda: ch.basic_nack(method.delivery_tag, requeue=True))
            return
        self._settle(ch, lambda: ch.basic_ack(method.delivery_tag))

    def _settle(self, ch, action: Callable[[], None]) -> None:
        if ch is not self._ch or not ch.is_open:
            # the delivery's channel is gone (broker restart, or the broker's delivery
            # acknowledgement timeout closed it while the handler worked): the broker has
            # requeued the message already; its tag means nothing on any other channel
            self._log.warning("delivery_channel_gone_will_be_redelivered",
                              reconnects=self.reconnects)
            return
        try:
            action()
        except CONNECTION_ERRORS as exc:
            # the broker redelivers what we could not settle; consumers are idempotent
            self._log.warning("settle_failed_will_be_redelivered", error=repr(exc))
            self._drop()

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None,
            tick_interval: float = 1.0) -> None:
        self._stop = stop
        next_tick = time.monotonic()
        while not stop.is_set():
            try:
                self._channel()
                # prepared deliveries waiting: only collect what has arrived, then handle one
                self._conn.process_data_events(
                    time_limit=0 if self._waiting else min(0.5, tick_interval))
                if self._waiting:
                    self._dispatch(*self._waiting.popleft())
                if tick is not None and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + tick_interval
                    tick()
            except CONNECTION_ERRORS as exc:
                if not is_transient(exc):
                    self._drop()
                    raise TransportError(f"broker refused: {exc!r}") from exc
                self._log.warning("broker_connection_lost", error=repr(exc))
                self._drop()
        self._cancel_consumers()

    def _cancel_consumers(self) -> None:
        if self._ch is not None and self._ch.is_open:
            try:
                self._ch.cancel()  # returns prefetched, unacked messages to the queue
            except Exception:  # noqa: BLE001
                pass

    def sleep(self, seconds: float) -> None:
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.sleep(seconds)
                return
            except CONNECTION_ERRORS:
                self._drop()
        time.sleep(seconds)

    # -- request/response helpers ---------------------------------------------------------
    def temporary_queue(self, routing_keys: Iterable[str]) -> str:
        keys = tuple(routing_keys)

        # client-named: a reconnect re-declares it under this name (a server-named
        # ``amq.gen-`` name is reserved and would be refused with 403)
        name = f"{self.topology.namespace}.reply.{uuid.uuid4().hex}"

        def declare(ch):
            ch.queue_declare(name, exclusive=True, auto_delete=True)
            for key in keys:
                ch.queue_bind(name, self.topology.control_exchange, routing_key=key)
        self._with_retry(declare)
        self._temporary[name] = keys
        return name

    def get(self, queue: str, timeout: float) -> Delivery | None:
        deadline = time.monotonic() + timeout
        while True:
            method, props, body = self._with_retry(lambda ch: ch.basic_get(queue, auto_ack=True))
            if method is not None:
                return Delivery(body=body, routing_key=method.routing_key, queue=queue,
                                headers=dict(props.headers or {}), redelivered=method.redelivered,
                                message_id=props.message_id, user_id=props.user_id)
            if time.monotonic() >= deadline:
                return None
            self.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def queue_depth(self, queue: str) -> int:
        return self._with_retry(lambda ch: ch.queue_declare(queue, passive=True).method.message_count)

    def close(self) -> None:
        self._consumers.clear()
        self._drop()
