"""Synthetic CXR datasets: COVIDx format, determinism, class findings where radiologists put them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from cxr_mq import synth
from cxr_mq.data import read_label_file


def _digest(directory):
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_writes_covidx_label_file_and_pngs(tmp_path):
    path = synth.write_synthetic(tmp_path, 12, seed=1, classes="3class", size=32)
    assert path == tmp_path / "labels.txt"
    labels = read_label_file(path)
    assert len(labels.records) == 12
    assert {r.label for r in labels.records} == {"normal", "pneumonia", "COVID-19"}
    assert all(r.source == synth.SOURCE for r in labels.records)
    for line in path.read_text().splitlines():
        assert len(line.split()) == 4
    with Image.open(labels.records[0].path) as img:
        assert img.mode == "L" and img.size == (32, round(32 / 0.92))


def test_binary_classes_and_patients_with_several_images(tmp_path):
    labels = read_label_file(synth.write_synthetic(tmp_path, 40, seed=0, classes="binary", size=24))
    counts = {c: sum(r.label == c for r in labels.records) for c in ("negative", "positive")}
    assert counts["negative"] > 0 and counts["positive"] > 0
    per_patient = {}
    for r in labels.records:
        per_patient.setdefault(r.patient, set()).add(r.label)
    assert len(per_patient) < 40  # follow-up images
    assert all(len(v) == 1 for v in per_patient.values())  # one diagnosis per patient


def test_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.write_synthetic(a, 6, seed=5, size=24)
    synth.write_synthetic(b, 6, seed=5, size=24)
    synth.write_synthetic(c, 6, seed=6, size=24)
    assert _digest(a) == _digest(b) != _digest(c)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        synth.write_synthetic(tmp_path, 0)
    with pytest.raises(ValueError):
        synth.write_synthetic(tmp_path, 3, classes="4class")


def _lung_zone_brightness(finding, zone, patients=range(12), size=64):
    """Mean brightness of a lung zone over patients, minus the same patients drawn normal."""
    h = round(size / 0.92)
    ys, xs = np.mgrid[0:h, 0:size] / np.array([h, size])[:, None, None]
    lower = (ys > 0.5) & (ys < 0.7)
    zones = {
        "lower-peripheral": lower & ((xs < 0.2) | (xs > 0.8)),
        "upper": (ys > 0.2) & (ys < 0.35) & (np.abs(xs - 0.5) > 0.1),
    }
    diffs = []
    for p in patients:
        sick = synth.render_patient(7, p, finding, 1, size)[0]
        well = synth.render_patient(7, p, "normal", 1, size)[0]
        diffs.append(float((sick - well)[zones[zone]].mean()))
    return np.array(diffs)


def test_covid_opacities_are_bilateral_peripheral_and_lower_zone():
    lower = _lung_zone_brightness("COVID-19", "lower-peripheral")
    upper = _lung_zone_brightness("COVID-19", "upper")
    assert lower.mean() > 0.02 and lower.mean() > 3 * max(upper.mean(), 0.0)
    size, p = 64, 3
    h = round(size / 0.92)
    sick = synth.render_patient(7, p, "COVID-19", 1, size)[0]
    well = synth.render_patient(7, p, "normal", 1, size)[0]
    diff = (sick - well)[int(0.45 * h):int(0.8 * h)]
    left, right = diff[:, : size // 2].mean(), diff[:, size // 2:].mean()
    assert left > 0.005 and right > 0.005  # both lungs


def test_pneumonia_consolidation_is_unilateral():
    size = 64
    ratios = []
    for p in range(8):
        sick = synth.render_patient(7, p, "pneumonia", 1, size)[0]
        well = synth.render_patient(7, p, "normal", 1, size)[0]
        diff = np.clip(sick - well, 0, None)
        sides = sorted([diff[:, : size // 2 - 3].sum(), diff[:, size // 2 + 3:].sum()])
        ratios.append(sides[0] / max(sides[1], 1e-9))
    assert np.median(ratios) < 0.35


@pytest.mark.parametrize("finding", ["COVID-19", "pneumonia"])
def test_findings_stay_in_the_lungs(finding):
    # the same patient and exposure drawn with and without disease differ only inside the
    # lung fields: not above the apices, not below the diaphragm, not outside the thorax
    size = 64
    h = round(size / 0.92)
    for p in range(4):
        diff = synth.render_patient(7, p, finding, 1, size)[0] - synth.render_patient(7, p, "normal", 1, size)[0]
        assert np.abs(diff[: int(0.08 * h)]).max() < 0.01
        assert np.abs(diff[int(0.93 * h):]).max() < 0.01
        assert np.abs(diff[:, :2]).max() < 0.01 and np.abs(diff[:, -2:]).max() < 0.01
        assert np.abs(diff).max() > 0.05
