"""Reports: ``report.json``, matplotlib plots and an ``index.html``, for a demo run
(``write_report``) and for a real federation from its store (``write_federation_report``).
Both draw the same plots from rows that share field names (``round``, ``contributors``,
``metrics``, ``bytes_uploaded``, ``train_seconds``, ``encrypt_seconds``,
``aggregate_seconds``, ``wall_seconds``) and lay out the same page.

For the demo, ``results`` maps a mode (``encrypted`` / ``plaintext``) to its DemoResult; with
both (``--compare``) every plot shows both, and the report gives the overhead of encryption
as ratios: ``overhead_ratio`` is the rounds' wall time encrypted over plaintext (the one-off
key generation and TensorFlow start-up excluded), ``bytes_ratio`` the bytes uploaded.

For a federation, the rows are ``history.RoundHistory``: the global model of each round as
the hospitals measured it on their validation splits, overall and per hospital, who
contributed and who was refused (with the reason), bytes and timings.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .metrics import positive_index

PLOTS = ("metrics.png", "confusion.png", "roc.png", "bytes.png", "seconds.png")
FEDERATION_PLOTS = ("metrics.png", "hospitals.png", "participation.png", "confusion.png",
                    "bytes.png", "seconds.png")
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
        "kind": "demo",
        "mode": primary.mode,
        "modes": [mode for mode, _ in _ordered(results)],
        "settings": primary.settings,
        "partition": primary.partition,
        "ceremony": getattr(primary, "ceremony", None),  # threshold profile: the key ceremony (None otherwise)
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


# -- plots shared by both reports ---------------------------------------------------------------
METRIC_SERIES = (("accuracy", "o", "accuracy"), ("auc", "s", "AUC"),
                 ("sensitivity_positive", "^", "sensitivity+"), ("ppv_positive", "v", "PPV+"))


class _Plots:
    """Writes PNGs into ``out`` and records, per plot, the series or panels it shows."""

    def __init__(self, out: Path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.out, self.plt, self.shown = out, plt, {}

    def save(self, fig, name: str, labels: list[str]) -> None:
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=100)
        self.plt.close(fig)
        self.shown[name] = labels


def _integer_rounds(ax) -> None:
    ax.xaxis.get_major_locator().set_params(integer=True)


def _plot_metrics(plots: _Plots, runs, ylabel: str) -> None:
    """Accuracy, AUC, sensitivity and PPV of the positive class per round; one line style per run."""
    fig, ax = plots.plt.subplots(figsize=(6.5, 4))
    labels = []
    for k, (mode, rows) in enumerate(runs):
        style = "-" if k == 0 else "--"
        for key, marker, name in METRIC_SERIES:
            points = [(r.round, r.metrics.get(key)) for r in rows if r.metrics.get(key) is not None]
            if not points:
                continue
            label = f"{name} ({mode})"
            ax.plot([x for x, _ in points], [y for _, y in points], marker + style, label=label,
                    linewidth=2.5 if k == 0 else 1.2, markersize=7 if k == 0 else 4)
            labels.append(label)
    ax.set(xlabel="round", ylabel=ylabel, ylim=(0, 1.02), title="Global model per round")
    _integer_rounds(ax)
    if labels:
        ax.legend(fontsize=7, loc="lower right", ncol=len(runs))
    ax.grid(alpha=0.3)
    plots.save(fig, "metrics.png", labels)


def _plot_confusion(plots: _Plots, runs, classes: list[str]) -> None:
    runs = [(mode, rows) for mode, rows in runs if rows and rows[-1].metrics.get("confusion_matrix")]
    fig, axes = plots.plt.subplots(1, max(1, len(runs)), figsize=(4.5 * max(1, len(runs)), 4),
                                   squeeze=False)
    for ax, (mode, rows) in zip(axes[0], runs):
        matrix = np.array(rows[-1].metrics["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes,
               yticklabels=classes, xlabel="predicted", ylabel="true",
               title=f"{mode}, round {rows[-1].round}")
    if not runs:
        axes[0][0].text(0.5, 0.5, "no evaluated round yet", ha="center", va="center")
        axes[0][0].set_axis_off()
    plots.save(fig, "confusion.png", [mode for mode, _ in runs])


def _plot_bytes(plots: _Plots, runs) -> None:
    fig, ax = plots.plt.subplots(figsize=(6, 4))
    width = 0.8 / len(runs)
    for k, (mode, rows) in enumerate(runs):
        xs = np.array([r.round for r in rows]) + (k - (len(runs) - 1) / 2) * width
        ax.bar(xs, [r.bytes_uploaded / 1e6 for r in rows], width=width, label=mode)
    ax.set(xlabel="round", ylabel="MB uploaded (all hospitals)", title="Bytes per round")
    _integer_rounds(ax)
    ax.legend(fontsize=8)
    plots.save(fig, "bytes.png", [mode for mode, _ in runs])


def _plot_seconds(plots: _Plots, runs, title: str) -> None:
    """Stacked train / encrypt / upload / aggregate seconds (summed over hospitals) and the rest
    of the round's latency."""
    fig, ax = plots.plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(runs)
    for k, (mode, rows) in enumerate(runs):
        xs = np.array([r.round for r in rows]) + (k - (len(runs) - 1) / 2) * width
        parts = [(np.array([getattr(r, f"{name}_seconds", 0.0) for r in rows]), name, hatch)
                 for name, hatch in (("train", ""), ("encrypt", "//"), ("upload", "\\\\"),
                                     ("aggregate", "xx"))]
        parts = [p for p in parts if p[0].any() or p[1] != "upload"]
        done = sum(p[0] for p in parts)
        rest = np.maximum(np.array([r.wall_seconds for r in rows]) - done, 0.0)
        bottom = np.zeros(len(xs))
        for part, name, hatch in parts + [(rest, "other", "..")]:
            ax.bar(xs, part, width=width, bottom=bottom, hatch=hatch, alpha=0.8 if k == 0 else 0.5,
                   label=f"{name} ({mode})", edgecolor="black", linewidth=0.3)
            bottom += part
    ax.set(xlabel="round", ylabel="seconds (summed over hospitals)", title=title)
    _integer_rounds(ax)
    ax.legend(fontsize=7, ncol=len(runs))
    plots.save(fig, "seconds.png", [mode for mode, _ in runs])


def write_report(out_dir: str | Path, results: dict) -> dict:
    """Write ``report.json``, the PNG plots and ``index.html`` into ``out_dir``; return the report.
    ``report["plots"]`` names, for each plot, the series (or panels) it shows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(results)
    runs = _ordered(results)
    primary = results.get("encrypted") or runs[0][1]
    classes = list(primary.rounds[-1].metrics.get("classes") or [])
    positive = positive_index(classes) if classes else 1
    plots = _Plots(out)
    row_runs = [(mode, res.rounds) for mode, res in runs]

    _plot_metrics(plots, row_runs, "held-out test set")
    _plot_confusion(plots, row_runs, classes)

    fig, ax = plots.plt.subplots(figsize=(4.5, 4))
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
    plots.save(fig, "roc.png", labels)

    _plot_bytes(plots, row_runs)
    ratio = (f"; encrypted/plaintext {report['overhead_ratio']:.2f}×"
             if "overhead_ratio" in report else "")
    _plot_seconds(plots, row_runs, f"Time per round{ratio}")
    report["plots"] = plots.shown

    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "index.html").write_text(_html(report))
    return report


# -- a real federation ----------------------------------------------------------------------------
def build_federation_report(history: list, source: dict) -> dict:
    """The content of a federation's ``report.json``; ``history`` is ``history.collect``'s rows,
    ``source`` says where they came from (bucket, prefix, round range)."""
    from .history import AUC_POOLING, as_dict

    hospitals = sorted({h for r in history for h in [*r.contributors, *r.per_hospital,
                                                      *(x["hospital"] for x in r.refused)] if h})
    return {
        "kind": "federation",
        "source": source,
        "rounds": [as_dict(r) for r in history],
        "hospitals": hospitals,
        "auc_pooling": AUC_POOLING,
        "totals": {
            "rounds": len(history),
            "complete": sum(1 for r in history if r.status == "complete"),
            "aborted": sum(1 for r in history if r.status == "aborted"),
            "updates_accepted": sum(len(r.contributors) for r in history),
            "refusals": sum(len(r.refused) for r in history),
            "bytes_uploaded": int(sum(r.bytes_uploaded for r in history)),
        },
        "plots": {},
    }


def _plot_hospitals(plots: _Plots, rows, hospitals: list[str]) -> None:
    """One panel per metric: a line per hospital and the pooled figure."""
    fig, axes = plots.plt.subplots(2, 2, figsize=(9, 6), sharex=True, squeeze=False)
    labels = []
    for ax, (key, _, name) in zip(axes.ravel(), METRIC_SERIES):
        for hospital in hospitals:
            points = [(r.round, r.per_hospital[hospital].get(key)) for r in rows
                      if hospital in r.per_hospital and r.per_hospital[hospital].get(key) is not None]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=hospital,
                        linewidth=1.2, markersize=4)
        overall = [(r.round, r.metrics.get(key)) for r in rows if r.metrics.get(key) is not None]
        if overall:
            ax.plot([x for x, _ in overall], [y for _, y in overall], "kD--", label="overall",
                    linewidth=2.2)
        ax.set(title=name, ylim=(0, 1.02), xlabel="round")
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        labels.append(name)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, fontsize=8, loc="lower center", ncol=min(6, len(names)))
        fig.subplots_adjust(bottom=0.15)
    fig.suptitle("Global model on each hospital's validation split")
    plots.save(fig, "hospitals.png", labels)


def _plot_participation(plots: _Plots, rows) -> None:
    fig, ax = plots.plt.subplots(figsize=(6, 4))
    xs = np.array([r.round for r in rows])
    accepted = np.array([len(r.contributors) for r in rows])
    refused = np.array([len(r.refused) for r in rows])
    ax.bar(xs, accepted, label="accepted", color="tab:green")
    ax.bar(xs, refused, bottom=accepted, label="refused", color="tab:red")
    ax.set(xlabel="round", ylabel="updates", title="Contributors and refusals per round")
    _integer_rounds(ax)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    plots.save(fig, "participation.png", ["accepted", "refused"])


def write_federation_report(out_dir: str | Path, history: list, source: dict) -> dict:
    """Write a federation's ``report.json``, plots and ``index.html``; return the report."""
    if not history:
        raise ValueError("no rounds to report in the store (or in the range asked for)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_federation_report(history, source)
    plots = _Plots(out)
    evaluated = [r for r in history if r.metrics]
    classes = list(evaluated[-1].metrics.get("classes") or []) if evaluated else []
    _plot_metrics(plots, [("federation", evaluated)], "hospitals' validation splits (pooled)")
    _plot_hospitals(plots, evaluated, report["hospitals"])
    _plot_participation(plots, history)
    _plot_confusion(plots, [("federation", evaluated)], classes)
    _plot_bytes(plots, [("federation", history)])
    _plot_seconds(plots, [("federation", history)], "Time per round: work summed over hospitals; other: rest of the latency")
    report["plots"] = plots.shown
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "index.html").write_text(_federation_html(report))
    return report


# -- the page ---------------------------------------------------------------------------------------
STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td.text{text-align:left}
figure{display:inline-block;margin:1em}"""


def _page(title: str, body: str, report: dict, order) -> str:
    images = "".join(f'<figure><img src="{name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                     for name in order if name in report["plots"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style>
</head>
<body><h1>{html.escape(title)}</h1>
{body}
{images}
</body></html>
"""


def _table(table_id: str, headers: list[str], rows: list[list], text_columns=()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="text">{html.escape(str(c))}</td>' if i in text_columns
                         else f"<td>{html.escape(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def _html(report: dict) -> str:
    def table(mode, rows) -> str:
        return _table(f"rounds-{mode}", ["round", "contributors", "accuracy", "AUC", "sensitivity+",
                                          "PPV+", "MB uploaded", "encrypt s", "aggregate s", "wall s"],
                      [[r["round"], ", ".join(r["contributors"]), _num(r["metrics"].get("accuracy")),
                        _num(r["metrics"].get("auc")), _num(r["metrics"].get("sensitivity_positive")),
                        _num(r["metrics"].get("ppv_positive")), f"{r['bytes_uploaded'] / 1e6:.2f}",
                        f"{r['encrypt_seconds']:.2f}", f"{r['aggregate_seconds']:.2f}",
                        f"{r['wall_seconds']:.1f}"] for r in rows], text_columns=(1,))

    runs = "".join(f"<h2>{html.escape(mode)}</h2><p>wall time {run['wall_seconds']:.1f} s, "
                   f"rounds {run['rounds_seconds']:.1f} s</p>{table(mode, run['rounds'])}"
                   for mode, run in report["runs"].items())
    extra = ""
    if "overhead_ratio" in report:
        extra = (f"<p>Encryption overhead: rounds' wall time encrypted / plaintext "
                 f"<b>{report['overhead_ratio']:.2f}×</b>, bytes uploaded "
                 f"<b>{report['bytes_ratio']:.1f}×</b>.</p>")
    settings = report["settings"]
    body = (f"<p>{settings.get('hospitals')} hospitals, {len(report['rounds'])} rounds, model "
            f"{html.escape(str(settings.get('model')))} at {settings.get('image_size')} px, codec "
            f"{html.escape(str(settings.get('codec_profile')))}.</p>{extra}\n{runs}")
    return _page(f"cxr-mq federated demo ({', '.join(report['modes'])})", body, report, PLOTS)


def _federation_html(report: dict) -> str:
    rows = report["rounds"]
    totals = report["totals"]
    source = ", ".join(f"{k} {v}" for k, v in report["source"].items() if v not in (None, ""))
    rounds_table = _table(
        "rounds", ["round", "status", "contributors", "refused", "accuracy", "AUC", "sensitivity+",
                   "PPV+", "MB uploaded", "train s", "encrypt s", "upload s", "aggregate s",
                   "latency s"],
        [[r["round"], r["status"], ", ".join(r["contributors"]) or "-", len(r["refused"]),
          _num(r["metrics"].get("accuracy")), _num(r["metrics"].get("auc")),
          _num(r["metrics"].get("sensitivity_positive")), _num(r["metrics"].get("ppv_positive")),
          f"{r['bytes_uploaded'] / 1e6:.2f}", f"{r['train_seconds']:.1f}",
          f"{r['encrypt_seconds']:.2f}", f"{r['upload_seconds']:.2f}",
          f"{r['aggregate_seconds']:.2f}", f"{r['wall_seconds']:.1f}"] for r in rows],
        text_columns=(1, 2))
    hospital_rows = []
    for r in rows:
        for hospital in sorted(set(r["per_hospital"]) | set(r["contributors"])):
            m = r["per_hospital"].get(hospital, {})
            t = r["hospital_timings"].get(hospital, {})
            hospital_rows.append([
                r["round"], hospital, m.get("n", "-"), _num(m.get("accuracy")), _num(m.get("auc")),
                _num(m.get("sensitivity_positive")), _num(m.get("ppv_positive")),
                _num(r["train"].get(hospital, {}).get("loss")),
                _num(t.get("train_seconds"), 1), _num(t.get("encrypt_seconds"), 2),
                _num(t.get("upload_seconds"), 2)])
    hospitals_table = _table("hospitals", ["round", "hospital", "validation n", "accuracy", "AUC",
                                           "sensitivity+", "PPV+", "train loss", "train s",
                                           "encrypt s", "upload s"], hospital_rows, text_columns=(1,))
    refusals = [[r["round"], x["hospital"], x.get("by", "aggregator"), x["reason"]]
                for r in rows for x in r["refused"]]
    refusals_table = (_table("refusals", ["round", "hospital", "refused by", "reason"], refusals,
                             text_columns=(1, 2, 3))
                      if refusals else '<p id="refusals">Nothing was refused.</p>')
    body = (f"<p>{totals['rounds']} rounds ({totals['complete']} complete, {totals['aborted']} "
            f"aborted), {totals['updates_accepted']} updates accepted, {totals['refusals']} "
            f"refusals, {totals['bytes_uploaded'] / 1e6:.2f} MB uploaded; {html.escape(source)}.</p>"
            f"<p>Round r's global model as the hospitals measured it on their own validation "
            f"splits. Overall accuracy, sensitivity and PPV pool their confusion matrices; the "
            f"overall AUC is the {html.escape(report['auc_pooling'])}.</p>"
            f"<h2>Rounds</h2>{rounds_table}<h2>Hospitals</h2>{hospitals_table}"
            f"<h2>Refusals</h2>{refusals_table}")
    return _page("cxr-mq federation report", body, report, FEDERATION_PLOTS)


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
