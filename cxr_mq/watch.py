"""``cxr-mq status --watch``: the open round, hospital by hospital, refreshed in the terminal.

What the store shows of a round while it runs, without any key: a hospital's encrypted
update appears once it has trained and encrypted (``updates/<h>``), its ``update_ready`` copy
once it has announced it (``updates/<h>.msg``), and the aggregator's state says whether the
update was accepted or refused (and why). ``round_progress`` gathers that;
``progress_table`` draws it (the part the tests check, without a terminal).
"""
from __future__ import annotations

import threading
import time

from rich import box
from rich.table import Table
from rich.text import Text

from . import rounds
from .rounds import OPEN, RoundState
from .storage.base import ObjectStore

MARK = {True: Text("✓", style="green"), False: Text("·", style="dim")}


def watched_round(store: ObjectStore) -> int | None:
    """The newest round that is still open (or not yet picked up), else the newest round."""
    numbers = rounds.list_rounds(store)
    for round_no in reversed(numbers):
        state = RoundState.load(store, round_no)
        if state is None or state.status == OPEN:
            return round_no
    return numbers[-1] if numbers else None


def round_progress(store: ObjectStore, round_no: int, now: float | None = None) -> dict:
    """Where round ``round_no`` stands: its record's quorum and deadline, and per hospital
    whether it has trained (its encrypted update is in the store), uploaded (its
    ``update_ready`` is recorded), and been accepted or refused."""
    now = time.time() if now is None else now
    record = rounds.read_json(store, rounds.round_key(round_no)) or {}
    state = RoundState.load(store, round_no)
    prefix = rounds.update_key(round_no, "")
    objects = {key[len(prefix):] for key in store.list(prefix)}
    by_hospitals = rounds.hospital_refusals(store, round_no)  # what a hospital itself refused
    hospitals = list(record.get("hospitals") or [])
    seen = {name.split(".", 1)[0] for name in objects}  # h, h.msg, h.refused: hospital h
    seen |= {a["hospital"] for a in (state.accepted if state else [])}
    seen |= {r["hospital"] for r in (state.refused if state else [])}
    hospitals += sorted(seen - set(hospitals))
    rows = []
    for hospital in hospitals:
        accepted = state.accepted_from(hospital) if state else None
        refusals = [r for r in (state.refused if state else []) + by_hospitals
                    if r["hospital"] == hospital]
        timings = ((accepted or {}).get("metrics") or {}).get("timings") or {}
        rows.append({
            "hospital": hospital,
            "trained": hospital in objects or accepted is not None,
            "uploaded": f"{hospital}.msg" in objects or accepted is not None,
            "outcome": "accepted" if accepted else ("refused" if refusals else None),
            "reason": refusals[-1]["reason"] if refusals and not accepted else None,
            "size": (accepted or {}).get("size"),
            "train_seconds": timings.get("train_seconds"),
        })
    deadline = record.get("deadline")
    return {
        "round": round_no,
        "state": rounds.shown_status(record, state, now)[0] if record or state else "unknown",
        "quorum": record.get("quorum"), "min_clients": record.get("min_clients"),
        "accepted": len(state.accepted) if state else 0,
        "seconds_left": None if deadline is None else deadline - now,
        "reason": rounds.shown_status(record, state, now)[1] if record or state else None,
        "hospitals": rows,
    }


def _time_left(progress: dict) -> str:
    left = progress["seconds_left"]
    if progress["state"] not in (OPEN, rounds.STARTED):
        return progress["state"]
    if left is None:
        return "no deadline"
    if left < 0:
        return f"deadline passed {-left:.0f}s ago"
    minutes, seconds = divmod(int(left), 60)
    return f"{minutes}m{seconds:02d}s left" if minutes else f"{seconds}s left"


def progress_table(progress: dict) -> Table:
    """The open round as a rich table: one row per hospital; the title has the round, its
    state, updates accepted against the quorum and the time left before the deadline."""
    title = (f"round {progress['round']}: {progress['state']}, {progress['accepted']}/"
             f"{progress['quorum'] if progress['quorum'] is not None else '?'} accepted, "
             f"{_time_left(progress)}")
    if progress.get("reason"):
        title += f" ({progress['reason']})"
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for name, justify in (("hospital", "left"), ("trained", "center"), ("uploaded", "center"),
                          ("aggregator", "left"), ("MB", "right"), ("train s", "right")):
        table.add_column(name, justify=justify, no_wrap=name != "aggregator")
    for row in progress["hospitals"]:
        if row["outcome"] == "accepted":
            outcome = Text("accepted", style="green")
        elif row["outcome"] == "refused":
            outcome = Text(f"refused: {row['reason']}", style="red")
        else:
            outcome = Text("waiting", style="dim")
        table.add_row(row["hospital"], MARK[row["trained"]], MARK[row["uploaded"]], outcome,
                      "-" if row["size"] is None else f"{row['size'] / 1e6:.2f}",
                      "-" if row["train_seconds"] is None else f"{row['train_seconds']:.1f}")
    if not progress["hospitals"]:
        table.add_row(Text("no hospital has uploaded yet", style="dim"), "", "", "", "", "")
    return table


def watch(store: ObjectStore, console, round_no: int | None = None, interval: float = 2.0,
          stop=None) -> None:
    """Redraw the round's table every ``interval`` seconds until ``stop`` is set (or Ctrl-C)."""
    from rich.live import Live

    def current():
        target = round_no if round_no is not None else watched_round(store)
        if target is None:
            return Text("no rounds yet", style="dim")
        return progress_table(round_progress(store, target))

    stop = stop or threading.Event()
    with Live(current(), console=console, auto_refresh=False) as live:
        try:
            while not stop.wait(interval):
                live.update(current(), refresh=True)
        except KeyboardInterrupt:
            pass
