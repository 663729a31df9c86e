"""Partitioning one dataset across hospitals by patient: disjoint, IID or Dirichlet non-IID."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr_mq.data import read_label_file
from cxr_mq.partition import (
    assign_patients,
    class_skew,
    format_class_table,
    partition_dataset,
    partition_records,
)


def _patients(n=300, classes=("normal", "pneumonia", "COVID-19")):
    return {f"p{i}": classes[i % len(classes)] for i in range(n)}


def _records(n_patients=300, per_patient=2):
    from cxr_mq.data import LabelRecord

    classes = ("normal", "pneumonia", "COVID-19")
    return [LabelRecord(f"p {i}", f"p{i}_{j}.png", classes[i % 3], "src", 1 + i * per_patient + j)
            for i in range(n_patients) for j in range(per_patient)]


@pytest.mark.parametrize("alpha", [None, 0.1, 1.0, 100.0])
def test_every_patient_in_exactly_one_hospital(alpha):
    records = _records()
    parts = partition_records(records, 4, alpha=alpha, seed=3)
    assert sum(len(p) for p in parts) == len(records)
    seen = [{r.patient for r in part} for part in parts]
    for i in range(4):
        assert seen[i], "every hospital gets patients"
        for j in range(i + 1, 4):
            assert seen[i].isdisjoint(seen[j])


def test_iid_is_balanced_in_size_and_classes():
    parts = partition_records(_records(), 3, alpha=None, seed=0)
    sizes = [len({r.patient for r in p}) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert class_skew(parts) < 0.02


def test_class_skew_grows_as_alpha_falls():
    patients = _patients()
    records = _records()
    skews = {}
    for alpha in (100.0, 1.0, 0.1):
        skews[alpha] = np.mean([class_skew(partition_records(records, 5, alpha=alpha, seed=s)) for s in range(8)])
    assert skews[100.0] < skews[1.0] < skews[0.1]
    assert skews[100.0] < 0.1 and skews[0.1] > 0.3
    # quantity skew too: hospital sizes spread further apart at small alpha
    spread = {a: np.mean([np.std(np.bincount(list(assign_patients(patients, 5, a, seed=s).values()),
                                             minlength=5)) for s in range(8)]) for a in (100.0, 0.1)}
    assert spread[0.1] > spread[100.0]


def test_deterministic_per_seed():
    patients = _patients(60)
    assert assign_patients(patients, 3, 0.5, seed=1) == assign_patients(patients, 3, 0.5, seed=1)
    assert assign_patients(patients, 3, 0.5, seed=1) != assign_patients(patients, 3, 0.5, seed=2)


def test_rejects_impossible_requests():
    with pytest.raises(ValueError, match="patients"):
        assign_patients(_patients(2), 3)
    with pytest.raises(ValueError, match="alpha"):
        assign_patients(_patients(10), 2, alpha=0.0)


def test_partition_dataset_writes_hospital_dirs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = []
    for i in range(12):
        name = f"img{i}.png"
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(src / name)
        label = ("negative", "positive")[i % 2]
        lines.append(f"COVID {i // 2} {name} {label} sourceX")  # two images per patient, ids with spaces
    (src / "labels.txt").write_text("\n".join(lines) + "\n")
    table = partition_dataset(src / "labels.txt", 2, tmp_path / "out", alpha=None, seed=0)
    patients = []
    for h in table["hospitals"]:
        labels = read_label_file(tmp_path / "out" / h["name"] / "labels.txt")
        assert len(labels.records) == h["images"]
        assert sum(h["counts"].values()) == h["images"]
        patients.append({r.patient for r in labels.records})
    assert patients[0].isdisjoint(patients[1]) and len(patients[0] | patients[1]) == 6
    text = format_class_table(table)
    assert "hospital-1" in text and "negative" in text and "total" in text
    assert text.splitlines()[-1].split()[1:3] == ["6", "12"]
