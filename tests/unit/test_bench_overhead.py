"""``cxr-mq bench``'s round overhead compares rounds after the warm-up ones: the first rounds
of a demo carry TensorFlow's start-up and tracing (tens of seconds, whatever the codec), which
once swamped the ratio (1.28 from round 1 alone against 0.89-0.95 from later rounds)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cxr_mq import bench, demo


def test_the_ratio_leaves_out_the_warm_up_rounds(monkeypatch):
    # the harness's arithmetic only: which rounds count (the demo itself is tested elsewhere)
    walls = {True: [40.0, 12.0, 3.0, 2.0], False: [60.0, 20.0, 3.3, 2.4]}  # plaintext?: rounds
    ran = []

    def fake_run_demo(options, settings):
        ran.append((options.rounds, options.plaintext, options.profile))
        return SimpleNamespace(rounds=[SimpleNamespace(wall_seconds=w, encrypt_seconds=0.0, aggregate_seconds=0.0)
                                       for w in walls[options.plaintext]])

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    result = bench.round_overhead(repeats=2, rounds=4, warm=2)
    assert ran == [(4, True, "threshold"), (4, False, "threshold")] * 2
    assert result["round_wall_seconds_all"] == {"plaintext": [3.0, 2.0] * 2, "encrypted": [3.3, 2.4] * 2}
    assert result["round_overhead_ratio"] == pytest.approx(2.4 / 2.0)
    assert result["round_overhead_ratio_median"] == pytest.approx(2.85 / 2.5)
    assert result["codec_profile"] == "threshold" and result["rounds_not_counted"] == 2
