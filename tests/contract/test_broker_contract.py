"""One broker contract, run against the embedded broker and the real RabbitMQ.

Whatever a worker relies on is asserted here, so the embedded broker (demo, unit tests) and
RabbitMQ (production) cannot drift apart. Every wait is bounded: a broken broker fails a test,
it never hangs the suite. A broker is used by one thread at a time (pika is not thread-safe):
while a consumer runs in its own thread the test talks to the broker through other instances.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from cxr_mq.transport.base import (ORIGIN_HEADER, REASON_HEADER, Delivery, Refuse, Requeue,
                                   Topology, TransportError)

HOSPITALS = ("h1", "h2")
WAIT = 10.0  # upper bound for anything that should happen "soon"
RETRY_WAIT = 30.0  # upper bound when a handler error makes the broker back off first


@pytest.fixture(params=["embedded", "rabbitmq"])
def broker_factory(request, namespace):
    """``make()`` returns a new broker connection on this test's namespace; all are closed,
    and the namespace's queues deleted, at teardown."""
    topology = Topology(namespace)
    if request.param == "embedded":
        from cxr_mq.transport.embedded import EmbeddedBroker, EmbeddedServer

        server = EmbeddedServer()

        def connect(**options):
            return EmbeddedBroker(server, topology=topology, **options)
    else:
        from cxr_mq.transport.rabbitmq import RabbitMQBroker

        url = request.getfixturevalue("amqp_url")

        def connect(**options):
            return RabbitMQBroker(url, topology=topology, **options)

    made = []

    def make(declare: bool = True, **options):
        broker = connect(**options)
        made.append(broker)
        if declare:
            broker.declare_topology(HOSPITALS)
        return broker

    make.kind = request.param
    make.topology = topology
    yield make
    for broker in made:
        try:
            broker.close()
        except Exception:  # noqa: BLE001 - a test may have closed or broken it already
            pass
    cleaner = connect()
    try:
        if hasattr(cleaner, "delete_topology"):
            cleaner.delete_topology(HOSPITALS)
    finally:
        cleaner.close()


class Runner:
    """``broker.run`` on a daemon thread, with a bounded stop."""

    def __init__(self, broker, tick=None, tick_interval: float = 1.0):
        self.broker = broker
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(tick, tick_interval), daemon=True)

    def _run(self, tick, tick_interval):
        try:
            self.broker.run(self.stop, tick, tick_interval)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def start(self) -> "Runner":
        self._thread.start()
        return self

    def finish(self, timeout: float = WAIT, check: bool = True) -> float:
        """Set stop and wait for run() to return; returns how long that took."""
        started = time.monotonic()
        self.stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"run() did not return within {timeout}s of stop"
        if check and self.error is not None:
            raise AssertionError(f"run() raised {self.error!r}") from self.error
        return time.monotonic() - started

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class Recorder:
    """A handler that records deliveries; ``behaviour(delivery, n)`` may raise."""

    def __init__(self, behaviour=None):
        self.deliveries: list[Delivery] = []
        self.behaviour = behaviour
        self.changed = threading.Condition()

    def __call__(self, delivery: Delivery) -> None:
        with self.changed:
            self.deliveries.append(delivery)
            self.changed.notify_all()
        if self.behaviour is not None:
            self.behaviour(delivery, len(self.deliveries))

    def wait_for(self, count: int, timeout: float = WAIT) -> list[Delivery]:
        with self.changed:
            ok = self.changed.wait_for(lambda: len(self.deliveries) >= count, timeout)
        assert ok, f"expected {count} deliveries within {timeout}s, got {len(self.deliveries)}"
        return list(self.deliveries)


def consume_until_drained(consumer, publisher, queue: str, recorder: "Recorder", count: int,
                          timeout: float = WAIT, **consume_options) -> list[Delivery]:
    """Consume ``queue`` with ``recorder`` until it holds ``count`` deliveries and ``publisher``
    sees the queue empty, stop ``run()``, then close ``consumer`` (its acks must be final by
    then: closing returns nothing to the queue). Returns the deliveries."""
    consumer.consume(queue, recorder, **consume_options)
    runner = Runner(consumer).start()
    try:
        delivered = recorder.wait_for(count, timeout=timeout)
        assert wait_until(lambda: publisher.queue_depth(queue) == 0)
    finally:
        runner.finish(timeout=timeout)
    consumer.close()
    return delivered


def wait_until(predicate, timeout: float = WAIT, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def body() -> bytes:
    return f"msg-{uuid.uuid4().hex}".encode()


def all_queues(topology: Topology) -> dict[str, str]:
    queues = {"aggregator": topology.aggregator_queue}
    queues.update({h: topology.hospital_queue(h) for h in HOSPITALS})
    return queues


# -- routing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("routing_key, receivers", [
    ("round_start", {"aggregator", "h1", "h2"}),
    ("update_ready", {"aggregator"}),
    ("model_ready", {"h1", "h2"}),
    ("round_aborted", {"h1", "h2"}),
])
def test_control_messages_reach_exactly_their_bound_queues(broker_factory, routing_key, receivers):
    broker = broker_factory()
    payload = body()
    broker.publish(routing_key, payload)  # no consumer yet: the queues must keep it

    queues = all_queues(broker_factory.topology)
    for name in sorted(receivers):
        got = broker.get(queues[name], timeout=WAIT)
        assert got is not None, f"{routing_key} did not reach {name}"
        assert (got.body, got.routing_key, got.queue) == (payload, routing_key, queues[name])
    for name in sorted(set(queues) - receivers):
        assert broker.queue_depth(queues[name]) == 0, f"{routing_key} wrongly reached {name}"
    assert broker.queue_depth(broker_factory.topology.dead_letter_queue) == 0


def test_queue_depth_counts_ready_messages(broker_factory):
    broker = broker_factory()
    queue = broker_factory.topology.aggregator_queue
    assert broker.queue_depth(queue) == 0
    for _ in range(3):
        broker.publish("update_ready", body())
    assert wait_until(lambda: broker.queue_depth(queue) == 3)


def test_unroutable_publish_is_an_error_not_a_silent_loss(broker_factory):
    broker = broker_factory()
    with pytest.raises(TransportError):
        broker.publish("no_such_message_type", body())


def test_message_id_and_headers_survive(broker_factory):
    publisher, consumer = broker_factory(), broker_factory()
    headers = {"x-cxr-schema": "update_ready", "x-cxr-version": 1, "x-cxr-round": "r-0007"}
    publisher.publish("update_ready", b"via-get", headers=headers, message_id="mid-get")
    publisher.publish("update_ready", b"via-run", headers=headers, message_id="mid-run")
    queue = broker_factory.topology.aggregator_queue

    got = consumer.get(queue, timeout=WAIT)
    assert got is not None and got.body == b"via-get"
    assert got.message_id == "mid-get"
    assert {k: got.headers.get(k) for k in headers} == headers
    assert got.redelivered is False

    recorder = Recorder()
    consumer.consume(queue, recorder)
    runner = Runner(consumer).start()
    try:
        [delivered] = recorder.wait_for(1)
    finally:
        runner.finish()
    assert delivered.body == b"via-run" and delivered.message_id == "mid-run"
    assert {k: delivered.headers.get(k) for k in headers} == headers
    assert delivered.queue == queue and delivered.routing_key == "update_ready"
    assert delivered.redelivered is False


# -- acknowledgement ----------------------------------------------------------------------------

def test_handled_message_is_acked_and_gone(broker_factory):
    publisher, consumer = broker_factory(), broker_factory()
    queue = broker_factory.topology.aggregator_queue
    payloads = [body() for _ in range(3)]
    for payload in payloads:
        publisher.publish("update_ready", payload)

    delivered = consume_until_drained(consumer, publisher, queue, Recorder(), 3, prefetch=2)

    assert sorted(d.body for d in delivered) == sorted(payloads)
    assert not any(d.redelivered for d in delivered)
    time.sleep(0.3)
    assert publisher.queue_depth(queue) == 0
    assert broker_factory().get(queue, timeout=0.5) is None


def test_refused_message_is_dead_lettered_with_reason_and_origin(broker_factory):
    publisher, consumer = broker_factory(), broker_factory()
    topology = broker_factory.topology
    queue = topology.hospital_queue("h1")
    publisher.publish("model_ready", b"bad", headers={"x-cxr-schema": "model_ready"},
                      message_id="refuse-me")

    def refuse(delivery, n):
        raise Refuse("schema model_ready v1: 'key' is a required property")

    recorder = Recorder(refuse)
    consumer.consume(queue, recorder)
    runner = Runner(consumer).start()
    try:
        recorder.wait_for(1)
        dead = publisher.get(topology.dead_letter_queue, timeout=WAIT)
    finally:
        runner.finish()
    consumer.close()

    assert dead is not None, "refused message did not reach the dead-letter queue"
    assert dead.body == b"bad"
    assert dead.headers[REASON_HEADER] == "schema model_ready v1: 'key' is a required property"
    assert dead.headers[ORIGIN_HEADER] == queue
    assert dead.headers.get("x-cxr-schema") == "model_ready"
    assert dead.message_id == "refuse-me"
    assert len(recorder.deliveries) == 1, "a refused message must not be redelivered"
    assert publisher.queue_depth(queue) == 0
    assert publisher.queue_depth(topology.dead_letter_queue) == 0


@pytest.mark.parametrize("failure", [Requeue, RuntimeError], ids=["requeue", "unexpected-error"])
def test_requeued_or_failed_message_is_redelivered_not_lost(broker_factory, failure):
    publisher, consumer = broker_factory(), broker_factory()
    queue = broker_factory.topology.aggregator_queue
    publisher.publish("update_ready", b"flaky", message_id="flaky-1")

    def fail_first_time(delivery, n):
        if n == 1:
            raise failure("not now")

    recorder = Recorder(fail_first_time)
    first, second = consume_until_drained(consumer, publisher, queue, recorder, 2, timeout=RETRY_WAIT)[:2]

    assert (first.body, first.redelivered) == (b"flaky", False)
    assert (second.body, second.redelivered, second.message_id) == (b"flaky", True, "flaky-1")
    assert len(recorder.deliveries) == 2, "handled message was delivered again"
    assert publisher.queue_depth(queue) == 0
    assert publisher.queue_depth(broker_factory.topology.dead_letter_queue) == 0


def test_a_message_failing_on_every_delivery_is_dead_lettered_after_the_delivery_limit(
        broker_factory, monkeypatch):
    """A poison message: the handler fails on every delivery. The queue's delivery limit
    (x-delivery-limit on RabbitMQ's quorum queues) must end its loop in the dead-letter queue;
    without it RabbitMQ (3.10 here has no default) redelivers it for ever."""
    from cxr_mq.transport import rabbitmq

    monkeypatch.setattr(rabbitmq, "HANDLER_ERROR_BACKOFF", 0.05)
    limit = 2
    broker = broker_factory(delivery_limit=limit)
    broker.retry_delay = broker.max_retry_delay = 0.05  # embedded: its back-off
    payload = body()
    broker.publish("update_ready", payload, message_id="poison")

    def always_fail(delivery, n):
        raise RuntimeError(f"handler fails on delivery {n}")
    recorder = Recorder(always_fail)
    broker.consume(broker_factory.topology.aggregator_queue, recorder)
    runner = Runner(broker).start()
    try:
        recorder.wait_for(limit + 1, timeout=RETRY_WAIT)
        observer = broker_factory(declare=False)
        dead = observer.get(broker_factory.topology.dead_letter_queue, timeout=RETRY_WAIT)
    finally:
        runner.finish()
    assert dead is not None, (
        f"a message failing on every delivery was delivered {len(recorder.deliveries)} times and "
        f"never dead-lettered: the queue has no delivery limit (x-delivery-limit)")
    assert dead.body == payload and dead.message_id == "poison"
    deaths = dead.headers.get("x-death") or []
    reasons = [d.get("reason") for d in deaths]
    assert reasons and reasons[0] in ("delivery_limit", b"delivery_limit"), dead.headers
    assert len(recorder.deliveries) == limit + 1, \
        f"{len(recorder.deliveries)} deliveries for a delivery limit of {limit}"
    assert broker.queue_depth(broker_factory.topology.aggregator_queue) == 0


def test_unacked_message_is_redelivered_when_its_consumer_goes_away(broker_factory):
    publisher, doomed, survivor = broker_factory(), broker_factory(), broker_factory()
    queue = broker_factory.topology.aggregator_queue
    publisher.publish("update_ready", b"in-flight", message_id="crash-1")

    entered, release = threading.Event(), threading.Event()

    def block(delivery, n):
        entered.set()
        release.wait(WAIT)

    first = Recorder(block)
    doomed.consume(queue, first)
    runner = Runner(doomed).start()
    try:
        assert entered.wait(WAIT), "the message was never delivered"
        getattr(doomed, "abort", doomed.close)()  # the worker dies mid-handler
    finally:
        release.set()  # the handler "returns" after its connection is gone: no ack may land
        runner.finish(check=False)

    assert wait_until(lambda: publisher.queue_depth(queue) == 1), \
        "the unacked message did not return to its queue"
    second = Recorder()
    survivor.consume(queue, second)
    runner = Runner(survivor).start()
    try:
        [again] = second.wait_for(1)
        assert wait_until(lambda: publisher.queue_depth(queue) == 0)
    finally:
        runner.finish()
    assert (again.body, again.message_id, again.redelivered) == (b"in-flight", "crash-1", True)
    assert len(first.deliveries) == 1


def test_prefetched_messages_return_when_consumer_closes(broker_factory):
    publisher, consumer = broker_factory(), broker_factory()
    queue = broker_factory.topology.aggregator_queue
    for i in range(3):
        publisher.publish("update_ready", f"m{i}".encode())

    entered, release = threading.Event(), threading.Event()

    def block(delivery, n):
        entered.set()
        release.wait(WAIT)
        raise Requeue()

    consumer.consume(queue, Recorder(block), prefetch=3)
    runner = Runner(consumer).start()
    try:
        assert entered.wait(WAIT)
        # Two more sit prefetched behind the one in the handler; none is ready any more.
        assert wait_until(lambda: publisher.queue_depth(queue) == 0)
    finally:
        runner.stop.set()  # so the loop ends after this one handler instead of taking more
        release.set()
        runner.finish()
    consumer.close()

    assert wait_until(lambda: publisher.queue_depth(queue) == 3), "prefetched messages were lost"
    got = [publisher.get(queue, timeout=WAIT) for _ in range(3)]
    assert sorted(d.body for d in got) == [b"m0", b"m1", b"m2"]


def test_prepare_looks_ahead_while_handlers_stay_one_at_a_time_in_order(broker_factory):
    """``prepare`` sees each delivery before its handler and, with a prefetch window, while
    an earlier one is still being handled; handlers still run one at a time in order and
    settle as usual; a failing ``prepare`` changes nothing about its message."""
    publisher, consumer = broker_factory(), broker_factory()
    queue = broker_factory.topology.aggregator_queue
    payloads = [f"m{i}".encode() for i in range(5)]
    for payload in payloads:
        publisher.publish("update_ready", payload)

    prepared: list[bytes] = []
    seen_ahead: dict[bytes, list[bytes]] = {}  # handled message -> what was prepared by then
    busy = threading.Lock()

    def prepare(delivery):
        prepared.append(delivery.body)
        if delivery.body == b"m2":
            raise RuntimeError("a look-ahead that fails")

    def work(delivery, n):
        assert busy.acquire(blocking=False), "two handlers at once"
        try:
            seen_ahead[delivery.body] = list(prepared)
            if delivery.body == b"m0":
                time.sleep(0.2)  # the work during which the next ones arrive
            if delivery.body == b"m3":
                raise Refuse("refused as usual")
        finally:
            busy.release()

    delivered = consume_until_drained(consumer, publisher, queue, Recorder(work), 5,
                                      prefetch=3, prepare=prepare)

    assert [d.body for d in delivered] == payloads  # in order, each once
    assert prepared == payloads  # each prepared once, in arrival order
    for body, ahead in seen_ahead.items():
        assert body in ahead, f"{body!r} handled before it was prepared"
    assert any(len(ahead) > payloads.index(body) + 1 for body, ahead in seen_ahead.items()), \
        f"no handler ran with a later message prepared: {seen_ahead}"
    dead = publisher.get(broker_factory.topology.dead_letter_queue, timeout=WAIT)
    assert dead is not None and dead.body == b"m3", dead
    assert dead.headers[REASON_HEADER] == "refused as usual"
    assert publisher.queue_depth(broker_factory.topology.dead_letter_queue) == 0
    assert publisher.get(queue, timeout=0.5) is None  # the rest were acked: nothing came back


# -- temporary queues and get -----------------------------------------------------------------

def test_temporary_queue_get_with_timeout(broker_factory):
    waiter, publisher = broker_factory(), broker_factory()
    queue = waiter.temporary_queue(["model_ready", "round_aborted"])

    started = time.monotonic()
    assert waiter.get(queue, timeout=0.5) is None
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5, f"get(timeout=0.5) took {elapsed:.2f}s"

    publisher.publish("round_aborted", b"aborted", message_id="abort-1")
    got = waiter.get(queue, timeout=WAIT)
    assert got is not None and (got.body, got.message_id) == (b"aborted", "abort-1")
    assert got.routing_key == "round_aborted"
    assert waiter.get(queue, timeout=0) is None  # auto-acked: taken once only


def test_get_waits_for_a_message_published_meanwhile(broker_factory):
    waiter, publisher = broker_factory(), broker_factory()
    queue = waiter.temporary_queue(["model_ready"])
    timer = threading.Timer(0.5, publisher.publish, args=("model_ready", b"late"))
    timer.start()
    try:
        got = waiter.get(queue, timeout=WAIT)
    finally:
        timer.cancel()
        timer.join(WAIT)
    assert got is not None and got.body == b"late"


def test_temporary_queue_is_exclusive_and_deleted_on_close(broker_factory):
    waiter, other = broker_factory(), broker_factory()
    queue = waiter.temporary_queue(["cxr_contract_probe"])  # bound by nothing else
    other.publish("cxr_contract_probe", b"x")
    assert wait_until(lambda: waiter.queue_depth(queue) == 1)
    with pytest.raises(TransportError):
        broker_factory().get(queue, timeout=0)  # another connection may not take from it

    waiter.close()
    # With its only queue gone the routing key is unroutable, which publish reports.
    def gone():
        try:
            other.publish("cxr_contract_probe", b"y")
        except TransportError:
            return True
        return False
    assert wait_until(gone), "temporary queue still exists after its connection closed"


def test_unknown_queue_is_an_error(broker_factory):
    broker = broker_factory()
    missing = f"{broker_factory.topology.namespace}.no-such-queue"
    with pytest.raises(TransportError):
        broker.queue_depth(missing)
    with pytest.raises(TransportError):
        broker_factory().get(missing, timeout=0)


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "not-yet-connected"])
def test_consuming_an_unknown_queue_fails_loudly(broker_factory, connected):
    broker_factory()  # declares the topology
    broker = broker_factory(declare=connected)
    missing = f"{broker_factory.topology.namespace}.no-such-queue"
    try:
        broker.consume(missing, Recorder())
    except TransportError:
        return
    runner = Runner(broker).start()
    failed = wait_until(lambda: not runner.alive, timeout=WAIT)
    runner.finish(check=False)
    assert failed and isinstance(runner.error, TransportError), \
        f"consume/run on a missing queue neither raised nor stopped (run error: {runner.error!r})"


# -- the run loop -------------------------------------------------------------------------------

def test_tick_is_called_during_run(broker_factory):
    broker = broker_factory()
    broker.consume(broker_factory.topology.aggregator_queue, Recorder())
    ticks = []
    runner = Runner(broker, tick=lambda: ticks.append(time.monotonic()), tick_interval=0.1).start()
    try:
        assert wait_until(lambda: len(ticks) >= 3), f"tick called {len(ticks)} times"
    finally:
        runner.finish()


def test_run_returns_promptly_when_stop_is_set(broker_factory):
    broker = broker_factory()
    broker.consume(broker_factory.topology.aggregator_queue, Recorder())
    runner = Runner(broker, tick_interval=30.0).start()
    time.sleep(0.3)
    assert runner.alive, f"run() returned before stop was set: {runner.error!r}"
    took = runner.finish(timeout=WAIT)
    assert took < 2.0, f"run() took {took:.2f}s to notice stop"

    already = threading.Event()
    already.set()
    started = time.monotonic()
    broker.run(already, tick_interval=30.0)
    assert time.monotonic() - started < 2.0


def test_handler_may_publish_and_messages_keep_flowing(broker_factory):
    """A hospital publishes update_ready from inside its round_start handler."""
    hospital, aggregator = broker_factory(), broker_factory()
    topology = broker_factory.topology
    aggregator.publish("round_start", b"round-1")

    def answer(delivery, n):
        hospital.publish("update_ready", b"update-from-h1", message_id="h1-round-1")

    recorder = Recorder(answer)
    hospital.consume(topology.hospital_queue("h1"), recorder)
    runner = Runner(hospital).start()
    try:
        recorder.wait_for(1)
        got = [aggregator.get(topology.aggregator_queue, timeout=WAIT) for _ in range(2)]
    finally:
        runner.finish()
    assert [d.body for d in got] == [b"round-1", b"update-from-h1"]
    assert got[1].message_id == "h1-round-1"
