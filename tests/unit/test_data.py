"""COVIDx label files, image decoding (PNG/JPEG/DICOM), preprocessing, the patient split, the pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from cxr_mq.data import (
    DataError,
    LocalData,
    class_weights,
    find_label_file,
    load_images,
    make_dataset,
    parse_label_line,
    preprocess,
    read_image,
    read_label_file,
    split_patients,
)
from cxr_mq.training import TrainingParams

PARAMS = TrainingParams(image_size=32, classes="binary")


def _png(path, value=128, shape=(40, 30)):
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path


def _dataset(tmp_path, lines, images=()):
    for name in images:
        _png(tmp_path / name)
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "labels.txt"


def _dicom(path, pixels, photometric="MONOCHROME2", slope=None, intercept=None, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "p1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ---------------------------------------------------------------- label files


@pytest.mark.parametrize(
    "line, expected",
    [
        ("p1 a.png COVID-19 cohen", ("p1", "a.png", "COVID-19", "cohen")),
        ("p1 a.png normal", ("p1", "a.png", "normal", None)),  # old 3-field form
        ("COVID 1 a.png COVID-19 sirm", ("COVID 1", "a.png", "COVID-19", "sirm")),  # space in id
        ("COVID 12 b.jpg positive", ("COVID 12", "b.jpg", "positive", None)),
        ("7 c.png negative rsna", ("7", "c.png", "negative", "rsna")),
        ("p2 d.png pneumonia some_new_source", ("p2", "d.png", "pneumonia", "some_new_source")),
        ("p3\te.png\tcovid19\tbimcv", ("p3", "e.png", "COVID-19", "bimcv")),
    ],
)
def test_parse_label_line_quirks(line, expected):
    assert parse_label_line(line) == expected


@pytest.mark.parametrize("line", ["p1 a.png", "p1 a.png covid-ish src", "a.png normal"])
def test_parse_label_line_malformed(line):
    with pytest.raises(ValueError):
        parse_label_line(line)


def test_read_label_file_resolves_images_and_skips_comments(tmp_path):
    (tmp_path / "train").mkdir()
    _png(tmp_path / "train" / "b.png")
    path = _dataset(tmp_path, ["# comment", "", "p1 a.png positive src", "COVID 2 b.png negative"], ["a.png"])
    (tmp_path / "labels.txt").rename(tmp_path / "train.txt")
    labels = read_label_file(tmp_path / "train.txt")
    assert [(r.patient, r.label, r.line) for r in labels.records] == [("p1", "positive", 3), ("COVID 2", "negative", 4)]
    assert labels.records[1].path == tmp_path / "train" / "b.png"
    assert path.name == "labels.txt"


def test_bad_line_names_file_and_line(tmp_path):
    path = _dataset(tmp_path, ["p1 a.png positive src", "garbage"], ["a.png"])
    with pytest.raises(DataError, match=r"labels\.txt:2"):
        read_label_file(path)


def test_missing_image_names_file_and_line(tmp_path):
    path = _dataset(tmp_path, ["p1 a.png positive src", "p2 nothere.png negative src"], ["a.png"])
    with pytest.raises(DataError, match=r"labels\.txt:2.*nothere\.png"):
        read_label_file(path)


def test_skip_bad_warns_and_counts(tmp_path, caplog):
    path = _dataset(tmp_path, ["p1 a.png positive src", "garbage", "p2 nothere.png negative"], ["a.png"])
    with caplog.at_level(logging.WARNING):
        labels = read_label_file(path, skip_bad=True)
    assert len(labels.records) == 1 and len(labels.skipped) == 2
    assert "labels.txt:2" in caplog.text and "labels.txt:3" in caplog.text


def test_find_label_file(tmp_path):
    with pytest.raises(DataError, match="no label file"):
        find_label_file(tmp_path)
    (tmp_path / "test.txt").write_text("")
    assert find_label_file(tmp_path).name == "test.txt"
    (tmp_path / "train.txt").write_text("")
    with pytest.raises(DataError, match="several"):
        find_label_file(tmp_path)
    (tmp_path / "labels.txt").write_text("")
    assert find_label_file(tmp_path).name == "labels.txt"


# ---------------------------------------------------------------- images


def test_png_8bit_gray(tmp_path):
    img = read_image(_png(tmp_path / "a.png", value=51))
    assert img.dtype == np.float32 and img.shape == (40, 30)
    assert np.allclose(img, 51 / 255)


def test_png_16bit_uses_its_bit_depth(tmp_path):
    pixels = np.tile(np.linspace(0, 4095, 50).astype(np.uint16), (20, 1))  # 12-bit data in 16 bits
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")
    img = read_image(tmp_path / "deep.png")
    assert img.min() == 0.0 and img.max() == pytest.approx(1.0)
    full = np.full((10, 10), 65535, dtype=np.uint16)
    full[0, 0] = 0
    Image.fromarray(full).save(tmp_path / "full.png")
    assert read_image(tmp_path / "full.png").max() == pytest.approx(1.0)


def test_rgb_jpeg_and_rgba_png_become_gray(tmp_path):
    rgb = np.zeros((24, 24, 3), dtype=np.uint8)
    rgb[..., :] = (200, 200, 200)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    assert img.shape == (24, 24) and abs(float(img.mean()) - 200 / 255) < 0.02
    rgba = np.dstack([rgb, np.full((24, 24), 255, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").shape == (24, 24)


def test_dicom_rescale_and_window(tmp_path):
    pixels = np.tile(np.arange(0, 2000, 20, dtype=np.uint16), (10, 1))  # 0..1980
    # stored*2 - 1000 -> -1000..2960; window 1000 +- 500 maps [500, 1500] onto [0, 1]
    path = _dicom(tmp_path / "w.dcm", pixels, slope=2, intercept=-1000, window=(1000, 1000))
    img = read_image(path)
    assert img.shape == (10, 100) and img.min() == 0.0 and img.max() == 1.0
    assert img[0, 0] == 0.0 and img[0, -1] == 1.0
    mid = (1000 + 1000) // 2 // 20  # stored 1000 -> value 1000, the window centre
    assert img[0, mid] == pytest.approx(0.5, abs=0.01)


def test_dicom_monochrome1_is_inverted(tmp_path):
    pixels = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (8, 1))
    mono2 = read_image(_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))
    mono1 = read_image(_dicom(tmp_path / "m1", pixels, "MONOCHROME1"))  # no extension: magic bytes
    assert np.allclose(mono1, 1.0 - mono2)
    assert mono2[0, 0] == 0.0 and mono1[0, 0] == 1.0


def test_unreadable_image_names_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"junk")
    with pytest.raises(DataError, match="broken.dcm"):
        read_image(tmp_path / "broken.dcm")


# ---------------------------------------------------------------- preprocessing


def test_preprocess_crops_top_and_centre_and_resizes():
    image = np.zeros((100, 160), dtype=np.float32)
    image[:8, :] = 1.0  # the top 8% (a label burned into the film) is cropped away
    image[:, :30] = 0.5  # side margins, removed by the centre crop (92 x 92 of 92 x 160)
    image[:, 130:] = 0.5
    out = preprocess(image, 32)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert out.max() == 0.0


def test_preprocess_range_and_load_images(tmp_path):
    rng = np.random.default_rng(0)
    noisy = rng.uniform(-0.5, 1.5, (50, 40)).astype(np.float32)
    out = preprocess(noisy, 24)
    assert out.min() >= 0.0 and out.max() <= 1.0
    paths = [_png(tmp_path / f"{i}.png", value=i * 60, shape=(70, 50)) for i in range(3)]
    batch = load_images(paths, 24)
    assert batch.shape == (3, 24, 24, 1) and batch.dtype == np.float32
    assert np.allclose(batch[:, 5, 5, 0], [0, 60 / 255, 120 / 255], atol=1e-3)


# ---------------------------------------------------------------- split and LocalData


def _many(tmp_path, n_patients=20, per_patient=2, classes=("negative", "positive")):
    lines, names = [], []
    for p in range(n_patients):
        for j in range(per_patient):
            name = f"p{p}_{j}.png"
            names.append(name)
            lines.append(f"pat {p} {name} {classes[p % len(classes)]} src")
    return _dataset(tmp_path, lines, names)


def test_split_by_patient_is_disjoint_stratified_and_deterministic(tmp_path):
    labels = read_label_file(_many(tmp_path))
    train, val = split_patients(labels.records, 0.3, seed=0)
    assert train.isdisjoint(val) and len(train | val) == 20
    assert len(val) == 6  # 3 of the 10 patients of each class
    assert split_patients(labels.records, 0.3, seed=0) == (train, val)
    assert split_patients(labels.records, 0.3, seed=1) != (train, val)


def test_local_data_keeps_patients_together(tmp_path):
    data = LocalData.from_dir(_many(tmp_path).parent, PARAMS, val_fraction=0.25)
    assert data.n_train + data.n_val == 40
    assert data.train_patients.isdisjoint(data.val_patients)
    assert data.x_train.shape[1:] == (32, 32, 1) and data.x_train.dtype == np.uint8
    assert data.classes == ("negative", "positive")


def test_three_class_labels_map_to_binary(tmp_path):
    path = _many(tmp_path, n_patients=6, per_patient=1, classes=("normal", "pneumonia", "COVID-19"))
    data = LocalData.from_dir(path.parent, PARAMS, val_fraction=0.0)
    assert data.class_counts() == {"negative": 4, "positive": 2}
    (tmp_path / "b").mkdir()
    binary = _many(tmp_path / "b", n_patients=2, per_patient=1)
    with pytest.raises(DataError, match="labels.txt:1: class 'negative'"):
        LocalData.from_dir(binary.parent, TrainingParams(image_size=32, classes="3class"))


def test_local_data_unreadable_image_error_and_skip(tmp_path):
    path = _many(tmp_path, n_patients=4, per_patient=1)
    (tmp_path / "p1_0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"labels\.txt:2.*p1_0\.png"):
        LocalData.from_dir(path.parent, PARAMS)
    data = LocalData.from_dir(path.parent, PARAMS, val_fraction=0.0, skip_bad=True)
    assert data.n_train == 3 and data.n_skipped == 1


# ---------------------------------------------------------------- tf.data pipeline


def test_pipeline_shapes_range_and_determinism():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
    y = np.arange(20) % 2
    batches = [next(iter(make_dataset(x, y, batch_size=8, training=True, seed=5))) for _ in range(2)]
    (xa, ya), (xb, yb) = batches
    assert xa.shape == (8, 16, 16, 1) and xa.dtype.name == "float32"
    assert 0.0 <= float(xa.numpy().min()) and float(xa.numpy().max()) <= 1.0
    assert np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
    plain = next(iter(make_dataset(x, y, batch_size=20, training=False)))
    assert np.allclose(plain[0].numpy(), x / 255.0)
    assert np.array_equal(plain[1].numpy(), y)


def test_pipeline_augmentation_changes_images_but_not_labels():
    """Each label must stay with its own image through shuffling and augmentation. The
    label is written into the image as its brightness (dark 0, bright 1), which no
    augmentation (flip, rotation, shift, zoom, brightness x0.9-1.1) can turn into the other."""
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1])
    x = np.where(y[:, None, None, None] == 1, 255, 0).astype(np.uint8) * np.ones((1, 16, 16, 1), np.uint8)
    x[:, 4:12, 2:6] = 128  # an off-centre bar, so a flip or a shift shows
    for seed in (1, 2):
        batches = list(make_dataset(x, y, batch_size=5, training=True, seed=seed))
        images = np.concatenate([b[0].numpy() for b in batches])
        labels = np.concatenate([b[1].numpy() for b in batches])
        assert images.shape == x.shape
        assert sorted(labels.tolist()) == sorted(y.tolist()), "labels were lost or duplicated"
        brightness = images.mean(axis=(1, 2, 3))
        assert np.array_equal(brightness > 0.3, labels == 1), (
            f"labels got separated from their images: brightness {np.round(brightness, 2)}, "
            f"labels {labels}")
        plain = np.where(labels == 1, 255, 0)[:, None, None, None] * np.ones_like(x, np.float32)
        plain[:, 4:12, 2:6] = 128
        assert not np.allclose(images, plain / 255.0, atol=0.02), "augmentation left every image as it was"


def test_class_balancing():
    y = np.array([0] * 18 + [1] * 2)
    w = class_weights(y, 2)
    assert w[1] == pytest.approx(9 * w[0]) and w[0] * 18 + w[1] * 2 == pytest.approx(20)
    x = np.zeros((20, 8, 8, 1), dtype=np.uint8)
    ds = make_dataset(x, y, batch_size=20, training=True, seed=0, augment=False, resample=True)
    seen = np.concatenate([b.numpy() for _ in range(5) for _, b in ds])
    assert 0.35 < seen.mean() < 0.65  # positive share of resampled batches near one half


def test_for_evaluation_puts_everything_in_validation(tmp_path):
    path = _many(tmp_path, n_patients=4, per_patient=2)
    data = LocalData.for_evaluation(path, PARAMS)
    assert data.n_train == 0 and data.n_val == 8
    assert data.class_counts("val") == {"negative": 4, "positive": 4}
