"""Clinical metrics for the CXR classifier, computed and printed as COVID-Net's evaluation does.

Rows of the confusion matrix are the true class, columns the predicted class. Undefined
figures (a class with no true or no predicted samples, an AUC with one class absent) are
``None`` so the report stays JSON-safe.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} holds a class index outside 0..{n_classes - 1}")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def sensitivity(matrix: np.ndarray) -> list[float | None]:
    """Per-class recall: diagonal over row sums."""
    matrix = np.asarray(matrix)
    return [_ratio(matrix[i, i], matrix[i].sum()) for i in range(matrix.shape[0])]


def ppv(matrix: np.ndarray) -> list[float | None]:
    """Per-class positive predictive value (precision): diagonal over column sums."""
    matrix = np.asarray(matrix)
    return [_ratio(matrix[i, i], matrix[:, i].sum()) for i in range(matrix.shape[0])]


def accuracy(matrix: np.ndarray) -> float | None:
    matrix = np.asarray(matrix)
    return _ratio(np.trace(matrix), matrix.sum())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    return (sums / counts)[inverse]


def roc_auc_binary(is_positive: Sequence[bool], score: Sequence[float]) -> float | None:
    """ROC AUC as the Mann-Whitney statistic (ties count one half)."""
    is_positive = np.asarray(is_positive, dtype=bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(is_positive.sum())
    n_neg = int(is_positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(score)
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(y_true: Sequence[int], proba: np.ndarray) -> tuple[float | None, list[float | None]]:
    """(macro AUC, per-class one-vs-rest AUCs). For two classes both entries equal the AUC of class 1."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = proba.shape[1]
    per_class = [roc_auc_binary(y_true == c, proba[:, c]) for c in range(n_classes)]
    if n_classes == 2:
        return per_class[1], per_class
    defined = [a for a in per_class if a is not None]
    return (float(np.mean(defined)) if defined else None), per_class


def positive_index(classes: Sequence[str]) -> int:
    """The class treated as 'positive' for the convenience keys: COVID-19 or positive."""
    for i, name in enumerate(classes):
        if name.lower() in ("covid-19", "positive"):
            return i
    return len(classes) - 1


def compute(y_true: Sequence[int], proba: np.ndarray, classes: Sequence[str]) -> dict:
    """The full report: JSON-safe floats, ints and lists aligned with ``classes``."""
    classes = list(classes)
    proba = np.asarray(proba, dtype=np.float64).reshape(-1, len(classes))
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = proba.argmax(axis=1) if len(proba) else np.zeros(0, dtype=np.int64)
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    return report_from_matrix(matrix, classes, y_true=y_true, proba=proba)


def report_from_matrix(
    matrix, classes: Sequence[str], y_true=None, proba=None
) -> dict:
    matrix = np.asarray(matrix, dtype=np.int64)
    classes = list(classes)
    sens, prec = sensitivity(matrix), ppv(matrix)
    auc, auc_per_class = (None, [None] * len(classes))
    if y_true is not None and proba is not None and len(y_true):
        auc, auc_per_class = roc_auc(y_true, proba)
    pos = positive_index(classes)
    return {
        "classes": classes,
        "n": int(matrix.sum()),
        "confusion_matrix": matrix.tolist(),
        "accuracy": accuracy(matrix),
        "sensitivity": sens,
        "ppv": prec,
        "auc": auc,
        "auc_per_class": auc_per_class,
        "positive_class": classes[pos],
        "sensitivity_positive": sens[pos],
        "ppv_positive": prec[pos],
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_report(report: dict) -> str:
    """COVID-Net-style text: the matrix, then Sens and PPV per class, then accuracy and AUC."""
    classes = report["classes"]
    matrix = np.asarray(report["confusion_matrix"], dtype=np.float64)
    names = [c if c.isupper() or "-" in c else c.capitalize() for c in classes]
    lines = [np.array2string(matrix, precision=0, separator=" ", floatmode="fixed")]
    lines.append("Sens " + ", ".join(f"{n}: {_fmt(s)}" for n, s in zip(names, report["sensitivity"])))
    lines.append("PPV " + ", ".join(f"{n}: {_fmt(p)}" for n, p in zip(names, report["ppv"])))
    acc = report.get("accuracy")
    lines.append("Accuracy: " + ("n/a" if acc is None else f"{100 * acc:.2f}%") + f" (n={report['n']})")
    auc = report.get("auc")
    label = "AUC" if len(classes) == 2 else "AUC (macro one-vs-rest)"
    lines.append(f"{label}: {_fmt(auc)}")
    if len(classes) > 2 and report.get("auc_per_class"):
        lines.append("AUC " + ", ".join(f"{n}: {_fmt(a)}" for n, a in zip(names, report["auc_per_class"])))
    return "\n".join(lines)


def format_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
