"""What every long-running worker shares: signal handling, decoding and dispatch by schema.

A worker registers one handler per message kind. A message that fails to decode or validate
is dead-lettered with the reason; a handler raises ``Refuse`` for a valid message it will not
use. SIGTERM and SIGINT set the stop event: the current message is finished or requeued and
the process exits 0.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

from cxr_mq import messages
from cxr_mq.log import get_logger
from cxr_mq.transport.base import Broker, Delivery, Refuse


class Worker:
    queue: str
    handlers: dict[str, Callable[[dict, Delivery], None]]

    def __init__(self, broker: Broker, stop: threading.Event | None = None, **context):
        self.broker = broker
        self.stop = stop or threading.Event()
        self.log = get_logger(**context)

    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            self.log.info("shutdown_requested", signal=signal.Signals(signum).name)
            self.stop.set()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def on_delivery(self, delivery: Delivery) -> None:
        try:
            message = messages.decode(delivery.body)
        except messages.MessageError as exc:
            raise Refuse(str(exc)) from None
        handler = self.handlers.get(message["schema"])
        if handler is None:
            raise Refuse(f"{message['schema']} is not for {self.queue}")
        handler(message, delivery)

    def tick(self) -> None:
        """Periodic housekeeping (deadlines); called from the broker's loop."""

    def setup(self) -> None:
        """Declare topology, restore state: called once before consuming."""

    def run(self) -> None:
        self.setup()
        self.broker.consume(self.queue, self.on_delivery, prefetch=1)
        self.log.info("worker_started", queue=self.queue)
        self.broker.run(self.stop, tick=self.tick, tick_interval=1.0)
        self.log.info("worker_stopped")
