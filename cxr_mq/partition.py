"""Split one COVIDx dataset across simulated hospitals, by patient.

IID: patients are stratified by class and dealt round-robin, so every hospital gets about the
same number of patients and the global class mix. Non-IID: for each class, the share each
hospital receives is drawn from Dirichlet(alpha) (Hsu et al. 2019), which skews both the
class mix and the quantity per hospital; smaller alpha, stronger skew. No patient is ever in
two hospitals.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .data import LabelRecord, read_label_file, write_label_file

MAX_DRAWS = 1000


def patient_classes(records: Sequence[LabelRecord]) -> dict[str, str]:
    """Each patient's most frequent class (ties broken by name, for determinism)."""
    counts: dict[str, Counter] = {}
    for r in records:
        counts.setdefault(r.patient, Counter())[r.label] += 1
    return {p: max(sorted(c), key=c.__getitem__) for p, c in counts.items()}


def assign_patients(
    classes_by_patient: Mapping[str, str],
    hospitals: int,
    alpha: float | None = None,
    seed: int = 0,
    min_patients: int = 1,
) -> dict[str, int]:
    """Map each patient to a hospital index 0..hospitals-1; ``alpha=None`` means IID.

    Non-IID draws are repeated until every hospital has at least ``min_patients`` patients.
    """
    if hospitals < 1:
        raise ValueError(f"hospitals must be at least 1, got {hospitals}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if len(classes_by_patient) < hospitals * min_patients:
        raise ValueError(
            f"{len(classes_by_patient)} patients cannot fill {hospitals} hospitals "
            f"with at least {min_patients} each"
        )
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    for patient in sorted(classes_by_patient):
        by_class.setdefault(classes_by_patient[patient], []).append(patient)
    for label in sorted(by_class):
        rng.shuffle(by_class[label])

    if alpha is None:
        assignment, turn = {}, 0
        for label in sorted(by_class):
            for patient in by_class[label]:
                assignment[patient] = turn % hospitals
                turn += 1
        return assignment

    for _ in range(MAX_DRAWS):
        assignment = {}
        for label in sorted(by_class):
            patients = by_class[label]
            shares = rng.dirichlet(np.full(hospitals, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(patients)).round().astype(int)
            for h, part in enumerate(np.split(np.asarray(patients, dtype=object), cuts)):
                for patient in part:
                    assignment[patient] = h
        sizes = np.bincount(list(assignment.values()), minlength=hospitals)
        if sizes.min() >= min_patients:
            return assignment
    raise ValueError(
        f"could not give every hospital {min_patients} patient(s) in {MAX_DRAWS} Dirichlet draws "
        f"(alpha={alpha}); raise alpha or lower the hospital count"
    )


def partition_records(
    records: Sequence[LabelRecord],
    hospitals: int,
    alpha: float | None = None,
    seed: int = 0,
) -> list[list[LabelRecord]]:
    assignment = assign_patients(patient_classes(records), hospitals, alpha, seed)
    parts: list[list[LabelRecord]] = [[] for _ in range(hospitals)]
    for r in records:
        parts[assignment[r.patient]].append(r)
    return parts


def class_table(parts: Sequence[Sequence[LabelRecord]], classes: Sequence[str] | None = None) -> dict:
    """{"classes": [...], "hospitals": [{"name", "patients", "images", "counts": {class: n}}]}."""
    if classes is None:
        classes = sorted({r.label for part in parts for r in part})
    rows = []
    for i, part in enumerate(parts):
        counts = Counter(r.label for r in part)
        rows.append({
            "name": hospital_name(i),
            "patients": len({r.patient for r in part}),
            "images": len(part),
            "counts": {c: int(counts.get(c, 0)) for c in classes},
        })
    return {"classes": list(classes), "hospitals": rows}


def format_class_table(table: dict) -> str:
    classes = table["classes"]
    header = ["hospital", "patients", "images"] + list(classes)
    rows = [[h["name"], str(h["patients"]), str(h["images"])] + [str(h["counts"][c]) for c in classes]
            for h in table["hospitals"]]
    totals = ["total", str(sum(h["patients"] for h in table["hospitals"])),
              str(sum(h["images"] for h in table["hospitals"]))]
    totals += [str(sum(h["counts"][c] for h in table["hospitals"])) for c in classes]
    widths = [max(len(r[i]) for r in [header] + rows + [totals]) for i in range(len(header))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule] + [fmt(r) for r in rows] + [rule, fmt(totals)])


def class_skew(parts: Sequence[Sequence[LabelRecord]]) -> float:
    """Mean total-variation distance between each hospital's class mix and the pooled mix (0 = IID)."""
    classes = sorted({r.label for part in parts for r in part})
    pooled = Counter(r.label for part in parts for r in part)
    total = sum(pooled.values())
    global_mix = np.array([pooled[c] / total for c in classes])
    distances = []
    for part in parts:
        if not part:
            continue
        counts = Counter(r.label for r in part)
        mix = np.array([counts[c] / len(part) for c in classes])
        distances.append(0.5 * np.abs(mix - global_mix).sum())
    return float(np.mean(distances)) if distances else 0.0


def hospital_name(index: int) -> str:
    return f"hospital-{index + 1}"


def _place(src: Path, dst: Path, mode: str) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
        return
    if mode == "link":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy instead
    shutil.copy2(src, dst)


def partition_dataset(
    label_file: str | Path,
    hospitals: int,
    out_dir: str | Path,
    alpha: float | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    mode: str = "copy",
) -> dict:
    """Write ``out_dir/hospital-<i>/labels.txt`` plus its images for each hospital; return the
    class table (see :func:`class_table`) with each hospital's ``dir`` and the skipped lines.

    ``mode`` places images by ``copy``, hard ``link`` (copy across filesystems) or ``symlink``.
    """
    if mode not in ("copy", "link", "symlink"):
        raise ValueError(f"mode must be copy, link or symlink, got {mode!r}")
    labels = read_label_file(label_file, skip_bad=skip_bad)
    parts = partition_records(labels.records, hospitals, alpha, seed)
    out_dir = Path(out_dir)
    table = class_table(parts, _classes_in_order(labels.records))
    for i, part in enumerate(parts):
        hdir = out_dir / hospital_name(i)
        hdir.mkdir(parents=True, exist_ok=True)
        for r in part:
            target = hdir / r.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(r.path, target, mode)
        write_label_file(hdir / "labels.txt", part)
        table["hospitals"][i]["dir"] = str(hdir)
    table["skipped"] = list(labels.skipped)
    table["alpha"] = alpha
    table["seed"] = seed
    return table


def _classes_in_order(records: Sequence[LabelRecord]) -> list[str]:
    from .data import BINARY, THREE_CLASS

    present = {r.label for r in records}
    ordered = [c for c in BINARY + THREE_CLASS if c in present]
    return ordered + sorted(present - set(ordered))
