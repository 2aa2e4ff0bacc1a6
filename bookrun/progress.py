"""What a running chapter is doing, one line per event, and a summary when the book is built.

A chapter can run for many minutes; a reader on a laptop must be able to tell a slow run from a
hung one. While papermill executes a chapter, `Progress` prints a line when the chapter enters
a new section (its `##` headings are its stages: data, teacher pass, experiment, results) and
relays every line the chapter itself prints (each training run announces its name and seed),
each stamped with the elapsed time. The remaining time is estimated from the cell durations of
the last successful run of the same chapter at the same profile (`BUILD/timings`); at the
reference profile a machine's first run takes the committed record's wall time instead (its
hardware may differ: the line says whose time it is); otherwise the first run on a machine says
it has nothing to estimate from. Plain lines, no redrawn bar, so that a
CI log reads like a terminal.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from jupyter_client import AsyncKernelManager
from traitlets import default

from bookrun.results import _minutes, hardware_text


class IPCKernelManager(AsyncKernelManager):
    """A kernel reached over local sockets (IPC), not TCP ports.

    The chapters' kernels never leave the machine; over TCP ipykernel warns, rightly, that
    anything on the host could listen. The sockets sit beside the connection file in Jupyter's
    runtime folder and are removed with it.
    """

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def _heading(cell: Any) -> str | None:
    """The last `## ` heading of a markdown cell, if it has one."""
    found = None
    if cell.get("cell_type") == "markdown":
        for line in "".join(cell.get("source", "")).splitlines():
            if line.startswith("## "):
                found = line[3:].strip()
    return found


def as_executed(cells: list[Any], parameterised: bool) -> list[Any]:
    """The cells as papermill runs them: with parameters, an injected cell follows the cell
    tagged `parameters` (so the hook's cell indices and the timings line up with these)."""
    if not parameterised:
        return list(cells)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    at = tagged[0] + 1 if tagged else 0
    return [*cells[:at], {"cell_type": "code", "source": "", "metadata": {}}, *cells[at:]]


def cell_durations(notebook: Any) -> list[float]:
    """Seconds each cell of an executed notebook took (papermill's metadata; 0 where absent)."""
    return [float(c.get("metadata", {}).get("papermill", {}).get("duration") or 0.0) for c in notebook.cells]


class Progress:
    """Prints a chapter's stages and its own output lines, stamped, with the time expected left.

    `expected` is the previous run's seconds per cell; it is used only if that run had the
    same cells (same chapter source), else the estimate is its total less the time elapsed.
    `basis` names that run in the printed estimate (default: the last run at this profile).
    """

    def __init__(
        self,
        key: str,
        profile: str,
        cells: list[Any],
        expected: list[float] | None,
        out: TextIO | None = None,
        basis: str | None = None,
    ) -> None:
        self.key, self.profile, self.cells = key, profile, cells
        self.expected = expected
        self.basis = basis or f"last {profile} run"
        self.out = out or sys.stdout
        self.started = time.perf_counter()
        self.section: str | None = None
        self._partial = ""
        self.sections: list[str | None] = []  # the `##` section each cell belongs to
        for cell in cells:
            self.sections.append(_heading(cell) or (self.sections[-1] if self.sections else None))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self, cell_index: int) -> float | None:
        """Seconds expected from the start of cell `cell_index` to the end, or None."""
        if not self.expected:
            return None
        if len(self.expected) == len(self.cells):
            return sum(self.expected[cell_index:])
        return max(0.0, sum(self.expected) - self.elapsed())

    def _line(self, text: str) -> None:
        self.out.write(f"{self.key} [{_clock(self.elapsed())}] {text}\n")
        self.out.flush()

    def on_cell_start(self, cell: Any, cell_index: int, **_: Any) -> None:
        """nbclient's hook: announce a new section when execution reaches its first code cell."""
        section = self.sections[cell_index] if cell_index < len(self.sections) else self.section
        if cell.get("cell_type") != "code" or section is None or section == self.section:
            return
        self.section = section
        left = self.remaining(cell_index)
        estimate = (
            f"about {_minutes(left)} left ({self.basis})"
            if left is not None
            else f"no earlier {self.profile} run here to estimate the time from"
        )
        self._line(f"{section} (cell {cell_index + 1} of {len(self.cells)}; {estimate})")

    def write(self, text: str) -> None:
        """papermill's `stdout_file`: the chapter's printed lines, each stamped."""
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self._line(f"  {line}")

    def flush(self) -> None:
        self.out.flush()


def timings_file(build: Path, profile: str, key: str) -> Path:
    return build / "timings" / profile / f"{key}.json"


def record_estimate(
    record: dict[str, Any] | None, drift: dict[str, tuple[Any, Any]] | None = None
) -> tuple[list[float] | None, str | None]:
    """(expected seconds, basis) from a committed reference record (every record names its
    commit, hardware and wall time: tests/test_records.py): its whole wall time, named with the
    hardware that took it, or (None, None) without a record.

    A record made before its profile changed (more epochs, more seeds) still gives the only
    estimate there is, but a wrong one: the basis names each parameter in `drift`
    (`records.parameter_drift`: name -> (recorded, now)), so the reader knows which way to read it.
    """
    if record is None:
        return None, None
    commit, where = record["record"]["commit"][:10], hardware_text(record["hardware"])
    basis = f"the committed record's run at {commit}, on {where}"
    if drift:
        changed = (f"{name} {ran!r}, now {now!r}" for name, (ran, now) in drift.items())
        basis += ", which ran " + "; ".join(changed)
    return [float(record["wall_time_s"])], basis


def read_timings(path: Path) -> list[float] | None:
    try:
        return [float(x) for x in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None  # no earlier run, or a file from another version: no estimate


def summary_table(rows: list[tuple[str, dict[str, Any] | None]], index: Path) -> str:
    """The lines printed when the book is built: per chapter its time, memory and verdicts."""
    lines = ["", f"{'chapter':8} {'time':>9} {'memory':>8}  verdicts"]
    for key, metrics in rows:
        if metrics is None:
            lines.append(f"{key:8} {'—':>9} {'—':>8}  (not run in this build)")
            continue
        verdicts = "; ".join(c["verdict"] for c in metrics.get("claims", [])) or "—"
        lines.append(
            f"{key:8} {_minutes(metrics['wall_time_s']):>9} "
            f"{metrics['peak_memory_mb'] / 1024:>6.1f} GB  {verdicts}"
        )
    hardware = next((m["hardware"] for _, m in rows if m), None)
    if hardware:
        lines.append(f"on {hardware_text(hardware)}")
    lines.append(f"the book: {index}")
    return "\n".join(lines)
