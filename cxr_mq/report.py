"""What a demo run leaves behind: ``report.json``, matplotlib plots and an ``index.html``."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

PLOTS = ("metrics.png", "confusion.png", "roc.png", "bytes.png")


def roc_curve(is_positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0,0) to (1,1)."""
    order = np.argsort(-score, kind="mergesort")
    score, is_positive = score[order], is_positive[order].astype(bool)
    distinct = np.r_[np.where(np.diff(score))[0], len(score) - 1]
    tps = np.cumsum(is_positive)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = max(int(is_positive.sum()), 1), max(int((~is_positive).sum()), 1)
    return np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives]


def build_report(results: dict) -> dict:
    """``results`` maps a mode (``encrypted``/``plaintext``) to its DemoResult."""
    primary = results.get("encrypted") or results["plaintext"]
    report = {
        "settings": primary.settings,
        "mode": primary.mode,
        "partition": primary.partition,
        "rounds": [r.__dict__ for r in primary.rounds],
        "wall_seconds": primary.wall_seconds,
        "runs": {mode: {"rounds": [r.__dict__ for r in res.rounds], "wall_seconds": res.wall_seconds}
                 for mode, res in results.items()},
    }
    if {"encrypted", "plaintext"} <= set(results):
        report["overhead_ratio"] = results["encrypted"].wall_seconds / results["plaintext"].wall_seconds
        report["bytes_ratio"] = (sum(r.bytes_uploaded for r in results["encrypted"].rounds)
                                 / max(1, sum(r.bytes_uploaded for r in results["plaintext"].rounds)))
    return report


def write_report(out_dir: str | Path, results: dict) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(results)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    primary = results.get("encrypted") or results["plaintext"]
    classes = primary.rounds[-1].metrics.get("classes") or []

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, res in results.items():
        xs = [r.round for r in res.rounds]
        style = "-" if mode == "encrypted" else "--"
        ax.plot(xs, [r.metrics["accuracy"] for r in res.rounds], "o" + style, label=f"accuracy ({mode})")
        ax.plot(xs, [r.metrics.get("auc") or 0.0 for r in res.rounds], "s" + style, label=f"AUC ({mode})")
    ax.set(xlabel="round", ylabel="held-out test", ylim=(0, 1.02), title="Global model per round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)

    matrix = np.array(primary.rounds[-1].metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes,
           yticklabels=classes, xlabel="predicted", ylabel="true",
           title=f"Confusion matrix, round {primary.rounds[-1].round}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for mode, res in results.items():
        proba, labels = np.asarray(res.final_probabilities), np.asarray(res.final_labels)
        positive = _positive_index(classes)
        fpr, tpr = roc_curve(labels == positive, proba[:, positive])
        auc = res.rounds[-1].metrics.get("auc")
        ax.plot(fpr, tpr, label=f"{mode} (AUC {auc:.3f})" if auc is not None else mode)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate",
           title=f"ROC, {classes[_positive_index(classes)] if classes else 'positive'} vs rest")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(results)
    for k, (mode, res) in enumerate(results.items()):
        xs = np.array([r.round for r in res.rounds]) + (k - (len(results) - 1) / 2) * width
        ax.bar(xs, [r.bytes_uploaded / 1e6 for r in res.rounds], width=width, label=mode)
    ax.set(xlabel="round", ylabel="MB uploaded (all hospitals)", title="Bytes per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=100)
    plt.close(fig)

    (out / "index.html").write_text(_html(report))
    return report


def _positive_index(classes) -> int:
    for name in ("positive", "COVID-19"):
        if name in classes:
            return list(classes).index(name)
    return len(classes) - 1 if classes else 1


def _html(report: dict) -> str:
    rows = "".join(
        f"<tr><td>{r['round']}</td><td>{html.escape(', '.join(r['contributors']))}</td>"
        f"<td>{r['metrics']['accuracy']:.3f}</td><td>{(r['metrics'].get('auc') or 0):.3f}</td>"
        f"<td>{r['bytes_uploaded'] / 1e6:.2f}</td><td>{r['encrypt_seconds']:.2f}</td>"
        f"<td>{r['aggregate_seconds']:.2f}</td></tr>" for r in report["rounds"])
    extra = (f"<p>Encryption overhead (wall time, encrypted / plaintext): "
             f"<b>{report['overhead_ratio']:.2f}×</b></p>" if "overhead_ratio" in report else "")
    images = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                     for name in PLOTS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxr-mq demo report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>cxr-mq federated demo ({html.escape(report['mode'])})</h1>
<p>{len(report['rounds'])} rounds, wall time {report['wall_seconds']:.1f} s.</p>{extra}
<table><tr><th>round</th><th>contributors</th><th>accuracy</th><th>AUC</th><th>MB uploaded</th>
<th>encrypt s</th><th>aggregate s</th></tr>{rows}</table>
{images}
</body></html>
"""
