"""The federation report's input (cxr_mq.history), its page (cxr_mq.report) and the live
status table (cxr_mq.watch), on a local store holding what a federation writes: round
records, the aggregator's state, update_ready copies and the hospitals' evaluation records."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from cxr_mq import history, messages, metrics, rounds
from cxr_mq.report import FEDERATION_PLOTS, write_federation_report
from cxr_mq.rounds import RoundState
from cxr_mq.storage.local import LocalStore
from cxr_mq.watch import progress_table, round_progress, watched_round

CLASSES = ["negative", "positive"]
FINGERPRINT = "ab" * 32


def evaluation(matrix, auc, round_no):
    report = metrics.report_from_matrix(np.array(matrix), CLASSES)
    report["auc"] = auc
    return {"round": round_no, **report}


def open_round(store, round_no, hospitals, issued_at=1000.0, deadline=1300.0):
    rounds.write_json(store, rounds.round_key(round_no), {
        "schema": "round_start", "round": round_no, "quorum": len(hospitals), "min_clients": 2,
        "deadline": deadline, "issued_at": issued_at, "hospitals": hospitals,
        "training": {"model": "small-cnn"}, "codec_profile": "compact"})


def accepted(hospital, size, train_s, global_metrics=None):
    return {"hospital": hospital, "key": f"k/{hospital}", "sha256": "0" * 64, "n_samples": 10,
            "size": size, "accepted_at": 1100.0,
            "metrics": {"train": {"loss": 0.5, "accuracy": 0.8}, "global": global_metrics or {},
                        "timings": {"train_seconds": train_s, "encrypt_seconds": 0.25,
                                    "upload_seconds": 0.125}}}


@pytest.fixture
def store(tmp_path):
    """Round 1 complete (h1, h2 accepted; h3 refused), evaluated by h1 and h2 through their
    evaluation records and by h3 only through what round 2's update_ready carried; round 2
    open: h1 accepted, h2 uploaded and announced, h3 trained but not yet announced."""
    store = LocalStore(tmp_path / "store")
    open_round(store, 1, ["h1", "h2", "h3"])
    state = RoundState(round=1, quorum=3, min_clients=2, deadline=1300.0, n_params=10,
                       key_fingerprint=FINGERPRINT, hospitals=["h1", "h2", "h3"], status="complete",
                       accepted=[accepted("h1", 2_000_000, 3.0), accepted("h2", 1_000_000, 5.0)],
                       refused=[{"hospital": "h3", "reason": "sha256 mismatch: forged", "at": 1090.0}],
                       opened_at=1001.0, finished_at=1250.0, total_samples=20,
                       timings={"aggregate_seconds": 0.5, "finalize_seconds": 0.25})
    state.save(store)
    for hospital, matrix, auc in (("h1", [[8, 2], [1, 9]], 0.9), ("h2", [[4, 0], [2, 4]], 0.8)):
        rounds.write_json(store, rounds.evaluation_key(1, hospital),
                          {"round": 1, "hospital": hospital, "metrics": evaluation(matrix, auc, 1)})
    rounds.record_hospital_refusal(store, 1, "h2", "model_ready", "below my floor", at=1200.0)
    open_round(store, 2, ["h1", "h2", "h3"], issued_at=2000.0, deadline=2600.0)
    RoundState(round=2, quorum=3, min_clients=2, deadline=2600.0, n_params=10,
               key_fingerprint=FINGERPRINT, hospitals=["h1", "h2", "h3"],
               accepted=[accepted("h1", 2_000_000, 2.0, evaluation([[8, 2], [1, 9]], 0.9, 1)),
                         accepted("h3", 1_500_000, 4.0, evaluation([[5, 5], [0, 10]], 0.6, 1))],
               opened_at=2001.0).save(store)
    for key in (rounds.update_key(2, "h1"), rounds.update_key(2, "h2"), rounds.update_key(2, "h3")):
        store.put_bytes(key, b"ciphertext")
    store.put_bytes(rounds.update_message_key(2, "h2"), messages.encode(messages.make(
        "update_ready", round=2, hospital="h2", key=rounds.update_key(2, "h2"), sha256="1" * 64,
        size=10, n_samples=10, n_params=10, key_fingerprint=FINGERPRINT, metrics={}, sent_at=2100.0)))
    return store


def test_overall_pools_confusion_matrices_and_weights_auc_by_validation_size(store):
    first = history.collect(store)[0]
    assert set(first.per_hospital) == {"h1", "h2", "h3"}  # h3's from round 2's update_ready
    assert first.metrics["confusion_matrix"] == [[17, 7], [3, 23]]
    assert first.metrics["accuracy"] == pytest.approx(40 / 50)
    assert first.metrics["sensitivity_positive"] == pytest.approx(23 / 26)
    assert first.metrics["ppv_positive"] == pytest.approx(23 / 30)
    assert first.metrics["auc"] == pytest.approx((0.9 * 20 + 0.8 * 10 + 0.6 * 20) / 50)


def test_rounds_carry_participation_bytes_and_timings(store):
    first, second = history.collect(store)
    assert (first.status, first.contributors, first.total_samples) == ("complete", ["h1", "h2"], 20)
    assert first.refused == [{"hospital": "h3", "reason": "sha256 mismatch: forged", "by": "aggregator"},
                             {"hospital": "h2", "reason": "below my floor", "by": "hospital"}]
    assert first.bytes_uploaded == 3_000_000
    assert (first.train_seconds, first.encrypt_seconds, first.upload_seconds) == (8.0, 0.5, 0.25)
    assert first.aggregate_seconds == 0.75 and first.wall_seconds == 250.0
    assert first.train == {"h1": {"loss": 0.5, "accuracy": 0.8}, "h2": {"loss": 0.5, "accuracy": 0.8}}
    assert (first.model, first.codec_profile) == ("small-cnn", "compact")
    assert second.status == "open" and second.metrics == {} and second.wall_seconds == 0.0


@pytest.mark.parametrize("text, bounds", [(None, (None, None)), ("2..5", (2, 5)), ("3..", (3, None)),
                                          ("..4", (None, 4)), ("7", (7, 7))])
def test_round_ranges(text, bounds):
    assert history.parse_rounds(text) == bounds


@pytest.mark.parametrize("text", ["", "..", "a..b", "5..2", "1...3"])
def test_bad_round_ranges_say_what_is_wrong(text):
    with pytest.raises(ValueError, match="--rounds"):
        history.parse_rounds(text)


def test_collect_keeps_to_the_range(store):
    assert [r.round for r in history.collect(store, 2, None)] == [2]
    assert [r.round for r in history.collect(store, None, 1)] == [1]
    assert history.collect(store, 5, 9) == []


def test_federation_page_has_plots_tables_and_the_refusal(store, tmp_path):
    out = tmp_path / "report"
    report = write_federation_report(out, history.collect(store), {"bucket": "b"})
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["totals"] == {"rounds": 2, "complete": 1, "aborted": 0, "updates_accepted": 4,
                                "refusals": 2, "bytes_uploaded": 6_500_000}
    assert set(report["plots"]) == set(FEDERATION_PLOTS)
    assert report["plots"]["participation.png"] == ["accepted", "refused"]
    page = (out / "index.html").read_text()
    for name in FEDERATION_PLOTS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) >= 200
        assert f'src="{name}"' in page
    assert 'id="rounds"' in page and 'id="hospitals"' in page and 'id="refusals"' in page
    assert "sha256 mismatch: forged" in page and "below my floor" in page


def test_an_empty_history_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no rounds"):
        write_federation_report(tmp_path, [], {})


# -- status --watch ---------------------------------------------------------------------------------
def test_watch_follows_the_open_round(store):
    assert watched_round(store) == 2
    progress = round_progress(store, 2, now=2450.0)
    rows = {r["hospital"]: r for r in progress["hospitals"]}
    assert (progress["state"], progress["accepted"], progress["quorum"]) == ("open", 2, 3)
    assert progress["seconds_left"] == 150.0
    assert (rows["h1"]["trained"], rows["h1"]["uploaded"], rows["h1"]["outcome"]) == (True, True, "accepted")
    assert (rows["h2"]["trained"], rows["h2"]["uploaded"], rows["h2"]["outcome"]) == (True, True, None)
    assert (rows["h3"]["trained"], rows["h3"]["uploaded"], rows["h3"]["outcome"]) == (True, True, "accepted")


def render(table) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(table)
    return console.export_text()


def test_watch_table_shows_each_hospital_and_the_time_left(store):
    text = render(progress_table(round_progress(store, 2, now=2450.0)))
    assert "round 2: open, 2/3 accepted, 2m30s left" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("h")}
    assert "accepted" in lines["h1"] and "2.00" in lines["h1"] and "2.0" in lines["h1"]
    assert "waiting" in lines["h2"] and lines["h2"].count("✓") == 2


def test_watch_table_shows_refusals_with_their_reason_and_a_finished_round(store):
    text = render(progress_table(round_progress(store, 1, now=5000.0)))
    assert "round 1: complete, 2/3 accepted, complete" in text
    h3 = next(line for line in text.splitlines() if line.strip().startswith("h3"))
    assert "refused: sha256 mismatch: forged" in h3 and "✓" not in h3


def test_watch_table_when_the_deadline_has_passed(store):
    text = render(progress_table(round_progress(store, 2, now=2700.0)))
    assert "deadline passed 100s ago" in text


def test_chromium_renders_the_federation_page_with_every_image(store, tmp_path):
    from tests.browser import find_browser, render
    if find_browser() is None:
        pytest.skip("no Chromium on this machine: scripts/test.sh installs Debian's chromium "
                    "when run as root with apt-get")
    out = tmp_path / "report"
    write_federation_report(out, history.collect(store), {"bucket": "b"})
    (out / "bytes.png").write_bytes(b"not a png")  # a broken image must be seen as broken
    seen = render(out / "index.html")
    broken = [i["src"] for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == ["bytes.png"]
    assert {t["id"]: t["rows"] for t in seen["tables"]} == {"rounds": 3, "hospitals": 6, "refusals": 3}
