"""Clinical metrics: the issue's worked example, AUC, 3-class one-vs-rest, the printed report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_mq import metrics


def _from_matrix(matrix):
    """Labels and hard one-hot predictions reproducing a confusion matrix."""
    y_true, y_pred = [], []
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            y_true += [t] * count
            y_pred += [p] * count
    return np.array(y_true), np.array(y_pred)


def test_issue_example_binary():
    y_true, y_pred = _from_matrix([[194, 6], [17, 183]])
    proba = np.eye(2)[y_pred]
    report = metrics.compute(y_true, proba, ("negative", "positive"))
    assert report["confusion_matrix"] == [[194, 6], [17, 183]]
    assert [round(s, 3) for s in report["sensitivity"]] == [0.970, 0.915]
    assert [round(p, 3) for p in report["ppv"]] == [0.919, 0.968]
    assert report["accuracy"] == pytest.approx(0.9425)
    assert round(report["sensitivity_positive"], 3) == 0.915
    assert round(report["ppv_positive"], 3) == 0.968
    assert report["n"] == 400
    text = metrics.format_report(report)
    assert "Sens Negative: 0.970, Positive: 0.915" in text
    assert "PPV Negative: 0.919, Positive: 0.968" in text
    assert "Accuracy: 94.25%" in text
    assert text.splitlines()[:2] == ["[[194.   6.]", " [ 17. 183.]]"]  # numpy print, as COVID-Net
    json.loads(metrics.format_json(report))


def test_report_from_matrix_matches():
    report = metrics.report_from_matrix([[194, 6], [17, 183]], ("negative", "positive"))
    assert report["accuracy"] == pytest.approx(0.9425) and report["auc"] is None


def test_auc_known_values():
    assert metrics.roc_auc_binary([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.roc_auc_binary([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # ties count half
    assert metrics.roc_auc_binary([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert metrics.roc_auc_binary([1, 1], [0.1, 0.2]) is None


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200).astype(bool)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounded: plenty of ties
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert metrics.roc_auc_binary(y, s) == pytest.approx(pairwise)


def test_three_class_one_vs_rest_and_covid_is_positive():
    classes = ("normal", "pneumonia", "COVID-19")
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array([
        [0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1],
        [0.4, 0.5, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4],
    ])
    report = metrics.compute(y, proba, classes)
    assert report["accuracy"] == 1.0
    assert report["auc_per_class"] == [1.0, 1.0, 1.0] and report["auc"] == 1.0
    assert report["positive_class"] == "COVID-19"
    assert report["sensitivity_positive"] == 1.0
    text = metrics.format_report(report)
    assert "Sens Normal: 1.000, Pneumonia: 1.000, COVID-19: 1.000" in text
    assert "AUC (macro one-vs-rest): 1.000" in text


def test_macro_auc_averages_classes():
    y = np.array([0, 1, 2, 0, 1, 2])
    rng = np.random.default_rng(1)
    proba = rng.dirichlet(np.ones(3), 6)
    macro, per = metrics.roc_auc(y, proba)
    expected = [metrics.roc_auc_binary(y == c, proba[:, c]) for c in range(3)]
    assert per == expected and macro == pytest.approx(np.mean(expected))


def test_undefined_values_are_none_and_json_safe():
    report = metrics.compute(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]), ("negative", "positive"))
    assert report["sensitivity"] == [1.0, None] and report["ppv"] == [1.0, None]
    assert report["auc"] is None
    json.dumps(report)
    assert "n/a" in metrics.format_report(report)
    empty = metrics.compute(np.zeros(0, int), np.zeros((0, 2)), ("negative", "positive"))
    assert empty["n"] == 0 and empty["accuracy"] is None
    json.dumps(empty)


def test_confusion_matrix_rejects_bad_indices():
    with pytest.raises(ValueError):
        metrics.confusion_matrix([0, 3], [0, 1], 2)
