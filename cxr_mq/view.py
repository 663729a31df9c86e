"""The demo's live view (rich), on stderr: while a round runs, each hospital's state (queued,
training, encrypting, uploading, uploaded, evaluating) and the aggregator's accepted/quorum;
then a table with one row per finished round. Without a terminal (CI, a pipe) it prints one
line per round instead, and the table at the end.

Other stages of a run (a key ceremony, say) show themselves with ``add_panel``: a function
returning a rich renderable, drawn under the round's table at every refresh.
"""
from __future__ import annotations

import threading
import time

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 132  # rich assumes 80 columns without a terminal: too narrow for the round table
STATE_STYLES = {"queued": "dim", "loading": "dim", "training": "yellow", "encrypting": "magenta",
                "uploading": "cyan", "uploaded": "green", "evaluating": "blue", "committee": "bright_magenta", "idle": "dim"}


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rounds_table(rows, title="Federated rounds") -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for name in ("round", "hospitals", "accuracy", "AUC", "sens+", "PPV+", "MB up",
                 "train s", "encrypt s", "aggregate s", "wall s"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        m = r.metrics
        table.add_row(str(r.round), str(len(r.contributors)), _fmt(m.get("accuracy")),
                      _fmt(m.get("auc")), _fmt(m.get("sensitivity_positive")),
                      _fmt(m.get("ppv_positive")), f"{r.bytes_uploaded / 1e6:.2f}",
                      _fmt(r.train_seconds, 1), _fmt(r.encrypt_seconds, 2),
                      _fmt(r.aggregate_seconds, 2), _fmt(r.wall_seconds, 1))
    return table


def default_console() -> Console:
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=PIPE_WIDTH)
    return console


class LiveView:
    def __init__(self, console: Console | None = None, title: str = "encrypted"):
        self.console = console or default_console()
        self.title = title
        self.rows = []
        self._live: Live | None = None
        self._round = None
        self._preparing: str | None = None
        self._started = time.perf_counter()
        self._hospitals = []
        self._aggregator = None
        self._panels: list = []
        self._lock = threading.Lock()

    def add_panel(self, render) -> None:
        """Draw ``render()`` (a rich renderable, or None to hide it) under the view at every
        refresh, from now on."""
        with self._lock:
            self._panels.append(render)

    def note(self, text: str) -> None:
        """One line about a stage of the run (a key ceremony, a round's committee): printed
        above the live display, or as a line of its own without a terminal."""
        self.console.print(f"{text}", soft_wrap=True, highlight=False, markup=False)

    def _aggregator_state(self) -> str:
        agg = self._aggregator
        if agg is None:
            return "-"
        state = agg.states.get(self._round)
        if state is not None:
            return f"{len(state.accepted)}/{state.quorum} updates summed"
        if any(r == self._round for _, r in list(agg.events)):
            return "aggregate published"
        return "waiting for round_start"

    def render(self):
        try:
            return self._render()
        except Exception as exc:  # noqa: BLE001 - an exception would end rich's refresh thread
            return Text(f"round {self._round}: (view unavailable: {exc!r})")

    def _render(self):
        panels = [panel for panel in (render() for render in list(self._panels)) if panel is not None]
        return Group(self._render_round(), *panels) if panels else self._render_round()

    def _render_round(self):
        if self._round is None:
            return Text(f"{self.title}: {self._preparing or 'starting'}… "
                        f"{time.perf_counter() - self._started:.0f}s", style="dim")
        status = Table(title=f"round {self._round} ({self.title}), "
                             f"{time.perf_counter() - self._started:.0f}s",
                       box=box.SIMPLE_HEAD, title_justify="left")
        status.add_column("worker", no_wrap=True)
        status.add_column("state", no_wrap=True)
        for h in self._hospitals:
            status.add_row(h.id, Text(str(h.status), style=STATE_STYLES.get(h.status, "")))
        status.add_row("aggregator", self._aggregator_state())
        return Group(rounds_table(self.rows, f"Federated rounds ({self.title})"), status) \
            if self.rows else status

    def _start_live(self) -> None:
        if self._live is None and self.console.is_terminal:
            self._live = Live(get_renderable=self.render, console=self.console,
                              refresh_per_second=4, transient=True)
            self._live.start(refresh=True)

    def preparing(self, what: str) -> None:
        """Before the first round: what the run is doing (data, keys, workers)."""
        with self._lock:
            self._preparing, self._started = what, time.perf_counter()
            self._start_live()

    def round_started(self, round_no, hospitals, aggregator) -> None:
        with self._lock:
            self._round, self._hospitals, self._aggregator = round_no, hospitals, aggregator
            self._started, self._preparing = time.perf_counter(), None
            self._start_live()

    def round_finished(self, row) -> None:
        with self._lock:
            self.rows.append(row)
        if self._live is None:
            m = row.metrics
            self.console.print(f"round {row.round} ({self.title}): accuracy {_fmt(m.get('accuracy'))} "
                               f"AUC {_fmt(m.get('auc'))}, {len(row.contributors)} contributors "
                               f"({', '.join(row.contributors)}), {row.wall_seconds:.1f}s",
                               soft_wrap=True, highlight=False)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self.rows:
            self.console.print(rounds_table(self.rows, title=f"Federated rounds ({self.title})"))
