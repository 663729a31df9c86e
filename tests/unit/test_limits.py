"""The round's limits outside the codec (issue 10 item 5): the min_clients floor, the most
contributors a round takes. The codec's own bounds are in test_crypto.py (limits section)."""
from __future__ import annotations

import pytest

from cxr_mq import controller, messages, rounds, training
from cxr_mq.config import ConfigError, load_settings
from cxr_mq.policy import RoundPolicy
from cxr_mq.rounds import RoundState

FP = "f" * 64


def _request(**kw) -> controller.RoundRequest:
    fields = dict(quorum=3, min_clients=3, deadline_seconds=60, training=training.TrainingParams())
    return controller.RoundRequest(**{**fields, **kw})


def test_min_clients_floor_is_3_and_an_operator_may_lower_it():
    assert load_settings(env={}).min_clients_floor == 3
    assert load_settings(env={"CXR_MQ_MIN_CLIENTS_FLOOR": "1"}).min_clients_floor == 1
    with pytest.raises(ConfigError, match="CXR_MQ_MIN_CLIENTS_FLOOR: must be at least 1"):
        load_settings(env={"CXR_MQ_MIN_CLIENTS_FLOOR": "0"})


def test_a_round_below_the_floor_is_refused():
    with pytest.raises(ValueError, match="--min-clients 1 is below the floor of 3"):
        _request(min_clients=1).check()
    with pytest.raises(ValueError, match="--min-clients 2 is below the floor of 3"):
        _request(quorum=2, min_clients=2).check()
    _request(quorum=2, min_clients=2, min_clients_floor=2).check()  # lowered by the operator
    with pytest.raises(ValueError, match="cannot exceed --quorum"):
        _request(quorum=3, min_clients=4).check()
    with pytest.raises(ValueError, match="cannot be below --quorum"):
        _request(quorum=5, min_clients=3, max_contributors=4).check()


def test_round_start_carries_the_most_contributors():
    assert _request(quorum=5).most_contributors == 5
    assert _request(quorum=5, max_contributors=7).most_contributors == 7
    start = dict(round=1, base_model_key="k", base_model_sha256="a" * 64, base_model_encrypted=False,
                 base_total_samples=0, quorum=3, min_clients=3, deadline=10.0,
                 training={"model": "small-cnn", "epochs": 1}, key_fingerprint=FP,
                 codec_profile="compact", n_params=10, hospitals=[], issued_at=1.0)
    assert messages.make("round_start", **start, max_contributors=3)["max_contributors"] == 3
    for bad in (0, 10_001):
        with pytest.raises(messages.MessageError, match="max_contributors"):
            messages.make("round_start", **start, max_contributors=bad)
    state = RoundState.from_round_start({"round": 1, "quorum": 4, "min_clients": 3, "deadline": 1.0,
                                         "n_params": 10, "key_fingerprint": FP, "max_contributors": 6}, 0)
    assert state.most_contributors == 6
    older = RoundState.from_dict({**state.to_dict(), "max_contributors": None})
    assert older.most_contributors == 4  # records without the field: the quorum


def test_the_aggregator_refuses_a_contribution_beyond_the_maximum():
    policy = RoundPolicy()
    state = RoundState(round=3, quorum=5, min_clients=3, deadline=100.0, n_params=10,
                       key_fingerprint=FP, max_contributors=2)
    update = dict(round=3, hospital="h3", key=rounds.update_key(3, "h3"), sha256="a" * 64, n_samples=7, n_params=10,
                  key_fingerprint=FP, size=1)
    assert policy.refuse_reason(state, update, 0) is None
    for hospital in ("h1", "h2"):
        state.accepted.append({"hospital": hospital, "sha256": "b" * 64, "n_samples": 1, "key": "k"})
    assert policy.refuse_reason(state, update, 0) == (
        "round 3 takes at most 2 contributors: one more could make the sum wrap")
