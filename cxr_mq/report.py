"""What a demo run leaves behind: ``report.json``, matplotlib plots and an ``index.html``.

``results`` everywhere maps a mode (``encrypted`` / ``plaintext``) to its DemoResult; with both
(``--compare``) every plot shows both, and the report gives the overhead of encryption as
ratios: ``overhead_ratio`` is the rounds' wall time encrypted over plaintext (the one-off key
generation and TensorFlow start-up excluded), ``bytes_ratio`` the bytes uploaded.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .metrics import positive_index

PLOTS = ("metrics.png", "confusion.png", "roc.png", "bytes.png", "seconds.png")
MODE_ORDER = ("encrypted", "plaintext")


def roc_curve(is_positive, score) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates from (0, 0) to (1, 1), one point per distinct score
    threshold (tied scores move diagonally), with collinear points dropped."""
    score = np.asarray(score, dtype=np.float64).ravel()
    is_positive = np.asarray(is_positive).astype(bool).ravel()
    if score.size == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    order = np.argsort(-score, kind="mergesort")
    score, is_positive = score[order], is_positive[order]
    distinct = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    tps = np.cumsum(is_positive)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = max(int(is_positive.sum()), 1), max(int((~is_positive).sum()), 1)
    fpr, tpr = np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives]
    keep = np.ones(fpr.size, dtype=bool)
    if fpr.size > 2:  # a middle point on the line through its neighbours adds nothing
        cross = ((fpr[1:-1] - fpr[:-2]) * (tpr[2:] - tpr[:-2])
                 - (tpr[1:-1] - tpr[:-2]) * (fpr[2:] - fpr[:-2]))
        keep[1:-1] = np.abs(cross) > 1e-12
    return fpr[keep], tpr[keep]


def curve_auc(fpr, tpr) -> float:
    """Area under a piecewise-linear curve (trapezoids)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _rows(result) -> list[dict]:
    return [dict(r.__dict__) for r in result.rounds]


def _ordered(results: dict) -> list[tuple[str, object]]:
    return sorted(results.items(), key=lambda kv: MODE_ORDER.index(kv[0]) if kv[0] in MODE_ORDER else 9)


def _rounds_seconds(result) -> float:
    return float(sum(r.wall_seconds for r in result.rounds))


def build_report(results: dict) -> dict:
    """The content of ``report.json`` (see the module docstring for ``results``)."""
    if not results:
        raise ValueError("no demo results to report")
    primary = results.get("encrypted") or next(iter(results.values()))
    report = {
        "mode": primary.mode,
        "modes": [mode for mode, _ in _ordered(results)],
        "settings": primary.settings,
        "partition": primary.partition,
        "rounds": _rows(primary),
        "wall_seconds": primary.wall_seconds,
        "runs": {mode: {"mode": mode, "settings": res.settings, "rounds": _rows(res),
                        "wall_seconds": res.wall_seconds, "rounds_seconds": _rounds_seconds(res),
                        "bytes_uploaded": int(sum(r.bytes_uploaded for r in res.rounds))}
                 for mode, res in _ordered(results)},
        "plots": {},
    }
    if {"encrypted", "plaintext"} <= set(results):
        enc, plain = results["encrypted"], results["plaintext"]
        report["overhead_ratio"] = _rounds_seconds(enc) / max(_rounds_seconds(plain), 1e-9)
        report["wall_ratio"] = enc.wall_seconds / max(plain.wall_seconds, 1e-9)
        report["bytes_ratio"] = (sum(r.bytes_uploaded for r in enc.rounds)
                                 / max(1, sum(r.bytes_uploaded for r in plain.rounds)))
    return report


def write_report(out_dir: str | Path, results: dict) -> dict:
    """Write ``report.json``, the PNG plots and ``index.html`` into ``out_dir``; return the report.
    ``report["plots"]`` names, for each plot, the series (or panels) it shows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(results)
    runs = _ordered(results)
    primary = results.get("encrypted") or runs[0][1]
    classes = list(primary.rounds[-1].metrics.get("classes") or [])
    positive = positive_index(classes) if classes else 1
    plots = report["plots"]

    def save(fig, name: str, labels: list[str]) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        plots[name] = labels

    fig, ax = plt.subplots(figsize=(6.5, 4))
    labels = []
    for mode, res in runs:
        xs = [r.round for r in res.rounds]
        style = "-" if mode == "encrypted" else "--"
        for key, marker, name in (("accuracy", "o", "accuracy"), ("auc", "s", "AUC"),
                                  ("sensitivity_positive", "^", "sensitivity+")):
            label = f"{name} ({mode})"
            ax.plot(xs, [r.metrics.get(key) or 0.0 for r in res.rounds], marker + style, label=label,
                    linewidth=2.5 if mode == "encrypted" else 1.2, markersize=7 if mode == "encrypted" else 4)
            labels.append(label)
    ax.set(xlabel="round", ylabel="held-out test set", ylim=(0, 1.02), title="Global model per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    save(fig, "metrics.png", labels)

    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4), squeeze=False)
    for ax, (mode, res) in zip(axes[0], runs):
        matrix = np.array(res.rounds[-1].metrics["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes,
               yticklabels=classes, xlabel="predicted", ylabel="true",
               title=f"{mode}, round {res.rounds[-1].round}")
    save(fig, "confusion.png", [mode for mode, _ in runs])

    fig, ax = plt.subplots(figsize=(4.5, 4))
    labels = []
    for mode, res in runs:
        proba, y = np.asarray(res.final_probabilities), np.asarray(res.final_labels)
        if proba.ndim != 2 or not len(proba):
            continue
        fpr, tpr = roc_curve(y == positive, proba[:, positive])
        label = f"{mode} (AUC {curve_auc(fpr, tpr):.3f})"
        ax.plot(fpr, tpr, "-" if mode == "encrypted" else "--", label=label,
                linewidth=2.5 if mode == "encrypted" else 1.5)
        labels.append(label)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.02),
           title=f"ROC, {classes[positive] if classes else 'positive'} vs rest, final round")
    ax.legend(fontsize=8, loc="lower right")
    save(fig, "roc.png", labels)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(runs)
    for k, (mode, res) in enumerate(runs):
        xs = np.array([r.round for r in res.rounds]) + (k - (len(runs) - 1) / 2) * width
        ax.bar(xs, [r.bytes_uploaded / 1e6 for r in res.rounds], width=width, label=mode)
    ax.set(xlabel="round", ylabel="MB uploaded (all hospitals)", title="Bytes per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    save(fig, "bytes.png", [mode for mode, _ in runs])

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (mode, res) in enumerate(runs):
        xs = np.array([r.round for r in res.rounds]) + (k - (len(runs) - 1) / 2) * width
        train = np.array([r.train_seconds for r in res.rounds])
        enc = np.array([r.encrypt_seconds for r in res.rounds])
        agg = np.array([r.aggregate_seconds for r in res.rounds])
        rest = np.maximum(np.array([r.wall_seconds for r in res.rounds]) - train - enc - agg, 0.0)
        bottom = np.zeros(len(xs))
        for part, name, hatch in ((train, "train", ""), (enc, "encrypt", "//"),
                                  (agg, "aggregate", "xx"), (rest, "other", "..")):
            ax.bar(xs, part, width=width, bottom=bottom, hatch=hatch, alpha=0.8 if k == 0 else 0.5,
                   label=f"{name} ({mode})", edgecolor="black", linewidth=0.3)
            bottom += part
    ratio = (f"; encrypted/plaintext {report['overhead_ratio']:.2f}×"
             if "overhead_ratio" in report else "")
    ax.set(xlabel="round", ylabel="seconds (summed over hospitals)",
           title=f"Time per round{ratio}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, ncol=len(runs))
    save(fig, "seconds.png", [mode for mode, _ in runs])

    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "index.html").write_text(_html(report))
    return report


def _html(report: dict) -> str:
    def table(rows) -> str:
        body = "".join(
            f"<tr><td>{r['round']}</td><td>{html.escape(', '.join(r['contributors']))}</td>"
            f"<td>{_num(r['metrics'].get('accuracy'))}</td><td>{_num(r['metrics'].get('auc'))}</td>"
            f"<td>{_num(r['metrics'].get('sensitivity_positive'))}</td>"
            f"<td>{_num(r['metrics'].get('ppv_positive'))}</td>"
            f"<td>{r['bytes_uploaded'] / 1e6:.2f}</td><td>{r['encrypt_seconds']:.2f}</td>"
            f"<td>{r['aggregate_seconds']:.2f}</td><td>{r['wall_seconds']:.1f}</td></tr>" for r in rows)
        return ("<table><tr><th>round</th><th>contributors</th><th>accuracy</th><th>AUC</th>"
                "<th>sensitivity+</th><th>PPV+</th><th>MB uploaded</th><th>encrypt s</th>"
                f"<th>aggregate s</th><th>wall s</th></tr>{body}</table>")

    runs = "".join(f"<h2>{html.escape(mode)}</h2><p>wall time {run['wall_seconds']:.1f} s, "
                   f"rounds {run['rounds_seconds']:.1f} s</p>{table(run['rounds'])}"
                   for mode, run in report["runs"].items())
    extra = ""
    if "overhead_ratio" in report:
        extra = (f"<p>Encryption overhead: rounds' wall time encrypted / plaintext "
                 f"<b>{report['overhead_ratio']:.2f}×</b>, bytes uploaded "
                 f"<b>{report['bytes_ratio']:.1f}×</b>.</p>")
    settings = report["settings"]
    images = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                     for name in PLOTS if name in report["plots"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxr-mq demo report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}</style>
</head>
<body><h1>cxr-mq federated demo ({html.escape(', '.join(report['modes']))})</h1>
<p>{settings.get('hospitals')} hospitals, {len(report['rounds'])} rounds, model
{html.escape(str(settings.get('model')))} at {settings.get('image_size')} px, codec
{html.escape(str(settings.get('codec_profile')))}.</p>{extra}
{runs}
{images}
</body></html>
"""


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
