"""bench-federated's report: --federated-only runs get the gap to the central run of their
seed, rows are labelled with the parameters the strategy was given, and the curves plot."""
from __future__ import annotations

import json

from cxr_mq.central_bench import load_results, plot_curves, summary_table


def _run(seed, alpha, strategy, params, acc, central=None, server_lr=1.0):
    return {
        "setup": {"seed": seed, "n": 720, "total_epochs": 16, "alpha": alpha, "strategy": strategy,
                  "strategy_params": params, "server_lr": server_lr},
        "central": None if central is None else {"summary": {"accuracy": central},
                                                 "history": [{"epoch": 1, "accuracy": central}]},
        "federated": {"test": {"accuracy": acc}, "history": [{"round": 1, "accuracy": acc}]},
        "accuracy_gap_points": None if central is None else round(100 * (central - acc), 2),
    }


def test_report_attaches_central_by_seed_and_labels_parameters(tmp_path):
    lines = [_run(0, 0.1, "fedavg", {}, 0.60, central=0.90), _run(1, 0.1, "fedavg", {}, 0.70, central=0.95),
             _run(0, 0.1, "fedavg", {"batch_size": 4, "local_optimizer": "sgd"}, 0.85),
             _run(1, 0.1, "fedavg", {"batch_size": 4, "local_optimizer": "sgd"}, 0.75),
             _run(0, None, "fedavgm", {"server_momentum": 0.5}, 0.88, server_lr=2.0)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    results = load_results([str(path)])
    assert [r["accuracy_gap_points"] for r in results] == [30.0, 25.0, 5.0, 20.0, 2.0]
    table = summary_table(results)
    assert "| 0.1 | fedavg batch_size=4 local_optimizer=sgd | 0,1 | 80.00 (75.00-85.00) | 12.50, 20.00 |" in table
    assert "| IID | fedavgm server_momentum=0.5 server_lr=2 | 0 | 88.00 (88.00-88.00) | 2.00, 2.00 |" in table
    png = tmp_path / "curves.png"
    plot_curves(results, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
