"""Two aggregators on one round (a standby that woke up, a paused active one): the round
record's conditional writes make the loser re-read, so no update is lost or counted twice.

Deliveries are handed to each worker directly, in the interleaving under test: B opens the
round, A accepts h1 over B's version, B (still holding the version before h1) tries h2.
"""
from __future__ import annotations

import numpy as np
import pytest

from cxr_mq import messages
from cxr_mq.rounds import COMPLETE, StateConflict
from cxr_mq.transport.base import Delivery
from workerkit import Federation

N_PARAMS = 1000


def _delivery(worker, message: dict, sender: str) -> Delivery:
    return Delivery(body=messages.encode(message), routing_key=message["schema"],
                    queue=worker.queue, user_id=sender)


def test_two_aggregators_on_one_round_lose_nothing_and_count_nothing_twice(tmp_path, codecs):
    fed = Federation(tmp_path, *codecs)
    a, b = fed.aggregator(), fed.aggregator()
    start = fed.open_round(quorum=3)
    pairs = [(np.random.default_rng(i).uniform(-1, 1, N_PARAMS), n) for i, n in enumerate((12, 30, 7))]
    updates = [fed.upload_update(1, h, w, n) for h, (w, n) in zip(fed.hospitals, pairs)]

    b.on_delivery(_delivery(b, start, "controller"))  # B writes the round's first record
    a.on_delivery(_delivery(a, updates[0], "h1"))  # A reads it, accepts h1 over it
    with pytest.raises(StateConflict):  # B's copy predates h1: its write must lose
        b.on_delivery(_delivery(b, updates[1], "h2"))
    assert [x["hospital"] for x in fed.state().accepted] == ["h1"]
    b.on_delivery(_delivery(b, updates[1], "h2"))  # the redelivery, against the stored record
    with pytest.raises(StateConflict):  # now A's copy is the stale one
        a.on_delivery(_delivery(a, updates[2], "h3"))
    a.on_delivery(_delivery(a, updates[2], "h3"))
    state = fed.state()
    assert state.status == COMPLETE and state.contributors == ["h1", "h2", "h3"]
    assert state.total_samples == 49
    fedavg = sum(w * n for w, n in pairs) / 49
    assert np.max(np.abs(fed.decrypt_aggregate() - fedavg)) < 1e-6  # each update once
