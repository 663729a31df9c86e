"""A hospital's local chest X-ray data: COVIDx label files, image decoding, COVID-Net
preprocessing, the patient-level train/validation split and the tf.data pipeline.

Label lines are ``patientid filename class [source]``, parsed from the right so patient ids
may contain spaces. Images are PNG/JPEG (8/16-bit, gray or RGB) or DICOM.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

BINARY = ("negative", "positive")
THREE_CLASS = ("normal", "pneumonia", "COVID-19")
CLASS_SETS = {"binary": BINARY, "3class": THREE_CLASS}

# Spellings seen in COVIDx releases and their derivatives, mapped to canonical names.
_CLASS_ALIASES = {
    "negative": "negative",
    "positive": "positive",
    "normal": "normal",
    "pneumonia": "pneumonia",
    "covid-19": "COVID-19",
    "covid19": "COVID-19",
    "covid": "COVID-19",
}
# COVIDx's binary task: COVID-19 is positive, normal and (non-COVID) pneumonia negative.
_TO_BINARY = {"normal": "negative", "pneumonia": "negative", "COVID-19": "positive"}

CROP_TOP = 0.08
DEFAULT_IMAGE_SIZE = 224  # CPU-friendly; COVID-Net used 480
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


class DataError(ValueError):
    """Bad input data: a malformed label line, a missing or unreadable image."""


def class_names(classes: str) -> tuple[str, ...]:
    try:
        return CLASS_SETS[classes]
    except KeyError:
        raise ValueError(f"classes must be one of {sorted(CLASS_SETS)}, got {classes!r}") from None


def canonical_class(token: str) -> str | None:
    return _CLASS_ALIASES.get(token.lower())


def map_label(label: str, classes: tuple[str, ...]) -> str | None:
    """The label in the task's class set, or None when it cannot be expressed there."""
    if label in classes:
        return label
    if classes == BINARY:
        return _TO_BINARY.get(label)
    return None


# ---------------------------------------------------------------- label files


@dataclass(frozen=True)
class LabelRecord:
    patient: str
    filename: str
    label: str  # canonical class name as written in the file
    source: str | None
    line: int
    path: Path | None = None  # resolved image path once checked


@dataclass
class LabelFile:
    path: Path
    records: list[LabelRecord]
    skipped: list[str] = field(default_factory=list)  # one message per skipped line

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient for r in self.records})


def find_label_file(data_dir: str | Path) -> Path:
    """``labels.txt`` in data_dir, else its only ``*.txt``; a label file path is returned as is."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        return data_dir
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory")
    preferred = data_dir / "labels.txt"
    if preferred.is_file():
        return preferred
    candidates = sorted(p for p in data_dir.glob("*.txt") if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(f"{data_dir}: no label file (labels.txt or a single *.txt)")
    names = ", ".join(p.name for p in candidates)
    raise DataError(f"{data_dir}: several label files ({names}); name one or call it labels.txt")


def parse_label_line(text: str) -> tuple[str, str, str, str | None]:
    """(patient, filename, class, source) from one line, parsed from the right.

    The last token is the class in the old 3-field form and the source in the 4-field form;
    a known class name there means the 3-field form. Raises ValueError with the reason.
    """
    tokens = text.split()
    if len(tokens) < 3:
        raise ValueError(f"expected 'patientid filename class [source]', got {len(tokens)} field(s)")
    last = canonical_class(tokens[-1])
    if last is not None:
        label, source, rest = last, None, tokens[:-1]
    else:
        label = canonical_class(tokens[-2])
        if label is None:
            raise ValueError(
                f"unknown class {tokens[-2]!r} or {tokens[-1]!r}; "
                f"expected one of {', '.join(BINARY + THREE_CLASS)}"
            )
        if len(tokens) < 4:
            raise ValueError("missing patient id")
        source, rest = tokens[-1], tokens[:-2]
    filename = rest[-1]
    patient = " ".join(rest[:-1])
    return patient, filename, label, source


def _image_candidates(label_path: Path, filename: str, image_dir: Path | None) -> list[Path]:
    base = label_path.parent
    dirs = [image_dir] if image_dir is not None else []
    dirs += [base, base / label_path.stem, base / "images"]
    return [d / filename for d in dirs]


def read_label_file(
    path: str | Path,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
    image_dir: str | Path | None = None,
) -> LabelFile:
    """Parse a COVIDx label file and resolve each image beside it (or in ``<stem>/``, ``images/``).

    A malformed line or a missing image raises DataError naming file and line; with
    ``skip_bad`` it is logged as a warning and counted in ``skipped`` instead.
    """
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read label file: {exc}") from exc
    records: list[LabelRecord] = []
    skipped: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            patient, filename, label, source = parse_label_line(line)
            resolved = None
            if check_images:
                candidates = _image_candidates(path, filename, image_dir)
                resolved = next((c for c in candidates if c.is_file()), None)
                if resolved is None:
                    raise ValueError(f"image {filename!r} not found (looked in {candidates[0].parent})")
        except ValueError as exc:
            message = f"{path}:{lineno}: {exc}"
            if not skip_bad:
                raise DataError(message) from None
            log.warning("skipping bad label line: %s", message)
            skipped.append(message)
            continue
        records.append(LabelRecord(patient, filename, label, source, lineno, resolved))
    if not records:
        raise DataError(f"{path}: no usable label lines")
    return LabelFile(path, records, skipped)


def write_label_file(path: str | Path, records: Iterable[LabelRecord]) -> Path:
    path = Path(path)
    lines = []
    for r in records:
        fields = [r.patient, r.filename, r.label] + ([r.source] if r.source else [])
        lines.append(" ".join(fields))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- images


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def _scale_integer(arr: np.ndarray) -> np.ndarray:
    """Integer pixels to [0,1] by their container depth: 8-bit by 255; deeper images by the
    smallest of 10/12/14/16 bits that holds their maximum (12-bit CXRs often sit in 16 bits)."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    top = int(arr.max()) if arr.size else 0
    if top < 0:
        top = 0
    for bits in (8, 10, 12, 14, 16, 32):
        if top <= (1 << bits) - 1:
            break
    return np.clip(arr.astype(np.float64) / float((1 << bits) - 1), 0.0, 1.0).astype(np.float32)


def _to_gray(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4):
            arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        elif arr.shape[2] in (1, 2):
            arr = arr[..., 0]
    return arr


def _read_raster(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode == "1":
            img = img.convert("L")
        elif img.mode == "CMYK":
            img = img.convert("RGB")
        arr = np.asarray(img)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "f":
        gray = _to_gray(arr).astype(np.float32)
        lo, hi = float(gray.min()), float(gray.max())
        return (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
    if arr.ndim == 3:  # colour images are 8 bits per channel in PIL
        return (_to_gray(arr) / 255.0).astype(np.float32)
    return _scale_integer(arr)


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path), force=True)
    arr = ds.pixel_array
    if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        arr = arr[0]  # multi-frame: first frame
    if getattr(ds, "SamplesPerPixel", 1) == 3:
        arr = _to_gray(arr)
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        # DICOM PS3.3 C.11.2.1.2 linear windowing onto [0, 1]
        out = np.clip((arr - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5, 0.0, 1.0)
    else:
        if "VOILUTSequence" in ds:
            arr = apply_voi_lut(arr, ds).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: low values are white
    return out.astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """A 2-D float32 image in [0, 1], white = dense (bone). DataError naming the file if unreadable."""
    path = Path(path)
    try:
        arr = _read_dicom(path) if _is_dicom(path) else _read_raster(path)
    except DataError:
        raise
    except Exception as exc:  # PIL, pydicom and numpy raise a zoo of types
        raise DataError(f"{path}: unreadable image: {exc}") from exc
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise DataError(f"{path}: unreadable image: unexpected shape {arr.shape}")
    return arr


def preprocess(image: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """COVID-Net's preprocessing: crop the top 8%, centre-crop a square, resize, clip to [0,1]."""
    from PIL import Image

    h, w = image.shape
    image = image[int(round(h * CROP_TOP)):, :]
    h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = np.ascontiguousarray(image[top:top + side, left:left + side], dtype=np.float32)
    if side != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def load_image(path: str | Path, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """One preprocessed image, shape (size, size, 1), float32 in [0,1]."""
    return preprocess(read_image(path), image_size)[..., None]


def load_images(paths: Sequence[str | Path], image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Preprocessed images stacked to (N, size, size, 1), float32 in [0,1] (for predict)."""
    out = np.zeros((len(paths), image_size, image_size, 1), dtype=np.float32)
    for i, p in enumerate(paths):
        out[i] = load_image(p, image_size)
    return out


# ---------------------------------------------------------------- patient split


def _patient_key(patient: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{patient}".encode()).hexdigest()


def split_patients(
    records: Sequence[LabelRecord], val_fraction: float, seed: int = 0
) -> tuple[set[str], set[str]]:
    """(train patients, val patients), stratified by each patient's most frequent class.

    Patients are ordered by a seeded hash of their id, so the split is deterministic and a
    patient stays on the same side when other patients are added.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_patient: dict[str, dict[str, int]] = {}
    for r in records:
        counts = by_patient.setdefault(r.patient, {})
        counts[r.label] = counts.get(r.label, 0) + 1
    strata: dict[str, list[str]] = {}
    for patient, counts in by_patient.items():
        major = max(sorted(counts), key=counts.get)
        strata.setdefault(major, []).append(patient)
    val: set[str] = set()
    for label in sorted(strata):
        patients = sorted(strata[label], key=lambda p: _patient_key(p, seed))
        k = int(round(val_fraction * len(patients)))
        if val_fraction > 0 and k == 0 and len(patients) >= 2:
            k = 1
        val.update(patients[:k])
    train = set(by_patient) - val
    if not train and val:  # keep at least one training patient
        first = min(val, key=lambda p: _patient_key(p, seed))
        val.discard(first)
        train.add(first)
    return train, val


# ---------------------------------------------------------------- tf.data pipeline


def _augment_batch(images, seed):
    """COVID-Net's augmentation on a batch: rotation <=10 deg, shift 0.1, zoom 0.85-1.15,
    horizontal flip, brightness x0.9-1.1; one affine warp per image, constant 0 fill."""
    import tensorflow as tf

    shape = tf.shape(images)
    b = shape[0]
    h = tf.cast(shape[1], tf.float32)
    w = tf.cast(shape[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 6)
    angle = tf.random.stateless_uniform([b], seeds[0], -10.0, 10.0) * (math.pi / 180.0)
    zoom = tf.random.stateless_uniform([b], seeds[1], 0.85, 1.15)
    tx = tf.random.stateless_uniform([b], seeds[2], -0.1, 0.1) * w
    ty = tf.random.stateless_uniform([b], seeds[3], -0.1, 0.1) * h
    flip = tf.random.stateless_uniform([b], seeds[4]) < 0.5
    bright = tf.random.stateless_uniform([b, 1, 1, 1], seeds[5], 0.9, 1.1)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    # output (x, y) -> input: rotate and scale about the centre, then shift
    a0, a1 = cos, -sin
    b0, b1 = sin, cos
    a2 = cx - a0 * cx - a1 * cy + tx
    b2 = cy - b0 * cx - b1 * cy + ty
    # a horizontal flip of the output: x -> (w-1) - x
    flip_f = tf.cast(flip, tf.float32)
    a2 = a2 + flip_f * a0 * (w - 1.0)
    b2 = b2 + flip_f * b0 * (w - 1.0)
    a0 = a0 * (1.0 - 2.0 * flip_f)
    b0 = b0 * (1.0 - 2.0 * flip_f)
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.clip_by_value(warped * bright, 0.0, 1.0)


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Inverse-frequency weights averaging 1 over the training samples; absent classes get 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    present = counts > 0
    total, k = counts.sum(), int(present.sum())
    return {c: (float(total / (k * counts[c])) if present[c] else 1.0) for c in range(n_classes)}


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    augment: bool = True,
    resample: bool = False,
    repeat: bool = False,
):
    """tf.data pipeline over uint8 images (N,H,W,1): scale to [0,1] and cache; for training
    shuffle, optionally class-resample (balanced batches in expectation), augment; batch and
    prefetch. ``repeat`` makes it endless (for a fixed number of steps). Deterministic for a
    given seed."""
    import tensorflow as tf

    labels = np.asarray(labels, dtype=np.int32)

    def to_float(x, y):
        return tf.cast(x, tf.float32) / 255.0, y

    n = len(labels)
    if training and resample and n:
        parts, present = [], sorted(set(labels.tolist()))
        for c in present:
            idx = np.flatnonzero(labels == c)
            part = tf.data.Dataset.from_tensor_slices((images[idx], labels[idx]))
            part = part.map(to_float).cache().shuffle(len(idx), seed=seed + 7 * c).repeat()
            parts.append(part)
        ds = tf.data.Dataset.sample_from_datasets(
            parts, weights=[1.0 / len(present)] * len(present), seed=seed
        ).take(n)
    else:
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).map(to_float).cache()
        if training:
            ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)
    if training and augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (_augment_batch(xy[0], s), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- a hospital's data


def _decode_all(
    records: Sequence[LabelRecord], size: int, skip_bad: bool, label_path: Path
) -> tuple[np.ndarray, list[LabelRecord], list[str]]:
    """Decode and preprocess every image once into a uint8 cache (N, size, size, 1)."""
    images = np.zeros((len(records), size, size, 1), dtype=np.uint8)
    kept: list[LabelRecord] = []
    skipped: list[str] = []
    for r in records:
        try:
            img = load_image(r.path, size)
        except DataError as exc:
            message = f"{label_path}:{r.line}: {exc}"
            if not skip_bad:
                raise DataError(message) from None
            log.warning("skipping unreadable image: %s", message)
            skipped.append(message)
            continue
        images[len(kept)] = np.round(img * 255.0).astype(np.uint8)
        kept.append(r)
    return images[: len(kept)], kept, skipped


@dataclass
class LocalData:
    """A hospital's local data, decoded once and split into train and validation by patient."""

    classes: tuple[str, ...]
    image_size: int
    x_train: np.ndarray  # uint8 (N, S, S, 1)
    y_train: np.ndarray  # int32 class indices
    x_val: np.ndarray
    y_val: np.ndarray
    patients_train: tuple[str, ...] = ()  # patient id per training sample
    patients_val: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    label_file: Path | None = None

    @property
    def train_patients(self) -> frozenset[str]:
        return frozenset(self.patients_train)

    @property
    def val_patients(self) -> frozenset[str]:
        return frozenset(self.patients_val)

    @property
    def n_train(self) -> int:
        return int(len(self.y_train))

    @property
    def n_val(self) -> int:
        return int(len(self.y_val))

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def class_counts(self, split: str = "train") -> dict[str, int]:
        y = self.y_train if split == "train" else self.y_val
        counts = np.bincount(y, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts)}

    def val_images(self) -> np.ndarray:
        return self.x_val.astype(np.float32) / 255.0

    def select_train(self, patients: Iterable[str], with_val: bool = False) -> "LocalData":
        """The training samples of the given patients as a LocalData (validation split empty,
        or, with ``with_val``, this one's)."""
        keep = set(patients)
        mask = np.array([p in keep for p in self.patients_train], dtype=bool)
        if not with_val:
            empty = np.zeros((0,) + self.x_val.shape[1:], dtype=self.x_val.dtype)
            val = (empty, np.zeros(0, dtype=np.int32), ())
        else:
            val = (self.x_val, self.y_val, self.patients_val)
        return LocalData(
            classes=self.classes, image_size=self.image_size,
            x_train=self.x_train[mask], y_train=self.y_train[mask],
            x_val=val[0], y_val=val[1],
            patients_train=tuple(p for p, m in zip(self.patients_train, mask) if m),
            patients_val=tuple(val[2]), label_file=self.label_file,
        )

    @classmethod
    def from_dir(
        cls,
        data_dir,
        params,
        val_fraction: float = 0.2,
        skip_bad: bool = False,
        image_dir=None,
    ) -> "LocalData":
        """Decode ``data_dir``'s label file and images and split them by patient.

        ``data_dir`` is a directory holding the label file (``labels.txt``, else its only
        ``*.txt``) or the label file itself. ``params`` needs ``classes``, ``image_size`` and
        ``seed`` (a TrainingParams); COVIDx 3-class labels map onto the binary task.
        """
        label_path, images, records, y, skipped = _load_labelled(data_dir, params, skip_bad, image_dir)
        _, val_p = split_patients(records, val_fraction, params.seed)
        is_val = np.array([r.patient in val_p for r in records], dtype=bool)
        return cls(
            classes=class_names(params.classes),
            image_size=params.image_size,
            x_train=images[~is_val],
            y_train=y[~is_val],
            x_val=images[is_val],
            y_val=y[is_val],
            patients_train=tuple(r.patient for r, v in zip(records, is_val) if not v),
            patients_val=tuple(r.patient for r, v in zip(records, is_val) if v),
            skipped=tuple(skipped),
            label_file=label_path,
        )

    @classmethod
    def for_evaluation(cls, data_dir, params, skip_bad: bool = False, image_dir=None) -> "LocalData":
        """Every image of a label file in the validation split (for ``evaluate``)."""
        label_path, images, records, y, skipped = _load_labelled(data_dir, params, skip_bad, image_dir)
        return cls(
            classes=class_names(params.classes),
            image_size=params.image_size,
            x_train=images[:0],
            y_train=y[:0],
            x_val=images,
            y_val=y,
            patients_val=tuple(r.patient for r in records),
            skipped=tuple(skipped),
            label_file=label_path,
        )


def _load_labelled(data_dir, params, skip_bad: bool, image_dir=None):
    """(label path, uint8 images, records, class indices, skipped messages)."""
    classes = class_names(params.classes)
    label_path = find_label_file(data_dir)
    labels = read_label_file(label_path, skip_bad=skip_bad, image_dir=image_dir)
    skipped = list(labels.skipped)
    records: list[LabelRecord] = []
    for r in labels.records:
        mapped = map_label(r.label, classes)
        if mapped is None:
            message = f"{label_path}:{r.line}: class {r.label!r} has no place in {params.classes} classes {classes}"
            if not skip_bad:
                raise DataError(message)
            log.warning("skipping label: %s", message)
            skipped.append(message)
            continue
        records.append(LabelRecord(r.patient, r.filename, mapped, r.source, r.line, r.path))
    if records:
        images, records, bad = _decode_all(records, params.image_size, skip_bad, label_path)
        skipped += bad
    if not records:
        raise DataError(f"{label_path}: no usable images")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[r.label] for r in records], dtype=np.int32)
    return label_path, images, records, y, skipped
