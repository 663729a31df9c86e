"""The demo's live view (rich): who is training, encrypting, uploaded; then a table per round."""
from __future__ import annotations

import threading

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rounds_table(rows, title="Federated rounds") -> Table:
    table = Table(title=title)
    for name in ("round", "updates", "accuracy", "AUC", "sens+", "PPV+", "MB up",
                 "encrypt s", "aggregate s", "wall s"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        m = r.metrics
        table.add_row(str(r.round), str(len(r.contributors)), _fmt(m.get("accuracy")),
                      _fmt(m.get("auc")), _fmt(m.get("sensitivity_positive")),
                      _fmt(m.get("ppv_positive")), f"{r.bytes_uploaded / 1e6:.2f}",
                      _fmt(r.encrypt_seconds, 2), _fmt(r.aggregate_seconds, 2),
                      _fmt(r.wall_seconds, 1))
    return table


class LiveView:
    def __init__(self, console: Console | None = None, title: str = "encrypted"):
        self.console = console or Console(stderr=True)
        self.title = title
        self.rows = []
        self._live: Live | None = None
        self._round = None
        self._hospitals = []
        self._aggregator = None
        self._lock = threading.Lock()

    def _render(self):
        status = Table(title=f"round {self._round} ({self.title})", show_edge=False)
        status.add_column("worker")
        status.add_column("state")
        for h in self._hospitals:
            status.add_row(h.id, h.status)
        state = self._aggregator.states.get(self._round) if self._aggregator else None
        accepted = len(state.accepted) if state else "-"
        quorum = state.quorum if state else "-"
        status.add_row("aggregator", f"{accepted}/{quorum} updates summed")
        return Group(status, rounds_table(self.rows)) if self.rows else status

    def round_started(self, round_no, hospitals, aggregator) -> None:
        with self._lock:
            self._round, self._hospitals, self._aggregator = round_no, hospitals, aggregator
            if self._live is None and self.console.is_terminal:
                self._live = Live(get_renderable=self._render, console=self.console,
                                  refresh_per_second=4, transient=True)
                self._live.start()

    def round_finished(self, row) -> None:
        with self._lock:
            self.rows.append(row)
        if self._live is None:
            m = row.metrics
            self.console.print(f"round {row.round}: accuracy {_fmt(m.get('accuracy'))} "
                               f"AUC {_fmt(m.get('auc'))} contributors {', '.join(row.contributors)} "
                               f"({row.wall_seconds:.1f}s)")

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self.rows:
            self.console.print(rounds_table(self.rows, title=f"Federated rounds ({self.title})"))
