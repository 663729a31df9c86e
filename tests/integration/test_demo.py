"""`cxr-mq demo` end to end on the embedded broker and store: the report and its plots, the
plaintext baseline and the comparison, bad input, and a failing round that must not hang.

One module-scoped ``--compare`` run (3 hospitals, 2 rounds, 32 px) serves the report, plot,
comparison and ``--json`` tests: its primary run is the encrypted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from cxr_mq.report import PLOTS

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
# the plumbing tests need no learning: the smallest model traces and trains fastest
# (the default demo's learning is test_demo_learns.py's)
SMALL_MODEL = ["--model", "small-cnn", "--alpha", "0.5"]


def run_cli(args, work_dir, timeout=600):
    env = {**os.environ, "CXR_MQ_WORK_DIR": str(work_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "cxr_mq.cli", "demo", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """The default profile (threshold) against plaintext; ``--store`` keeps the objects (under
    each run's prefix) for the tests to read."""
    out = tmp_path_factory.mktemp("demo") / "report"
    result = run_cli(["--hospitals", "3", "--rounds", "2", "--n", "150", "--image-size", "32",
                      "--epochs", "1", *SMALL_MODEL, "--compare", "--json", "--report", str(out),
                      "--store", str(out.parent / "store")], out.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_the_default_run_is_threshold_end_to_end(compare_run):
    """The key ceremony through the hospitals made the store's public context (the collective
    key, no secret anywhere), and every round's model is what the committee decrypted."""
    from cxr_mq import crypto, rounds, threshold_flow
    from cxr_mq.demo import PrefixedStore
    from cxr_mq.storage.local import LocalStore

    out, result = compare_run
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["profile"] == report["settings"]["codec_profile"] == "threshold"
    store = PrefixedStore(LocalStore(out.parent / "store"), report["settings"]["store_prefix"])
    public = crypto.load_context(store.get_bytes("keys/public-context"))
    assert public.profile == "threshold" and not public.has_secret_key
    ceremony = report["ceremony"]
    assert ceremony["fingerprint"] == public.fingerprint and ceremony["threshold"] == 2
    assert ceremony["dealt"] == ceremony["kept"] == list(ceremony["parties"]) == HOSPITALS
    assert public.ceremony_id == ceremony["ceremony_id"]
    assert not list((out.parent).rglob("secret.ctx"))  # the demo made no secret key file
    for row in report["rounds"]:
        r, committee = row["round"], row["committee"]
        assert json.loads(store.get_bytes(rounds.round_key(r)))["codec_profile"] == "threshold"
        assert len(committee["active"]) == 2 and committee["partials"] == committee["active"]
        assert committee["decrypted_by"] == HOSPITALS and committee["result"].endswith("decrypted")
        outcomes = threshold_flow.outcomes(store, r)
        assert {h: o["decrypted"] for h, o in outcomes.items()} == {h: True for h in HOSPITALS}
        assert committee["model_from"] in HOSPITALS
        # the committee decrypted the sample count, which no message carried in clear
        assert row["total_samples"] == committee["total_samples"] > len(HOSPITALS)
    # the live view's lines without a terminal: the ceremony, then each round's committee
    assert f"key ceremony {ceremony['ceremony_id']}: 3/3 hospitals dealt" in result.stderr
    assert result.stderr.count("committee: active hospital-") == 2


def test_report_json_has_two_rounds_of_three_contributors(compare_run):
    out, _ = compare_run
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "encrypted"
    assert report["settings"]["hospitals"] == 3 and report["settings"]["rounds"] == 2
    assert report["settings"]["codec_profile"] == "threshold"
    assert len(report["partition"]["hospitals"]) == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert sorted(row["contributors"]) == HOSPITALS
        m = row["metrics"]
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["auc"] is None or 0.0 <= m["auc"] <= 1.0
        for key in ("sensitivity_positive", "ppv_positive"):
            assert m[key] is None or 0.0 <= m[key] <= 1.0
        assert sum(map(sum, m["confusion_matrix"])) == m["n"] > 0
        assert row["bytes_uploaded"] > 0 and row["total_samples"] > 0
        assert row["encrypt_seconds"] > 0 and row["aggregate_seconds"] > 0
        assert row["wall_seconds"] > 0 and row["train_seconds"] > 0


def test_plots_are_images_and_the_page_shows_them(compare_run):
    out, _ = compare_run
    page = (out / "index.html").read_text()
    for name in PLOTS:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            width, height = image.size
            assert image.format == "PNG"
            assert 200 <= width <= 2000 and 200 <= height <= 2000
        assert f'src="{name}"' in page


def test_compare_runs_both_modes_and_gives_the_overhead(compare_run):
    out, _ = compare_run
    report = json.loads((out / "report.json").read_text())
    assert report["overhead_ratio"] > 0 and report["bytes_ratio"] > 0
    assert set(report["runs"]) == {"encrypted", "plaintext"}
    assert [r["round"] for r in report["runs"]["encrypted"]["rounds"]] == \
        [r["round"] for r in report["runs"]["plaintext"]["rounds"]] == [1, 2]
    assert report["runs"]["plaintext"]["settings"]["codec_profile"] == "plaintext"
    for row in report["runs"]["plaintext"]["rounds"]:
        assert sorted(row["contributors"]) == HOSPITALS
    for name in PLOTS:  # every plot shows both runs
        series = report["plots"][name]
        assert any("encrypted" in s for s in series) and any("plaintext" in s for s in series), name
    assert "overhead" in (out / "index.html").read_text()


def test_chromium_renders_the_compare_report(compare_run, tmp_path):
    from tests.browser import find_browser, render
    if find_browser() is None:
        pytest.skip("no Chromium on this machine: scripts/test.sh installs Debian's chromium "
                    "when run as root with apt-get")
    out, _ = compare_run
    shots = Path(os.environ.get("CXR_MQ_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    seen = render(out / "index.html", screenshot=shots / "demo-compare-report.png")
    assert seen["title"] == "cxr-mq federated demo (encrypted, plaintext)"
    assert sorted(i["src"] for i in seen["images"]) == sorted(PLOTS)
    for image in seen["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert {t["id"]: t["rows"] for t in seen["tables"]} == {"rounds-encrypted": 3, "rounds-plaintext": 3}


def test_json_prints_the_report_on_stdout(compare_run):
    out, result = compare_run
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "report.json").read_text())


def test_plaintext_alone_runs_without_encryption(tmp_path):
    result = run_cli(["--plaintext", "--hospitals", "2", "--rounds", "1", "--n", "100",
                      "--image-size", "32", "--epochs", "1", *SMALL_MODEL, "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["mode"] == "plaintext" and report["modes"] == ["plaintext"]
    assert report["settings"]["codec_profile"] == "plaintext"
    assert "overhead_ratio" not in report
    assert [sorted(r["contributors"]) for r in report["rounds"]] == [["hospital-1", "hospital-2"]]


@pytest.mark.parametrize("args, flag", [
    (["--data", "/nonexistent/labels.txt"], "--data"),
    (["--model", "no-such-net"], "--model"),
    (["--n", "6", "--hospitals", "5"], "--hospitals"),
    (["--hospitals", "0"], "--hospitals"),
    (["--broker", "http://localhost"], "--broker"),
    (["--hospitals", "2"], "--hospitals"),  # the threshold committee decrypts sums of 3 or more
], ids=["missing-data", "unknown-model", "more-hospitals-than-patients", "zero-hospitals", "bad-broker",
        "threshold-below-the-committee-floor"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, flag):
    result = run_cli(args, tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cxr-mq: error: {flag}"), result.stderr
    assert result.stdout == ""


# -- a round that cannot finish ends the demo, fast, with every worker stopped ---------------------
def demo_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("demo-", "train-"))]


@pytest.fixture
def small_options(tmp_path):
    from cxr_mq.demo import DemoOptions
    return DemoOptions(hospitals=2, rounds=2, n=40, image_size=32, epochs=1, plaintext=True,
                       model="small-cnn", work_dir=str(tmp_path))


def test_a_hospital_that_keeps_failing_stops_the_demo(small_options, monkeypatch):
    from cxr_mq import training
    from cxr_mq.config import Settings
    from cxr_mq.demo import DemoError, run_demo

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(training, "train_local", broken)
    started = time.monotonic()
    with pytest.raises(DemoError, match=r"hospital-\d failed 3 times in a row: .*disk on fire"):
        run_demo(small_options, Settings(codec_profile="seed"))
    assert time.monotonic() - started < 120
    assert demo_threads() == []


@pytest.mark.parametrize("method", ["setup", "tick"])
def test_an_aggregator_that_keeps_crashing_stops_the_demo(small_options, monkeypatch, method):
    from workers.aggregator import AggregatorWorker

    from cxr_mq.config import Settings
    from cxr_mq.demo import DemoError, run_demo

    def crash(self):
        raise OSError("aggregator host lost")
    monkeypatch.setattr(AggregatorWorker, method, crash)
    started = time.monotonic()
    with pytest.raises(DemoError, match="aggregator.*OSError: aggregator host lost"):
        run_demo(small_options, Settings(codec_profile="seed"))
    assert time.monotonic() - started < 120
    assert demo_threads() == []
