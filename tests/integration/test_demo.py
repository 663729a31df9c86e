"""`cxr-mq demo` end to end on the embedded broker and store: the report and its plots."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from cxr_mq.report import PLOTS


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    env = {**os.environ, "CXR_MQ_WORK_DIR": str(out.parent), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "cxr_mq.cli", "demo", "--hospitals", "3", "--rounds", "2",
         "--n", "150", "--image-size", "32", "--report", str(out)],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_report_json_has_two_rounds_of_three_contributors(demo_report):
    out, _ = demo_report
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "encrypted"
    assert report["settings"]["hospitals"] == 3 and report["settings"]["rounds"] == 2
    assert len(report["partition"]["hospitals"]) == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert sorted(row["contributors"]) == ["hospital-1", "hospital-2", "hospital-3"]
        m = row["metrics"]
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["auc"] is None or 0.0 <= m["auc"] <= 1.0
        assert sum(map(sum, m["confusion_matrix"])) == m["n"] > 0
        assert row["bytes_uploaded"] > 0 and row["total_samples"] > 0
        assert row["encrypt_seconds"] > 0 and row["aggregate_seconds"] > 0


def test_plots_are_images_and_the_page_shows_them(demo_report):
    out, _ = demo_report
    page = (out / "index.html").read_text()
    for name in PLOTS:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            width, height = image.size
            assert image.format == "PNG"
            assert 200 <= width <= 2000 and 200 <= height <= 2000
        assert f'src="{name}"' in page
