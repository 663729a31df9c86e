"""The default demo convinces (slow): `cxr-mq demo` with no options other than the report
directory (the threshold profile: key ceremony, committee every round) learns on non-IID hospitals; the last round reaches accuracy 0.90 and AUC 0.95 on
the held-out synthetic patients, and the curves rise without collapsing. Chromium renders
its page. Its CPU and wall time are measured in the issue's note and the README, not here."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cxr_mq.report import PLOTS
from tests.browser import find_browser, render

from .test_demo import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default-demo") / "report"
    result = run_cli(["--report", str(out), "--json"], out.parent, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads(result.stdout)


def test_hospitals_are_non_iid(default_run):
    _, report = default_run
    hospitals = report["partition"]["hospitals"]
    assert len(hospitals) == 3
    positive = [h["counts"].get("positive", 0) / h["images"] for h in hospitals]
    assert max(positive) - min(positive) >= 0.2, positive  # label skew
    sizes = [h["images"] for h in hospitals]
    assert max(sizes) >= 1.3 * min(sizes), sizes             # quantity skew


def test_the_default_demo_runs_the_threshold_profile(default_run):
    _, report = default_run
    assert report["settings"]["codec_profile"] == "threshold" and report["ceremony"]["threshold"] == 2
    for row in report["rounds"]:  # every round's model is the one the committee decrypted
        assert row["committee"]["decrypted_by"] == sorted(row["contributors"]), row["committee"]


def test_the_last_round_reaches_the_targets(default_run):
    _, report = default_run
    last = report["rounds"][-1]["metrics"]
    assert last["accuracy"] >= 0.90 and last["auc"] >= 0.95, last
    assert last["sensitivity_positive"] >= 0.8 and last["ppv_positive"] >= 0.8, last


def test_the_curves_rise_without_collapsing(default_run):
    _, report = default_run
    accuracy = [r["metrics"]["accuracy"] for r in report["rounds"]]
    auc = [r["metrics"]["auc"] for r in report["rounds"]]
    assert accuracy[-1] >= accuracy[0] + 0.2 and auc[-1] >= auc[0] + 0.1, (accuracy, auc)
    second_half = range(len(accuracy) // 2, len(accuracy))
    # once learning is under way no round undoes it: no fall to a constant answer, no big drop
    for i in second_half:
        assert accuracy[i] >= max(accuracy[:i + 1]) - 0.1, accuracy
        m = report["rounds"][i]["metrics"]
        assert 0.5 <= m["sensitivity_positive"] and m["ppv_positive"] >= 0.5, m


def test_chromium_renders_the_default_report(default_run, tmp_path):
    if find_browser() is None:
        pytest.skip("no Chromium on this machine: scripts/test.sh installs Debian's chromium "
                    "when run as root with apt-get")
    out, report = default_run
    shots = Path(os.environ.get("CXR_MQ_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    seen = render(out / "index.html", screenshot=shots / "demo-default-report.png")
    assert sorted(i["src"] for i in seen["images"]) == sorted(PLOTS)
    assert all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen["images"]
    assert {t["id"]: t["rows"] for t in seen["tables"]} == {"rounds-encrypted": 1 + len(report["rounds"])}
