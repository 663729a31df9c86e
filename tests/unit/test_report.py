"""The demo report: ROC points worked out by hand, the report's fields, and the files it writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cxr_mq import metrics
from cxr_mq.demo import DemoResult, RoundReport
from cxr_mq.report import PLOTS, build_report, curve_auc, roc_curve, write_report


def points(fpr, tpr):
    return [(round(float(f), 6), round(float(t), 6)) for f, t in zip(fpr, tpr)]


def rank_auc(labels, scores) -> float:
    proba = np.stack([1 - np.asarray(scores), np.asarray(scores)], axis=1)
    return metrics.compute(labels, proba, ["negative", "positive"])["auc"]


def test_perfect_separation_is_the_top_left_corner():
    fpr, tpr = roc_curve(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.3, 0.1]))
    assert points(fpr, tpr) == [(0, 0), (0, 1), (1, 1)]
    assert curve_auc(fpr, tpr) == 1.0


def test_inverted_scores_run_along_the_bottom():
    fpr, tpr = roc_curve([0, 0, 1, 1], [0.9, 0.8, 0.3, 0.1])
    assert points(fpr, tpr) == [(0, 0), (1, 0), (1, 1)]
    assert curve_auc(fpr, tpr) == 0.0


def test_all_scores_tied_is_the_diagonal():
    fpr, tpr = roc_curve([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5])
    assert points(fpr, tpr) == [(0, 0), (1, 1)]
    assert curve_auc(fpr, tpr) == 0.5


def test_a_tie_across_classes_moves_diagonally():
    # sorted: 0.9 P | 0.7 N, 0.7 P (tied) | 0.4 N | 0.2 N ; 2 positives, 3 negatives
    # thresholds give (0,.5), (1/3,1), (2/3,1), (1,1); (2/3,1) is on the line and dropped
    labels, scores = [1, 0, 1, 0, 0], [0.9, 0.7, 0.7, 0.4, 0.2]
    fpr, tpr = roc_curve(labels, scores)
    assert points(fpr, tpr) == [(0, 0), (0, 0.5), (0.333333, 1), (1, 1)]
    # Mann-Whitney: 3 + (0.5 + 2) + 0 ... pairs won of 6 -> 5.5/6
    assert curve_auc(fpr, tpr) == pytest.approx(11 / 12)
    assert rank_auc(labels, scores) == pytest.approx(11 / 12)


def test_area_matches_the_rank_auc_of_metrics_on_random_scores():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) * 0.5 + labels * 0.25, 2)  # rounded: many ties
    fpr, tpr = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert curve_auc(fpr, tpr) == pytest.approx(rank_auc(labels, scores))


def test_degenerate_inputs_do_not_divide_by_zero():
    assert points(*roc_curve([], [])) == [(0, 0), (1, 1)]
    fpr, tpr = roc_curve([1, 1, 1], [0.2, 0.5, 0.9])  # no negatives
    assert np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr))


# -- build_report / write_report ----------------------------------------------------------------
def fake_result(mode: str, wall_per_round: float, size: int, rounds: int = 2) -> DemoResult:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    p = np.clip(labels * 0.4 + rng.random(40) * 0.6, 0, 1)
    proba = np.stack([1 - p, p], axis=1)
    rows = [RoundReport(round=r, contributors=["hospital-1", "hospital-2", "hospital-3"],
                        total_samples=120, metrics=metrics.compute(labels, proba, ["negative", "positive"]),
                        bytes_uploaded=3 * size, encrypt_seconds=0.5 if mode == "encrypted" else 0.01,
                        train_seconds=3.0, aggregate_seconds=0.2, wall_seconds=wall_per_round)
            for r in range(1, rounds + 1)]
    return DemoResult(mode=mode, settings={"hospitals": 3, "rounds": rounds, "model": "small-cnn",
                                           "image_size": 32, "plaintext": mode == "plaintext",
                                           "codec_profile": "seed" if mode == "encrypted" else "plaintext"},
                      partition={"classes": ["negative", "positive"], "hospitals": []},
                      rounds=rows, wall_seconds=wall_per_round * rounds + 5.0,
                      final_probabilities=proba.tolist(), final_labels=labels.tolist())


def test_single_run_report_has_settings_rounds_and_no_ratio():
    report = build_report({"encrypted": fake_result("encrypted", 4.0, 1000)})
    assert report["mode"] == "encrypted" and report["modes"] == ["encrypted"]
    assert report["settings"]["hospitals"] == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    row = report["rounds"][0]
    for key in ("contributors", "total_samples", "metrics", "bytes_uploaded", "encrypt_seconds",
                "train_seconds", "aggregate_seconds", "wall_seconds"):
        assert key in row
    assert set(report["runs"]) == {"encrypted"}
    assert "overhead_ratio" not in report and "bytes_ratio" not in report
    json.dumps(report)  # JSON-safe as is


def test_plaintext_only_report_is_in_plaintext_mode():
    report = build_report({"plaintext": fake_result("plaintext", 2.0, 100)})
    assert report["mode"] == "plaintext" and report["modes"] == ["plaintext"]


def test_compare_report_gives_overhead_ratios_over_the_rounds():
    report = build_report({"plaintext": fake_result("plaintext", 2.0, 100),
                           "encrypted": fake_result("encrypted", 5.0, 700)})
    assert report["mode"] == "encrypted" and report["modes"] == ["encrypted", "plaintext"]
    assert report["overhead_ratio"] == pytest.approx(10.0 / 4.0)  # rounds only, not start-up
    assert report["wall_ratio"] == pytest.approx(15.0 / 9.0)
    assert report["bytes_ratio"] == pytest.approx(7.0)
    assert {m: len(r["rounds"]) for m, r in report["runs"].items()} == {"encrypted": 2, "plaintext": 2}
    assert report["runs"]["plaintext"]["bytes_uploaded"] == 600


def test_write_report_writes_every_plot_with_both_modes(tmp_path):
    report = write_report(tmp_path, {"encrypted": fake_result("encrypted", 5.0, 700),
                                     "plaintext": fake_result("plaintext", 2.0, 100)})
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == report["plots"]
    page = (tmp_path / "index.html").read_text()
    assert set(report["plots"]) == set(PLOTS)
    for name in PLOTS:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) >= 200
        assert f'src="{name}"' in page
        assert any("encrypted" in s for s in report["plots"][name]), name
        assert any("plaintext" in s for s in report["plots"][name]), name
    assert "2.50×" in page
