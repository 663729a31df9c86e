"""The demo's live view: what it draws while a round runs, and the panels other stages add."""
from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console
from rich.text import Text

from cxr_mq.view import LiveView


def text_of(renderable) -> str:
    console = Console(record=True, width=120, color_system=None, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_a_round_shows_each_hospital_and_the_aggregator():
    view = LiveView(console=Console(file=open("/dev/null", "w")))
    hospitals = [SimpleNamespace(id="hospital-1", status="training"),
                 SimpleNamespace(id="hospital-2", status="uploaded")]
    aggregator = SimpleNamespace(states={3: SimpleNamespace(accepted=[1], quorum=2)}, events=[])
    view.round_started(3, hospitals, aggregator)
    drawn = text_of(view.render())
    assert "round 3 (encrypted)" in drawn
    assert "hospital-1   training" in drawn and "hospital-2   uploaded" in drawn
    assert "1/2 updates summed" in drawn


def test_panels_are_drawn_under_the_view_and_can_hide():
    view = LiveView(console=Console(file=open("/dev/null", "w")))
    view.preparing("key ceremony")
    shares = {"n": 1}
    view.add_panel(lambda: Text(f"ceremony: {shares['n']}/3 shares"))
    view.add_panel(lambda: None)
    assert "ceremony: 1/3 shares" in text_of(view.render())
    shares["n"] = 3
    drawn = text_of(view.render())
    assert "key ceremony" in drawn and "ceremony: 3/3 shares" in drawn


def test_the_committee_panel_tells_partials_refusals_and_missing_members_apart():
    from cxr_mq.threshold_view import CommitteeRound, render_committee

    parties = ["h1", "h2", "h3"]
    decrypted = CommitteeRound(1, ready=parties, active=["h1", "h2"], partials=["h1", "h2"],
                               outcomes={h: None for h in parties})
    refused = CommitteeRound(2, ready=parties, active=["h1", "h2"], partials=["h1"],
                             outcomes={"h1": "round 2: h2 refused", "h2": "committee refused: second decryption",
                                       "h3": "round 2: active member(s) h2 did not answer by the deadline"})
    missing = CommitteeRound(3, ready=["h1"], outcomes={
        "h1": "round 3: only 1 of the 2 committee members needed were alive by the deadline (h1)"})
    view = LiveView(console=Console(file=open("/dev/null", "w")))
    view.add_panel(lambda: render_committee([decrypted, refused, missing], parties))
    drawn = text_of(view.render())
    assert "check coefficients ok: decrypted" in drawn
    assert [refused.member_state(h) for h in parties] == [
        "partial given", "refused", "ready, not needed"]
    assert refused.result() == "undecryptable: committee refused: second decryption"
    assert "committee refused: second" in drawn and "refused" in drawn
    assert [missing.member_state(h) for h in parties] == ["ready, not needed", "not ready", "not ready"]
    assert missing.result().startswith("undecryptable: round 3: only 1 of the 2")
    assert decrypted.line() == ("round 1 committee: active h1+h2 (h1 partial given, h2 partial given, "
                                "h3 ready, not needed); check coefficients ok: decrypted by 3 hospital(s)")
