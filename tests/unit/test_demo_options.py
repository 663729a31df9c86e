"""The demo's settings: one place for the defaults, the learning rate across rounds, and what
each round asks the hospitals to do."""
from __future__ import annotations

import pytest

from cxr_mq.config import ConfigError
from cxr_mq.demo import DemoOptions


def test_learning_rate_falls_along_a_cosine_from_the_first_to_the_last_round():
    options = DemoOptions(rounds=5, lr=2e-3, lr_final=4e-4)
    rates = [options.round_lr(r) for r in range(1, 6)]
    assert rates[0] == pytest.approx(2e-3) and rates[-1] == pytest.approx(4e-4)
    assert rates[2] == pytest.approx((2e-3 + 4e-4) / 2)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert DemoOptions(rounds=3, lr=1e-3).round_lr(3) == pytest.approx(1e-4)  # default: lr / 10
    assert DemoOptions(rounds=1, lr=1e-3).round_lr(1) == pytest.approx(1e-3)


def test_each_round_asks_for_its_rate_and_the_demo_s_training_settings():
    options = DemoOptions(rounds=4, lr=3e-3, lr_final=3e-4, server_lr=1.5, width=0.5, augment=False)
    first, last = options.training_params(1), options.training_params(4)
    assert first.lr == pytest.approx(3e-3) and last.lr == pytest.approx(3e-4)
    for params in (first, last):
        assert (params.model, params.width, params.server_lr, params.augment) == \
            (options.model, 0.5, 1.5, False)


@pytest.mark.parametrize("changes, flag", [({"lr_final": 0.0}, "--lr-final"), ({"lr": -1.0}, "--lr"),
                                           ({"server_lr": 0.0}, "--server-lr"),
                                           ({"width": 0.0}, "--width")])
def test_bad_settings_name_their_flag(changes, flag):
    with pytest.raises(ConfigError, match=f"^{flag}"):
        DemoOptions(**changes).validate()


def test_the_cli_leaves_unset_options_to_the_demo_defaults(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from cxr_mq import cli, demo
    seen = {}

    def fake_run(options, settings, view=None):
        seen["options"] = options
        raise demo.DemoError("stop here")
    monkeypatch.setattr(demo, "run_demo", fake_run)
    monkeypatch.setenv("CXR_MQ_WORK_DIR", str(tmp_path))
    result = CliRunner().invoke(cli.main, ["demo", "--epochs", "4"])
    assert "stop here" in result.output
    defaults, options = DemoOptions(), seen["options"]
    assert options.epochs == 4
    for name in ("rounds", "n", "model", "width", "image_size", "lr", "lr_final", "server_lr",
                 "augment", "alpha", "seed", "hospitals"):
        assert getattr(options, name) == getattr(defaults, name), name
