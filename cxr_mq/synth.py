"""Procedurally drawn chest radiographs in COVIDx format, for demos, tests and benchmarks.

Each synthetic patient gets an anatomy (thorax, lung fields, heart shadow, mediastinum and
spine, diaphragm domes, ribs, clavicles) with per-patient variation, and 1-3 images that vary
in positioning, exposure and noise. Findings follow the radiological descriptions:

- COVID-19: bilateral, peripheral, lower-zone ground-glass opacities (hazy, vessels still
  visible, several patches on both sides);
- bacterial pneumonia: lobar consolidation (one lung, one lobe, dense and homogeneous, with a
  sharp fissure border);
- normal: clear lung fields.

Binary datasets follow COVIDx: ``positive`` is COVID-19, ``negative`` is half normal and half
pneumonia, so the task is not "any opacity". Severity ranges down to subtle disease.

Images are white = dense (as read), 8-bit PNG, ``size`` wide and ``size / 0.92`` tall so that
COVID-Net's 8% top crop leaves a ``size`` square.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import CROP_TOP, class_names

SOURCE = "synthcxr"


@dataclass(frozen=True)
class Anatomy:
    """Per-patient geometry in normalised image coordinates (x right, y down, both 0..1)."""

    thorax_rx: float
    thorax_cy: float
    lung_cx: float  # distance of each lung centre from the midline
    lung_rx: float
    lung_ry: float
    lung_cy: float
    heart_rx: float
    heart_ry: float
    heart_cx: float
    heart_cy: float
    dome_right: float  # y of the right hemidiaphragm's top (patient's right = image left)
    dome_left: float
    rib_spacing: float
    rib_first: float
    density: float  # soft-tissue thickness


def _anatomy(rng: np.random.Generator) -> Anatomy:
    lung_cy = rng.uniform(0.44, 0.50)
    lung_ry = rng.uniform(0.27, 0.32)
    dome = lung_cy + lung_ry * rng.uniform(0.72, 0.85)
    return Anatomy(
        thorax_rx=rng.uniform(0.40, 0.47),
        thorax_cy=rng.uniform(0.52, 0.58),
        lung_cx=rng.uniform(0.19, 0.23),
        lung_rx=rng.uniform(0.14, 0.17),
        lung_ry=lung_ry,
        lung_cy=lung_cy,
        heart_rx=rng.uniform(0.15, 0.20),
        heart_ry=rng.uniform(0.12, 0.15),
        heart_cx=0.5 + rng.uniform(0.04, 0.08),
        heart_cy=dome - rng.uniform(0.03, 0.06),
        dome_right=dome - rng.uniform(0.01, 0.04),
        dome_left=dome + rng.uniform(0.0, 0.02),
        rib_spacing=rng.uniform(0.060, 0.072),
        rib_first=rng.uniform(0.15, 0.19),
        density=rng.uniform(0.85, 1.15),
    )


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _ellipse(x, y, cx, cy, rx, ry, edge=0.08):
    """Soft ellipse mask: 1 inside, 0 outside, ``edge`` the relative softness."""
    e = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _sigmoid((1.0 - e) / edge)


def _smooth_noise(rng, shape, cells):
    """Band-limited noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    h, w = shape
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    up = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(up), -1.5, 1.5)


def _gaussian(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _lungs(x, y, a: Anatomy):
    """(right lung, left lung) soft masks, cut by the diaphragm domes and the heart."""
    masks = []
    for side, dome in ((-1, a.dome_right), (1, a.dome_left)):
        cx = 0.5 + side * a.lung_cx
        # the lung is pear-shaped: wider at the base
        widen = 1.0 + 0.25 * np.clip((y - a.lung_cy) / a.lung_ry, -1.0, 1.0)
        e = np.sqrt(((x - cx) / (a.lung_rx * widen)) ** 2 + ((y - a.lung_cy) / a.lung_ry) ** 2)
        m = _sigmoid((1.0 - e) / 0.06)
        # diaphragm dome: a parabola peaking at the lung centre, lower laterally (costophrenic angle)
        dome_y = dome + 2.0 * ((x - cx) / (2.2 * a.lung_rx)) ** 2 * a.lung_ry
        m = m * _sigmoid((dome_y - y) / 0.008)
        m = m * _sigmoid((np.abs(x - 0.5) - 0.045) / 0.01)  # mediastinum
        masks.append(m)
    heart = _ellipse(x, y, a.heart_cx, a.heart_cy, a.heart_rx, a.heart_ry, edge=0.07)
    masks[1] = masks[1] * (1.0 - 0.95 * heart)
    masks[0] = masks[0] * (1.0 - 0.95 * heart)
    return masks[0], masks[1], heart


def _ribs(x, y, a: Anatomy, thorax):
    ribs = np.zeros_like(x)
    for side in (-1, 1):
        t = np.clip(side * (x - 0.5) / 0.42, 0.0, 1.2)  # 0 at the spine, 1 at the lateral wall
        for k in range(10):
            y0 = a.rib_first + k * a.rib_spacing
            # posterior rib: rises from the spine, arcs laterally and descends
            curve = y0 - 0.10 * t + 0.34 * t ** 2
            thick = 0.009 + 0.0015 * k
            band = np.exp(-0.5 * ((y - curve) / thick) ** 2) * _sigmoid((t - 0.06) / 0.02) \
                * _sigmoid((1.0 - t) / 0.05)
            ribs += band * (0.7 + 0.3 * t)
    return ribs * thorax


def _clavicles(x, y, a: Anatomy):
    out = np.zeros_like(x)
    for side in (-1, 1):
        t = side * (x - 0.5)
        line = a.rib_first - 0.03 - 0.16 * (t - 0.05) + 0.25 * (t - 0.15) ** 2
        out += np.exp(-0.5 * ((y - line) / 0.013) ** 2) * _sigmoid((t - 0.05) / 0.01) \
            * _sigmoid((0.36 - t) / 0.02)
    return out


def _covid_findings(rng, x, y, a: Anatomy, lungs, severity):
    """Bilateral, peripheral, lower-zone ground-glass opacities."""
    opacity = np.zeros_like(x)
    for side, lung in ((-1, lungs[0]), (1, lungs[1])):
        cx = 0.5 + side * a.lung_cx
        for _ in range(rng.integers(1, 4)):
            # peripheral: the lateral third of the lung; lower zone: below the hilum
            px = cx + side * a.lung_rx * rng.uniform(0.45, 0.95)
            py = a.lung_cy + a.lung_ry * rng.uniform(0.0, 0.6)
            blob = _gaussian(x, y, px, py, rng.uniform(0.045, 0.075), rng.uniform(0.06, 0.10))
            opacity += blob * rng.uniform(0.6, 1.0) * lung
    haze = 0.75 + 0.25 * _smooth_noise(rng, x.shape, 10)
    return severity * 0.5 * np.clip(opacity, 0.0, 1.0) * haze


def _pneumonia_findings(rng, x, y, a: Anatomy, lungs, severity):
    """Lobar consolidation: one lung, one lobe, dense, bounded by a fissure."""
    side = rng.choice([-1, 1])
    lung = lungs[0] if side == -1 else lungs[1]
    cx = 0.5 + side * a.lung_cx
    lobe = rng.choice(["lower", "upper", "middle"] if side == -1 else ["lower", "upper"])
    slope = rng.uniform(-0.35, 0.35)
    if lobe == "upper":
        fissure = a.lung_cy - a.lung_ry * rng.uniform(0.0, 0.3) + slope * (x - cx)
        region = _sigmoid((fissure - y) / 0.006)
    elif lobe == "lower":
        fissure = a.lung_cy + a.lung_ry * rng.uniform(0.05, 0.35) + slope * (x - cx)
        region = _sigmoid((y - fissure) / 0.006)
    else:  # right middle lobe: between the horizontal fissure and the base, medially
        fissure = a.lung_cy + a.lung_ry * rng.uniform(0.0, 0.2)
        region = _sigmoid((y - fissure) / 0.006) * _sigmoid((np.abs(x - 0.5) - 0.1) / 0.03) \
            * _sigmoid((a.lung_cx + 0.5 * a.lung_rx - np.abs(x - 0.5)) / 0.03)
    # the consolidation fills part of the lobe: a soft patch anchored on the fissure side
    patch_cx = cx + side * a.lung_rx * rng.uniform(-0.1, 0.6)
    patch_cy = float(np.mean(fissure)) + (0.08 if lobe != "upper" else -0.08)
    patch = _sigmoid((1.0 - np.sqrt(((x - patch_cx) / (a.lung_rx * rng.uniform(0.9, 1.5))) ** 2
                                    + ((y - patch_cy) / (a.lung_ry * rng.uniform(0.35, 0.6))) ** 2)) / 0.15)
    texture = 0.85 + 0.15 * _smooth_noise(rng, x.shape, 14)
    return severity * 0.6 * region * patch * lung * texture


def _render(rng, finding_rng, anatomy: Anatomy, label: str, severity: float, width: int, height: int) -> np.ndarray:
    """One image; findings draw from their own generator so that the same patient drawn
    with and without disease differs only by the findings."""
    a = anatomy
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x = (x + 0.5) / width
    y = (y + 0.5) / height
    # positioning: small rotation and shift per image
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    dx, dy = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    xr = 0.5 + np.cos(angle) * (x - 0.5 - dx) - np.sin(angle) * (y - 0.5 - dy)
    yr = 0.5 + np.sin(angle) * (x - 0.5 - dx) + np.cos(angle) * (y - 0.5 - dy)
    x, y = xr, yr

    thorax = _ellipse(x, y, 0.5, a.thorax_cy, a.thorax_rx, 0.62, edge=0.04)
    neck = _ellipse(x, y, 0.5, 0.0, 0.11, 0.2, edge=0.1)
    shoulders = _ellipse(x, y, 0.5, 0.14, 0.5, 0.12, edge=0.15) * (y > 0.06)
    body = np.clip(thorax + neck + 0.8 * shoulders, 0.0, 1.0)
    right, left, heart = _lungs(x, y, a)
    lungs = np.clip(right + left, 0.0, 1.0)
    spine = np.exp(-0.5 * ((x - 0.5) / 0.028) ** 2) * body
    mediastinum = _ellipse(x, y, 0.5, a.lung_cy - 0.05, 0.06, 0.3, edge=0.1)
    # vascular markings: fine texture, strongest near the hila, fading to the periphery
    hilum = np.exp(-((np.abs(x - 0.5) - 0.1) / 0.15) ** 2 - ((y - a.lung_cy) / 0.25) ** 2)
    vessels = np.abs(_smooth_noise(rng, x.shape, 40)) * lungs * (0.3 + 0.7 * hilum)

    attenuation = (
        0.60 * a.density * body
        - 0.42 * lungs
        + 0.08 * vessels
        + 0.10 * heart
        + 0.12 * mediastinum
        + 0.10 * spine
        + 0.08 * _ribs(x, y, a, thorax * _sigmoid((0.6 * a.thorax_rx - np.abs(x - 0.5) + 0.2) / 0.03))
        + 0.14 * _clavicles(x, y, a)
    )
    if label == "COVID-19":
        attenuation = attenuation + _covid_findings(finding_rng, x, y, a, (right, left), severity)
    elif label == "pneumonia":
        attenuation = attenuation + _pneumonia_findings(finding_rng, x, y, a, (right, left), severity)

    # exposure: brightness, contrast and gamma per image; then quantum noise
    contrast = rng.uniform(0.85, 1.2)
    offset = rng.uniform(0.02, 0.10)
    gamma = rng.uniform(0.8, 1.25)
    image = np.clip(offset + contrast * attenuation, 0.0, 1.0) ** gamma
    image = image + rng.normal(0.0, rng.uniform(0.012, 0.03), image.shape)
    return np.clip(image, 0.0, 1.0)


def _class_schedule(classes: str) -> list[str]:
    """Per-patient findings in a balanced cycle: COVIDx binary negatives are normal or pneumonia."""
    if classes == "binary":
        return ["COVID-19", "normal", "COVID-19", "pneumonia"]
    return ["normal", "pneumonia", "COVID-19"]


def _label_for(finding: str, classes: str) -> str:
    if classes == "binary":
        return "positive" if finding == "COVID-19" else "negative"
    return finding


def render_patient(seed: int, patient: int, finding: str, n_images: int, size: int = 64) -> list[np.ndarray]:
    """The images of one synthetic patient as float arrays in [0,1], shape (size/0.92, size)."""
    rng = np.random.default_rng([seed, patient])
    anatomy = _anatomy(rng)
    severity = rng.uniform(0.45, 1.0)
    height = int(round(size / (1.0 - CROP_TOP)))
    images = []
    for _ in range(n_images):
        # follow-up images: the disease progresses or resolves a little
        sev = float(np.clip(severity * rng.uniform(0.8, 1.2), 0.2, 1.2))
        image_rng, finding_rng = rng.spawn(2)
        images.append(_render(image_rng, finding_rng, anatomy, finding, sev, size, height))
    return images


def write_synthetic(out_dir, n: int, seed: int = 0, classes: str = "binary", size: int = 64) -> Path:
    """Write ``n`` synthetic CXRs as PNGs plus a COVIDx ``labels.txt`` (``patientid filename
    class source``) into ``out_dir``; return the label file's path. Deterministic in
    ``seed``: the same seed gives byte-identical files."""
    class_names(classes)  # validates
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schedule = _class_schedule(classes)
    lines: list[str] = []
    patient = 0
    while len(lines) < n:
        cycle = list(rng.permutation(schedule))
        for finding in cycle:
            if len(lines) >= n:
                break
            k = int(min(rng.choice([1, 1, 1, 2, 2, 3]), n - len(lines)))
            pid = f"synth{patient:05d}"
            for j, img in enumerate(render_patient(seed, patient, finding, k, size)):
                name = f"{pid}_{j}.png"
                Image.fromarray(np.round(img * 255.0).astype(np.uint8)).save(out_dir / name)
                lines.append(f"{pid} {name} {_label_for(finding, classes)} {SOURCE}")
            patient += 1
    path = out_dir / "labels.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
