from cxr_mq.policy import RoundPolicy
from cxr_mq.rounds import ABORTED, COMPLETE, RoundState, update_key

FP = "f" * 64


def state(**kw):
    fields = dict(round=3, quorum=3, min_clients=2, deadline=100.0, n_params=10,
                  key_fingerprint=FP, hospitals=["h1", "h2", "h3"])
    fields.update(kw)
    return RoundState(**fields)


def update(**kw):
    fields = dict(round=3, hospital="h1", sha256="a" * 64, n_samples=7, n_params=10,
                  key_fingerprint=FP, size=1)
    fields.update(kw)
    fields.setdefault("key", update_key(fields["round"], fields["hospital"]))
    return fields


def accept(s, hospital, sha="a" * 64):
    s.accepted.append({"hospital": hospital, "sha256": sha, "n_samples": 1, "key": "k"})


def test_refusals_have_reasons():
    p = RoundPolicy()
    assert p.refuse_reason(None, update(), 0) == "unknown round 3"
    assert p.refuse_reason(state(), update(), 0) is None
    assert "deadline" in p.refuse_reason(state(), update(), 101)
    assert "closed" in p.refuse_reason(state(status=COMPLETE), update(), 0)
    assert "unknown sender" in p.refuse_reason(state(), update(hospital="h9"), 0)
    assert "fingerprint" in p.refuse_reason(state(), update(key_fingerprint="0" * 64), 0)
    assert "wrong shape" in p.refuse_reason(state(), update(n_params=11), 0)
    # an update lives at its own hospital's key for this round, and nowhere else
    for key in (update_key(3, "h2"), update_key(2, "h1"), update_key(3, "h1") + "-copy", "k"):
        assert p.refuse_reason(state(), update(key=key), 0) == (
            f"wrong object key {key!r}: hospital 'h1''s update for round 3 lives only at "
            "'rounds/000003/updates/h1'")
    s = state()
    accept(s, "h1", sha="b" * 64)
    assert "different content" in p.refuse_reason(s, update(), 0)


def test_same_update_twice_is_a_duplicate_not_a_refusal():
    p, s = RoundPolicy(), state()
    accept(s, "h1")
    assert p.refuse_reason(s, update(), 0) is None
    assert p.is_duplicate(s, update())
    assert not p.is_duplicate(s, update(hospital="h2"))


def test_outcome_quorum_deadline_minimum():
    p = RoundPolicy()
    s = state()
    accept(s, "h1")
    assert p.outcome(s, 50) is None
    assert p.outcome(s, 100) == ABORTED
    accept(s, "h2")
    assert p.outcome(s, 50) is None
    assert p.outcome(s, 100) == COMPLETE
    accept(s, "h3")
    assert p.outcome(s, 0) == COMPLETE
    assert p.weight(update(n_samples=42)) == 42


def test_an_update_trained_from_a_different_base_model_is_refused():
    """Server optimizers and SCAFFOLD keep state at the hospitals: one whose state diverged
    starts from another model, says so in start_sha256, and is refused with the reason."""
    p, s = RoundPolicy(), state()
    s.accepted.append({"hospital": "h2", "sha256": "b" * 64, "n_samples": 1, "key": "k",
                       "start_sha256": "1" * 64})
    assert p.refuse_reason(s, update(start_sha256="1" * 64), 0) is None
    reason = p.refuse_reason(s, update(start_sha256="2" * 64), 0)
    assert reason.startswith("diverged base model: 'h1' trained from 2222222222222222…")
    assert "1111111111111111" in reason
