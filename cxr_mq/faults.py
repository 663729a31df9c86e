"""Crash points: a test hook that kills the worker at a chosen step (never set in production).

``CXR_MQ_FAULTS`` holds ``;``-separated rules. The ``s3:`` ones are S3 faults (see
:mod:`cxr_mq.storage.s3`); ``crash:<point>[:<n>]`` makes the process SIGKILL itself the
``n``-th time (default: first) it reaches ``point``. Points are named after the step just
completed, e.g. ``hospital.after_training`` (local training done, nothing encrypted or
uploaded), ``hospital.after_publish`` (``update_ready`` is confirmed, ``round_start`` is
not yet acked) or ``aggregator.after_accept`` (the round state with the update is durable,
``update_ready`` is not yet acked). The fault-injection tests use them to kill a worker in
the exact window a guarantee is about, which an outside ``kill`` can only hit by chance.
"""
from __future__ import annotations

import os
import signal

from .log import get_logger

FAULTS_ENV = "CXR_MQ_FAULTS"
POINTS = ("controller.after_claim", "hospital.after_training", "hospital.after_upload", "hospital.after_publish", "aggregator.after_accept",
          "aggregator.after_aggregate", "aggregator.after_complete", "aggregator.after_announce")


class CrashPoints:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get(FAULTS_ENV, "") if spec is None else spec
        self._armed: dict[str, int] = {}
        for rule in filter(None, (r.strip() for r in spec.split(";"))):
            fields = rule.split(":")
            if fields[0] != "crash":
                continue
            if len(fields) not in (2, 3) or fields[1] not in POINTS:
                raise ValueError(f"{FAULTS_ENV}: cannot parse {rule!r} "
                                 f"(want crash:<{'|'.join(POINTS)}>[:<n>])")
            self._armed[fields[1]] = int(fields[2]) if len(fields) == 3 else 1

    def reached(self, point: str, **context) -> None:
        if point not in self._armed:
            return
        self._armed[point] -= 1
        if self._armed[point] == 0:
            get_logger(point=point).warning("crash_point_reached", **context)
            os.kill(os.getpid(), signal.SIGKILL)
