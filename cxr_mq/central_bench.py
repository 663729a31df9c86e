"""Benchmark: a centrally trained model against FedAvg over CKKS-encrypted updates on the same
synthetic data, same total epochs, evaluated on the same held-out synthetic patients.

Not a test: it trains for minutes. Run ``cxr-mq bench-federated --help``.
The federated side runs in process: each hospital trains from the global weights and
encrypts ``n_i * w_i`` (the compact profile encrypts with the hospitals' secret context), an
encrypted sum is built holding only the public context (as the aggregator does), and the
secret-key holder decrypts and divides by the total.

The defaults (720 images at 32 px, covidnet-s width 0.5, 16 epochs, no augmentation) make one
run (central or federated) about 90 s of CPU, so a three-seed grid fits a session; central
training reaches 88-94% there (docs/model-quality.md). The compact CKKS profile is used for
speed; the aggregator's side (adding ciphertexts) is the same for every profile.

Measured earlier at the old defaults on 2 shared cores, 3-class, 1500 synthetic images at 64 px (1132 train / 368
test images from held-out patients), hospitals from Dirichlet(0.5): 166/319/647 images, the
first with a single COVID-19 image, the second 80% pneumonia; Adam 2e-3, cosine, batch 16:
covidnet-s after 60 epochs / rounds, central 99.73% (AUC 1.000), federated 98.91% (AUC
1.000), a gap of 0.82 points; 0.27 with ``--server-lr 1.5``. Other seeds, binary classes and
the history of the investigation are in docs/model-quality.md.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import metrics
from .data import LocalData
from .partition import assign_patients, hospital_name
from .synth import write_synthetic
from . import strategies
from .training import (
    TrainingParams,
    build_model,
    data_gradient,
    extrapolate,
    flat_weights,
    load_flat_weights,
    predict_proba,
    tensor_sizes,
    train_local,
)


def _test_report(model, test: LocalData) -> dict:
    return metrics.compute(test.y_val, predict_proba(model, test.x_val), test.classes)


def _summary(report: dict) -> dict:
    keys = ("accuracy", "auc", "sensitivity", "ppv", "sensitivity_positive", "ppv_positive", "n")
    return {k: report[k] for k in keys}


class _Aggregator:
    """FedAvg of one round: encrypted (public-context sum, secret-key decrypt) or plaintext."""

    def __init__(self, encrypted: bool, profile: str | None = None):
        self.encrypted = encrypted
        self.bytes_per_update = 0
        if encrypted:
            from . import crypto

            keys = crypto.generate_keys(profile) if profile else crypto.generate_keys()
            self.secret = crypto.load_context(keys.secret)
            self.public = crypto.load_context(keys.public)

    def fedavg(self, updates: list[tuple[np.ndarray, int]]) -> np.ndarray:
        total = sum(n for _, n in updates)
        if not self.encrypted:
            return (sum(w.astype(np.float64) * n for w, n in updates) / total).astype(np.float32)
        running = self.public.new_sum(updates[0][0].size, max_updates=len(updates))
        for weights, n in updates:
            buf = io.BytesIO()
            # hospitals hold the secret context; the round takes exactly these updates
            self.secret.encrypt_update(weights, n, buf, max_contributors=len(updates))
            self.bytes_per_update = buf.tell()
            buf.seek(0)
            running.add(buf)
        out = io.BytesIO()
        running.write(out)
        out.seek(0)
        return np.asarray(self.secret.decrypt_aggregate(out, total, n_updates=len(updates)), dtype=np.float32)


def cosine_lr(lr: float, progress: float, floor: float = 0.01) -> float:
    """The learning rate at ``progress`` (0..1) of training: cosine from lr to floor*lr."""
    return lr * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(max(progress, 0.0), 1.0))))


def run_central(train: LocalData, test: LocalData, params: TrainingParams, cosine: bool = True,
                log: Callable = print) -> dict:
    """Train ``params.epochs`` epochs on the pooled training data; report on the test split."""
    import keras

    model = build_model(params)
    history = []

    class TestEachEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            report = _test_report(self.model, test)
            history.append({"epoch": epoch + 1, "accuracy": report["accuracy"], "auc": report["auc"]})
            log(f"central epoch {epoch + 1}/{params.epochs}: test accuracy {report['accuracy']:.4f} auc {report['auc']:.4f}")

    started = time.perf_counter()
    fit = train_local(model, train, params, lr_end=cosine_lr(params.lr, 1.0) if cosine else None,
                      callbacks=[TestEachEpoch()])
    seconds = time.perf_counter() - started
    report = _test_report(model, test)
    log(f"central: {params.epochs} epochs in {seconds:.0f}s, test accuracy {report['accuracy']:.4f} auc {report['auc']:.4f}")
    return {"train": fit, "test": report, "history": history, "seconds": round(seconds, 1)}


def run_federated(
    hospitals: list[LocalData],
    test: LocalData,
    params: TrainingParams,
    rounds: int,
    encrypted: bool = True,
    cosine: bool = True,
    log: Callable = print,
    total_epochs: float | None = None,
) -> dict:
    """``params.strategy`` (cxr_mq/strategies.py) for ``rounds`` rounds of ``params.epochs``
    local epochs per hospital; with ``cosine`` the server anneals the learning rate across
    rounds as central training does across epochs. Each hospital keeps its own strategy
    state and takes the server step itself, as the workers do; the run checks that every
    hospital starts each round from the same model. With ``total_epochs`` (the epochs the
    rounds add up to) each history entry says its epoch, and under FedSGD (hundreds of
    rounds) the test set is scored about once per epoch (every rounds / epochs rounds, and
    after the last) instead of every round."""
    aggregator = _Aggregator(encrypted)
    model = build_model(params)
    sizes = tensor_sizes(model)
    strategy = strategies.make(params, sizes)
    initial = flat_weights(model)
    states = [strategies.ServerState(model=initial) for _ in hospitals]
    history = []
    started = time.perf_counter()
    for rnd in range(1, rounds + 1):
        updates = []
        starts = {strategies.model_sha256(state.model) for state in states}
        if len(starts) != 1:
            raise RuntimeError(f"round {rnd}: hospitals start from {len(starts)} different models")
        if params.strategy == "fedsgd":
            # the hospitals' SGD rate is constant (lr 1: the upload is minus the gradient); the
            # cosine belongs to the server's Adam rate, carried in each round's round_start
            if cosine:
                strategy = strategies.make(replace(params, server_lr=cosine_lr(params.server_lr,
                                                                               (rnd - 1) / rounds)), sizes)
        for h, (data, state) in enumerate(zip(hospitals, states)):
            base = state.model
            load_flat_weights(model, base)
            gradient = data_gradient(model, data) if strategy.needs_gradient else None
            lr = dict(lr=cosine_lr(params.lr, (rnd - 1) / rounds), lr_end=cosine_lr(params.lr, rnd / rounds)) \
                if cosine and params.strategy != "fedsgd" else {}
            if params.shuffle_rounds:  # rounds 1..R, R+1..2R, ... are epochs 0, 1, ...
                lr["epoch_rng"] = lambda e, h=h: np.random.default_rng([params.seed, 7, e, h])
            train_local(model, data, params, round_seed=rnd - 1 if params.shuffle_rounds else rnd * 1000 + h,
                        objective=strategy.local_objective(base, state), **lr)
            updates.append((strategy.upload(base, flat_weights(model), state, gradient), data.n_train))
        average = aggregator.fedavg(updates)
        states = [strategies.advance(strategy, state, average, f"round-{rnd}") for state in states]
        load_flat_weights(model, states[0].model)
        every = max(1, rounds // int(total_epochs)) if total_epochs and params.strategy == "fedsgd" else 1
        if rnd % every and rnd != rounds:
            continue  # FedSGD's hundreds of rounds: scoring each would cost more than training
        report = _test_report(model, test)
        entry = {"round": rnd, "accuracy": report["accuracy"], "auc": report["auc"]}
        if total_epochs:
            entry["epoch"] = round(rnd * total_epochs / rounds, 3)
        history.append(entry)
        log(f"{strategy.name} round {rnd}/{rounds}: test accuracy {report['accuracy']:.4f} auc {report['auc']:.4f}")
    seconds = time.perf_counter() - started
    return {
        "strategy": strategy.name,
        "test": report,
        "history": history,
        "seconds": round(seconds, 1),
        "encrypted": encrypted,
        "ciphertext_bytes_per_update": aggregator.bytes_per_update,
        "upload_values": int(initial.size * strategy.upload_factor),
    }


def run_central_vs_federated(
    n: int = 720,
    hospitals: int = 3,
    alpha: float | None = 0.5,
    rounds: int = 16,
    epochs_per_round: int = 1,
    encrypted: bool = True,
    classes: str = "3class",
    model: str = "covidnet-s",
    image_size: int = 32,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    test_fraction: float = 0.25,
    cosine: bool = True,
    balance: str = "none",
    equal_steps: bool = False,
    server_lr: float = 1.0,
    data_dir: str | Path | None = None,
    central: bool | dict = True,
    strategy: str = "fedavg",
    strategy_params: dict | None = None,
    width: float = 0.5,
    augment: bool = False,
    repeat: int = 0,
    log: Callable = print,
) -> dict:
    """Synthetic data (``n`` images; or an existing COVIDx ``data_dir``), a held-out test split
    by patient, a central run of ``rounds * epochs_per_round`` epochs and a federated run of
    ``rounds`` rounds x ``epochs_per_round`` local epochs over ``hospitals`` Dirichlet(alpha)
    hospitals (``alpha=None``: IID). With the strategy's ``epoch_fraction`` f < 1 the federated side runs
    ``rounds / f`` rounds of f local epochs: the same total epochs. Returns both reports and
    the per-hospital class table. ``repeat`` r > 0 trains again on the same data, split, test
    set and hospitals with training seed ``seed + 1000 r`` (model initialisation, shuffles and
    FedSGD's draws): how far runs move with the training seed alone."""
    train_seed = seed + 1000 * repeat
    # central training: Adam at ``lr``; the strategy's parameters (which may set the local
    # optimizer, its rate and the epoch fraction) apply to the federated side only
    central_params = TrainingParams(model=model, image_size=image_size, classes=classes, epochs=1, lr=lr,
                                    batch_size=batch_size, seed=train_seed, balance=balance, width=width,
                                    augment=augment)
    fed_values, said_central = _central_words(strategy_params or {})  # set from the pool, below
    params = replace(central_params, server_lr=server_lr, strategy=strategy, **fed_values)
    federated_rounds = federated_round_count(rounds * epochs_per_round, epochs_per_round, params.epoch_fraction)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        if data_dir is None:
            started = time.perf_counter()
            write_synthetic(tmp, n, seed=seed, classes=classes, size=image_size)
            log(f"synthesised {n} images in {time.perf_counter() - started:.0f}s")
            data_dir = tmp
        pool = LocalData.from_dir(data_dir, replace(params, seed=seed), val_fraction=test_fraction)
    by_patient = {}
    for p, y in zip(pool.patients_train, pool.y_train):
        by_patient.setdefault(p, pool.classes[y])
    assignment = assign_patients(by_patient, hospitals, alpha, seed=seed, min_patients=2)
    sites = [pool.select_train([p for p, h in assignment.items() if h == i]) for i in range(hospitals)]
    table = [{"name": hospital_name(i), "images": s.n_train, **s.class_counts()} for i, s in enumerate(sites)]
    log(f"train {pool.n_train} images, test {pool.n_val} images ({len(pool.val_patients)} patients)")
    for row in table:
        log("  " + "  ".join(f"{k}={v}" for k, v in row.items()))

    total_epochs = rounds * epochs_per_round
    if isinstance(central, dict):
        pass  # reused: central training does not depend on the split over hospitals
    elif central:
        central = run_central(pool, pool, replace(central_params, epochs=total_epochs), cosine=cosine, log=log)
    else:
        central = None
    # equal steps: each hospital takes (training set / hospitals / batch) steps per local epoch,
    # so a round processes one epoch's worth of samples in total (measured: slower to converge
    # than a local epoch each, 95.1% against 97.3% after 60 rounds, so off by default)
    local_steps = int(np.ceil(pool.n_train / hospitals / batch_size)) if equal_steps else params.local_steps
    if "sample_rate" in said_central:  # B / N: central training's batch over the seed's pool
        params = replace(params, sample_rate=batch_size / pool.n_train)
    if "shuffle_rounds" in said_central:  # central training's steps per epoch
        params = replace(params, shuffle_rounds=int(np.ceil(pool.n_train / batch_size)))
    if strategy == "fedsgd":
        federated_rounds = fedsgd_round_count(total_epochs, pool.n_train, [s.n_train for s in sites], params)
        per_step = (f"{params.sample_rate * pool.n_train:.1f} expected (Poisson, rate {params.sample_rate:.5f})"
                    if params.sample_rate else
                    f"{pool.n_train / params.shuffle_rounds:.1f} (one of {params.shuffle_rounds} slices of "
                    f"each hospital's epoch)" if params.shuffle_rounds
                    else f"{sum(min(params.batch_size, s.n_train) for s in sites)}")
        log(f"fedsgd: {federated_rounds} rounds of {params.local_steps or 1} step(s) x "
            f"{per_step} samples = {total_epochs} epochs")
    federated = run_federated(sites, pool, replace(params, epochs=epochs_per_round, local_steps=local_steps),
                              federated_rounds, encrypted=encrypted, cosine=cosine, log=log,
                              total_epochs=total_epochs)
    gap = None if central is None else central["test"]["accuracy"] - federated["test"]["accuracy"]
    return {
        "setup": {
            "n": n, "classes": classes, "model": model, "image_size": image_size,
            "hospitals": hospitals, "alpha": alpha, "rounds": federated_rounds, "augment": augment,
            "epochs_per_round": epochs_per_round, "total_epochs": total_epochs,
            "batch_size": batch_size, "lr": lr, "balance": balance, "equal_steps": equal_steps,
            "server_lr": server_lr, "strategy": strategy, "strategy_params": strategy_params or {},
            "width": width,
            "lr_schedule": "cosine" if cosine else "constant", "seed": seed, "encrypted": encrypted,
            "repeat": repeat, "train_seed": train_seed,
            "n_train": pool.n_train, "n_test": pool.n_val,
        },
        "hospitals": table,
        "central": None if central is None else {**central, "summary": _summary(central["test"])},
        "federated": {"summary": _summary(federated["test"]), **federated},
        "accuracy_gap_points": None if gap is None else round(100 * gap, 2),
    }


def federated_round_count(total_epochs: int, epochs_per_round: int, epoch_fraction: float) -> int:
    """Rounds of ``epochs_per_round`` local epochs of ``epoch_fraction`` each that make
    ``total_epochs``; a ValueError naming epoch_fraction if they cannot."""
    rounds = total_epochs / (epochs_per_round * epoch_fraction)
    if abs(rounds - round(rounds)) > 1e-6:
        raise ValueError(f"epoch_fraction {epoch_fraction:g}: {total_epochs} epochs are not a whole number "
                         f"of rounds of {epochs_per_round} x {epoch_fraction:g} local epochs")
    return int(round(rounds))


def fedsgd_round_count(total_epochs: int, n_train: int, site_sizes: list[int], params: TrainingParams) -> int:
    """FedSGD rounds that process ``total_epochs`` epochs of the pooled training set: each
    round every hospital takes ``local_steps`` (0: 1) steps on min(batch, its size) samples,
    or with ``sample_rate`` q on q x its size samples in expectation; with ``shuffle_rounds`` R
    an epoch is R rounds."""
    if params.shuffle_rounds:
        return total_epochs * params.shuffle_rounds
    per_step = (params.sample_rate * sum(site_sizes) if params.sample_rate
                else sum(min(params.batch_size, n) for n in site_sizes))
    per_round = (params.local_steps or 1) * per_step
    return max(1, int(round(total_epochs * n_train / per_round)))


# ``sample_rate=central`` / ``shuffle_rounds=central`` in a bench strategy: set from the seed's
# pool (B / N, and N / B rounded up: central training's batch and steps per epoch); until then
# a value that validates stands in
CENTRAL_WORDS = {"sample_rate": 1.0, "shuffle_rounds": 1}


def _central_words(values: dict) -> tuple[dict, set]:
    """``values`` with a stand-in for each parameter given as "central", and their names."""
    said = {k for k in CENTRAL_WORDS if values.get(k) == "central"}
    return {**values, **{k: CENTRAL_WORDS[k] for k in said}}, said


def parse_strategy(spec: str, total_epochs: int | None = None, epochs_per_round: int = 1) -> tuple[str, dict]:
    """``fedadam:server_lr=0.03,tau=0.001`` -> ("fedadam", {"server_lr": 0.03, "tau": 0.001});
    non-numbers stay strings (``local_optimizer=sgd``); ``lr`` sets the federated side's local
    rate (central keeps ``--lr``). With ``total_epochs``, checks that its epoch_fraction
    makes a whole number of rounds."""
    name, _, rest = spec.partition(":")
    values = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"strategy {spec!r}: {item!r} is not key=value")
        try:
            parsed: float | str | bool = float(value)
        except ValueError:
            parsed = value.strip()
            parsed = {"true": True, "false": False}.get(parsed.lower(), parsed)
        values[key.strip().replace("-", "_")] = parsed
    unknown = sorted(set(values) - set(TrainingParams().to_dict()))
    if unknown:
        raise ValueError(f"strategy {spec!r}: unknown training parameter(s) {', '.join(unknown)}")
    checked, said_central = _central_words(values)
    values = {k: v for k, v in TrainingParams.from_dict({**checked, "strategy": name}).to_dict().items()
              if k in values}  # ints as ints
    params = TrainingParams(**{**values, "strategy": name})  # names the bad field
    values.update({key: "central" for key in said_central})
    if total_epochs is not None:
        federated_round_count(total_epochs, epochs_per_round, params.epoch_fraction)
    return name, values


def run_grid(strategy_specs: list[str], alphas: list[float | None], seeds: list[int], jsonl: str | None,
             log: Callable = print, repeats: int | range = 1, **kwargs) -> list[dict]:
    """Every strategy at every alpha and seed, ``repeats`` times with other training seeds
    (``run_central_vs_federated``'s ``repeat``); one central run per seed and repeat (it does
    not depend on the split). Each result is appended to ``jsonl`` as it finishes, so a
    cut-short grid keeps what ran."""
    epochs = kwargs.get("rounds", 16) * kwargs.get("epochs_per_round", 1)
    parsed = [parse_strategy(s, epochs, kwargs.get("epochs_per_round", 1)) for s in strategy_specs]
    results = []
    with_central = bool(kwargs.pop("central", True))  # False: --federated-only, for every seed
    repeats = range(repeats) if isinstance(repeats, int) else repeats
    for seed, repeat in ((s, r) for s in seeds for r in repeats):
        central = with_central
        for alpha in alphas:
            for name, values in parsed:
                values = dict(values)  # the result keeps its own copy
                server_lr = values.pop("server_lr", kwargs.get("server_lr", 1.0))
                args = {**kwargs, "server_lr": server_lr}
                result = run_central_vs_federated(seed=seed, alpha=alpha, strategy=name, strategy_params=values,
                                                  central=central, log=log, repeat=repeat, **args)
                central = result["central"] or False
                results.append(result)
                log(f"== seed {seed} repeat {repeat} alpha {alpha} {name} {values}: "
                    f"gap {result['accuracy_gap_points']} points")
                if jsonl:
                    slim = {**result, "central": None if result["central"] is None else
                            {k: result["central"][k] for k in ("summary", "history", "seconds")}}
                    with open(jsonl, "a") as fh:
                        fh.write(json.dumps(slim, default=float) + "\n")
    return results


def _label(setup: dict) -> str:
    """The strategy and the parameters it was given, e.g. ``fedavg batch_size=4 server_lr=2``."""
    label = setup["strategy"] + "".join(f" {k}={v:g}" if isinstance(v, (int, float)) else f" {k}={v}"
                                        for k, v in sorted(setup["strategy_params"].items()) if k != "server_lr")
    if setup["server_lr"] != 1.0:
        label += f" server_lr={setup['server_lr']:g}"
    return label


def summary_table(results: list[dict]) -> str:
    """Markdown: per strategy and alpha, final federated accuracy (mean, min-max over seeds) and
    the gap to central on the same seed (mean and worst)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["setup"]["alpha"] or 0.0, _label(r["setup"])), []).append(r)
    lines = ["| alpha | strategy | seeds | federated acc % (mean, min-max) | gap to central, pts (mean, worst) |",
             "|---|---|---|---|---|"]
    for (alpha, label), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0] if kv[0][0] else -99, kv[0][1])):
        accs = [100 * r["federated"]["test"]["accuracy"] for r in rs]
        gaps = [r["accuracy_gap_points"] for r in rs if r["accuracy_gap_points"] is not None]
        gap = f"{np.mean(gaps):.2f}, {max(gaps):.2f}" if gaps else "n/a"
        lines.append(f"| {alpha or 'IID'} | {label} | {','.join(str(r['setup']['seed']) for r in rs)} | "
                     f"{np.mean(accs):.2f} ({min(accs):.2f}-{max(accs):.2f}) | {gap} |")
    return "\n".join(lines)


def _repeats(text: str) -> range:
    """``--repeats``: ``K`` (repeats 0 to K-1) or ``A-B`` (repeats A to B)."""
    first, dash, last = text.partition("-")
    try:
        out = range(int(first), int(last) + 1) if dash else range(int(first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K or A-B") from None
    if not out or out.start < 0:
        raise argparse.ArgumentTypeError(f"{text!r} names no repeat")
    return out


def _central_key(setup: dict) -> tuple:
    return setup["seed"], setup["n"], setup["total_epochs"], setup.get("repeat", 0)


def repeat_table(results: list[dict]) -> str:
    """Markdown, for runs repeated with other training seeds: per strategy, alpha and data
    seed, central and federated accuracy as mean and range over the repeats (central's range
    is its own spread), and the gap between the means."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("central") is not None:
            groups.setdefault((r["setup"]["alpha"] or 0.0, _label(r["setup"]), r["setup"]["seed"]), []).append(r)
    lines = ["| alpha | strategy | seed | repeats | central % (mean, min-max) | federated % (mean, min-max) "
             "| gap of the means, pts |", "|---|---|---|---|---|---|---|"]
    for (alpha, label, seed), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0] if kv[0][0] else -99,
                                                                           kv[0][1], kv[0][2])):
        by_repeat = {r["setup"].get("repeat", 0): r for r in rs}  # a rerun of a repeat replaces it
        central = [100 * r["central"]["summary"]["accuracy"] for r in by_repeat.values()]
        fed = [100 * r["federated"]["test"]["accuracy"] for r in by_repeat.values()]
        lines.append(f"| {alpha or 'IID'} | {label} | {seed} | {len(by_repeat)} | {np.mean(central):.2f} "
                     f"({min(central):.2f}-{max(central):.2f}) | {np.mean(fed):.2f} ({min(fed):.2f}-{max(fed):.2f}) "
                     f"| {np.mean(central) - np.mean(fed):.2f} |")
    return "\n".join(lines)


def load_results(paths: list[str]) -> list[dict]:
    """Grid results from ``--jsonl`` files; runs made with ``--federated-only`` get the gap to
    the central run of the same seed and data size found in the files."""
    results = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    central = {_central_key(r["setup"]): r["central"] for r in results if r.get("central")}
    for r in results:
        found = central.get(_central_key(r["setup"]))
        if r.get("central") is None and found is not None:
            r["central"] = found
            r["accuracy_gap_points"] = round(100 * (found["summary"]["accuracy"]
                                                    - r["federated"]["test"]["accuracy"]), 2)
    return results


def plot_curves(results: list[dict], path: str) -> None:
    """Test accuracy per epoch, one panel per alpha: each federated run, and as dashed lines
    the central run of each seed shown. A panel of one strategy names it in the title and
    its legend only the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({r["setup"]["alpha"] or 0.0 for r in results})
    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 3.8), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        runs = sorted((r for r in results if (r["setup"]["alpha"] or 0.0) == alpha),
                      key=lambda r: (_label(r["setup"]), r["setup"]["seed"]))
        labels = {_label(r["setup"]) for r in runs}
        for r in runs:
            h = r["federated"]["history"]
            name = f"seed {r['setup']['seed']}" if len(labels) == 1 else f"{_label(r['setup'])} (seed {r['setup']['seed']})"
            ax.plot([e.get("epoch", e["round"]) for e in h], [100 * e["accuracy"] for e in h], label=name)
        centrals = {}
        for r in runs:
            if r.get("central"):
                centrals.setdefault(r["setup"]["seed"], r["central"])
        for (seed, central), style in zip(sorted(centrals.items()), ("--", ":", "-.", (0, (5, 1)))):
            ax.plot([e["epoch"] for e in central["history"]], [100 * e["accuracy"] for e in central["history"]],
                    color="k", linestyle=style, linewidth=1, label=f"central (seed {seed})")
        title = f"alpha {alpha or 'IID'}"
        if len(labels) == 1:
            import textwrap

            title += "\n" + "\n".join(textwrap.wrap(next(iter(labels)), 60))
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch (federated: samples processed / training set)", fontsize=8)
        ax.set_ylabel("test accuracy %")
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=720)
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha; 0 for IID")
    ap.add_argument("--rounds", type=int, default=16,
                    help="central epochs = rounds x epochs per round (federated: the same total)")
    ap.add_argument("--epochs-per-round", type=int, default=1)
    ap.add_argument("--plaintext", action="store_true", help="FedAvg without encryption")
    ap.add_argument("--classes", default="3class", choices=["binary", "3class"])
    ap.add_argument("--model", default="covidnet-s")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--balance", default="none", choices=["none", "weights", "resample"])
    ap.add_argument("--equal-steps", action="store_true",
                    help="every hospital takes the same number of steps per round (not one local epoch)")
    ap.add_argument("--server-lr", type=float, default=1.0,
                    help="FedAvg server learning rate (each hospital extrapolates its update)")
    ap.add_argument("--constant-lr", action="store_true", help="no cosine learning-rate annealing")
    ap.add_argument("--data", default=None, help="an existing COVIDx directory instead of synthetic data")
    ap.add_argument("--json", default=None, help="write the full result here")
    ap.add_argument("--width", type=float, default=0.5, help="model channel multiplier")
    ap.add_argument("--augment", action="store_true",
                    help="COVID-Net's training augmentation (off by default: it slows a 16-epoch run, see docs)")
    ap.add_argument("--strategy", action="append", default=None, metavar="NAME[:k=v,...]",
                    help="strategy and its parameters, repeatable, e.g. fedprox:prox_mu=0.01 or "
                         "fedadam:server_lr=0.03; more than one (or --alphas/--seeds) runs a grid")
    ap.add_argument("--alphas", default=None, help="comma-separated alphas (0 = IID) for a grid")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds for a grid")
    ap.add_argument("--repeats", type=_repeats, default=range(1),
                    help="grid: train each seed K times with other training seeds (same data, split and "
                         "test set), or only repeats A-B of them: the table then compares means over repeats")
    ap.add_argument("--jsonl", default=None, help="grid: append each run's result here as it ends")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                    help="no training: print the table of earlier --jsonl results")
    ap.add_argument("--plot", default=None, help="with --report: write the learning curves here (PNG)")
    ap.add_argument("--federated-only", action="store_true",
                    help="skip the central run (e.g. to compare federated settings against one central run)")
    a = ap.parse_args(argv)
    if a.report:
        results = load_results(a.report)
        print(summary_table(results))
        if any(r["setup"].get("repeat", 0) for r in results):
            print("\n" + repeat_table(results))
        if a.plot:
            plot_curves(results, a.plot)
        return
    try:
        TrainingParams(model=a.model, image_size=a.image_size, classes=a.classes, lr=a.lr,
                       batch_size=a.batch_size, seed=a.seed, balance=a.balance, server_lr=a.server_lr)
    except ValueError as exc:
        ap.error(str(exc))
    common = dict(n=a.n, hospitals=a.hospitals, rounds=a.rounds, epochs_per_round=a.epochs_per_round,
                  encrypted=not a.plaintext, classes=a.classes, model=a.model, image_size=a.image_size,
                  batch_size=a.batch_size, lr=a.lr, cosine=not a.constant_lr, balance=a.balance,
                  equal_steps=a.equal_steps, server_lr=a.server_lr, data_dir=a.data,
                  central=not a.federated_only, width=a.width, augment=a.augment)
    if (a.strategy and len(a.strategy) > 1) or a.alphas or a.seeds or a.repeats != range(1):
        try:
            alphas = [float(x) or None for x in (a.alphas or str(a.alpha)).split(",")]
            seeds = [int(x) for x in (a.seeds or str(a.seed)).split(",")]
            results = run_grid(a.strategy or ["fedavg"], alphas, seeds, a.jsonl, repeats=a.repeats, **common)
        except ValueError as exc:
            ap.error(str(exc))
        print(summary_table(results))
        if a.repeats != range(1):
            print("\n" + repeat_table(results))
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, default=float))
        return
    try:
        name, values = parse_strategy((a.strategy or ["fedavg"])[0], a.rounds * a.epochs_per_round,
                                      a.epochs_per_round)
    except ValueError as exc:
        ap.error(str(exc))
    common["server_lr"] = values.pop("server_lr", a.server_lr)
    result = run_central_vs_federated(
        strategy=name, strategy_params=values, width=a.width, augment=a.augment,
        n=a.n, hospitals=a.hospitals, alpha=a.alpha or None, rounds=a.rounds,
        epochs_per_round=a.epochs_per_round, encrypted=not a.plaintext, classes=a.classes,
        model=a.model, image_size=a.image_size, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        cosine=not a.constant_lr, balance=a.balance, equal_steps=a.equal_steps, server_lr=common["server_lr"],
        data_dir=a.data, central=not a.federated_only,
    )
    for side in ("central", "federated"):
        if result[side] is None:
            continue
        print(f"\n== {side} ==")
        print(metrics.format_report(result[side]["test"]))
    print(f"\naccuracy gap (central - federated): {result['accuracy_gap_points']} points")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
