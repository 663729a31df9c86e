"""`cxr-mq report` on the session's two-round federation (real RabbitMQ, moto's S3): the
page, its plots and report.json agree with what the hospitals and the aggregator recorded,
and Chromium renders the page with every image and table."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cxr_mq import rounds
from cxr_mq.report import FEDERATION_PLOTS

from tests.browser import find_browser, render

pytestmark = pytest.mark.integration
HOSPITALS = ["h1", "h2", "h3"]


@pytest.fixture(scope="module")
def federation_report(two_rounds, tmp_path_factory):
    out = tmp_path_factory.mktemp("federation-report") / "report"
    result = two_rounds.cluster.cli("report", "--out", str(out), "--json")
    return out, json.loads(result.stdout)


def test_report_json_holds_both_rounds_overall_and_per_hospital(two_rounds, federation_report):
    cluster = two_rounds.cluster
    out, printed = federation_report
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    assert report["kind"] == "federation" and report["hospitals"] == HOSPITALS
    assert report["source"]["bucket"] == cluster.s3["bucket"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["totals"] == {"rounds": 2, "complete": 2, "aborted": 0, "updates_accepted": 6,
                                "refusals": 0,
                                "bytes_uploaded": sum(r["bytes_uploaded"] for r in report["rounds"])}
    s3 = cluster.s3_client()
    for row in report["rounds"]:
        r = row["round"]
        assert row["status"] == "complete" and row["contributors"] == HOSPITALS and row["refused"] == []
        assert row["bytes_uploaded"] == sum(
            s3.head_object(Bucket=cluster.s3["bucket"], Key=rounds.update_key(r, h))["ContentLength"]
            for h in HOSPITALS)
        assert set(row["per_hospital"]) == set(HOSPITALS)
        pooled = [[0, 0], [0, 0]]
        for hospital, m in row["per_hospital"].items():
            assert m["round"] == r and sum(map(sum, m["confusion_matrix"])) == m["n"] > 0
            pooled = [[a + b for a, b in zip(x, y)] for x, y in zip(pooled, m["confusion_matrix"])]
            timings = row["hospital_timings"][hospital]
            assert timings["train_seconds"] > 0 and timings["encrypt_seconds"] > 0
            assert timings["upload_seconds"] > 0
        overall = row["metrics"]
        assert overall["confusion_matrix"] == pooled
        assert overall["accuracy"] == pytest.approx((pooled[0][0] + pooled[1][1]) / sum(map(sum, pooled)))
        weights = [m["n"] for m in row["per_hospital"].values()]
        aucs = [m["auc"] for m in row["per_hospital"].values()]
        if None not in aucs:
            assert overall["auc"] == pytest.approx(sum(a * n for a, n in zip(aucs, weights)) / sum(weights))
        assert row["train_seconds"] == pytest.approx(sum(t["train_seconds"] for t in row["hospital_timings"].values()))
        assert row["aggregate_seconds"] > 0 and row["wall_seconds"] > 0
        assert set(row["train"]) == set(HOSPITALS)
    # round 1's model as round 2's update_ready messages carried it; round 2's as the hospitals logged it
    first, second = report["rounds"]
    for hospital in HOSPITALS:
        carried = cluster.update_message(2, hospital)["metrics"]["global"]
        assert carried["round"] == 1
        assert carried["confusion_matrix"] == first["per_hospital"][hospital]["confusion_matrix"]
        logged = cluster.find_events(hospital, "global_model_evaluated", round=2)[0]
        assert logged["accuracy"] == pytest.approx(second["per_hospital"][hospital]["accuracy"])


def test_page_and_plots_are_written(federation_report):
    out, report = federation_report
    page = (out / "index.html").read_text()
    assert set(report["plots"]) == set(FEDERATION_PLOTS)
    for name in FEDERATION_PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) >= 200
        assert f'src="{name}"' in page
    assert report["plots"]["hospitals.png"] == ["accuracy", "AUC", "sensitivity+", "PPV+"]


def test_rounds_option_selects_a_range_and_refuses_nonsense(two_rounds, tmp_path):
    cluster = two_rounds.cluster
    only = json.loads(cluster.cli("report", "--out", str(tmp_path / "r2"), "--rounds", "2..",
                                  "--json").stdout)
    assert [r["round"] for r in only["rounds"]] == [2]
    assert only["source"]["first_round"] == only["source"]["last_round"] == 2
    bad = cluster.cli("report", "--out", str(tmp_path / "bad"), "--rounds", "3..1", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("cxr-mq: error: --rounds")
    none = cluster.cli("report", "--out", str(tmp_path / "none"), "--rounds", "7..9", check=False)
    assert none.returncode == 1 and "no rounds" in none.stderr
    assert not (tmp_path / "none").exists()


def test_chromium_renders_the_federation_report(federation_report, tmp_path):
    if find_browser() is None:
        pytest.skip("no Chromium on this machine: scripts/test.sh installs Debian's chromium "
                    "when run as root with apt-get")
    out, _ = federation_report
    shots = Path(os.environ.get("CXR_MQ_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    seen = render(out / "index.html", screenshot=shots / "federation-report.png")
    assert seen["title"] == "cxr-mq federation report"
    assert sorted(i["src"] for i in seen["images"]) == sorted(FEDERATION_PLOTS)
    for image in seen["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    tables = {t["id"]: t["rows"] for t in seen["tables"]}
    assert tables == {"rounds": 1 + 2, "hospitals": 1 + 2 * len(HOSPITALS)}
    with Image.open(shots / "federation-report.png") as shot:
        assert shot.size == (1400, 2400)
