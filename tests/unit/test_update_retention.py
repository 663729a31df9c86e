"""Retention of individual updates in the aggregator, in one process (``workerkit``): what is
deleted when, and what a failed deletion leaves for the next start. The same over the real
broker and store, with restarts, is ``tests/integration/test_retention.py``."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_mq import rounds
from cxr_mq.rounds import COMPLETE
from cxr_mq.storage.base import StoreError


def _upload(fed, round_no, hospital, seed):
    update = fed.upload_update(round_no, hospital, np.random.default_rng(seed).uniform(-1, 1, 1000), 5)
    fed.store.put_bytes(rounds.update_message_key(round_no, hospital), b"manifest")
    return update


def _updates(fed, round_no=1):
    return fed.store.list(rounds.updates_prefix(round_no))


@pytest.mark.parametrize("retain", [False, True])
def test_updates_go_after_the_announcement_and_late_ones_when_refused(fed, retain):
    agg = fed.aggregator(retain_updates=retain)
    fed.open_round(quorum=2)
    fed.publish(_upload(fed, 1, "h1", 1))
    fed.drain(agg)
    assert _updates(fed) == [rounds.update_key(1, "h1"), rounds.update_message_key(1, "h1")]
    fed.publish(_upload(fed, 1, "h2", 2))
    fed.drain(agg)
    state = fed.state()
    assert state.status == COMPLETE and state.announced and state.updates_deleted is not retain
    assert fed.store.exists(state.model_key)
    kept = [rounds.update_key(1, h) for h in ("h1", "h2")] + [rounds.update_message_key(1, h) for h in ("h1", "h2")]
    assert _updates(fed) == ([] if not retain else sorted(kept))
    # h3 uploads after the announcement: refused as closed, and not kept either
    fed.publish(_upload(fed, 1, "h3", 3))
    fed.drain(agg)
    assert [d["reason"] for d in fed.dead_letters()] == ["round 1 is closed (complete)"]
    late = [rounds.update_key(1, "h3"), rounds.update_message_key(1, "h3")]
    assert _updates(fed) == ([] if not retain else sorted(kept + late))


class FailingDeletes:
    """The federation's store, whose deletes fail (an IAM rule without s3:DeleteObject)."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)

    def delete(self, key):
        raise StoreError(f"s3 delete {key} failed (not retryable): AccessDenied")


def test_a_failed_deletion_is_finished_at_the_next_start(fed):
    store = fed.store
    fed.store = FailingDeletes(store)
    agg = fed.aggregator()
    fed.store = store
    fed.open_round(quorum=1)
    fed.publish(_upload(fed, 1, "h1", 1))
    fed.drain(agg)
    state = fed.state()
    assert state.status == COMPLETE and state.announced and not state.updates_deleted
    assert len(_updates(fed)) == 2  # the round completed regardless
    fed.aggregator()  # restarted with a store that may delete
    assert _updates(fed) == [] and fed.state().updates_deleted
