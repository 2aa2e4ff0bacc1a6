"""bookrun.progress: the lines a running chapter prints, its time estimate, the build's summary."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from bookrun import progress


def _md(text: str) -> dict:
    return {"cell_type": "markdown", "source": text, "metadata": {}}


def _code(text: str = "x = 1", tags: list[str] | None = None) -> dict:
    return {"cell_type": "code", "source": text, "metadata": {"tags": tags or []}}


CELLS = [
    _md("# Title\n\n## Setup"),
    _code(tags=["parameters"]),
    _code(),
    _md("## Data\n\nsome text"),
    _code(),
    _md("### a subsection, not a stage"),
    _code(),
    _md("## Experiment"),
    _code(),
]


def _lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_line_per_section_with_the_time_left_from_the_last_run():
    out = io.StringIO()
    expected = [0.0, 1.0, 2.0, 0.0, 30.0, 0.0, 4.0, 0.0, 300.0]
    run = progress.Progress("ch9", "default", CELLS, expected, out)
    for index, cell in enumerate(CELLS):
        run.on_cell_start(cell=cell, cell_index=index)
    lines = _lines(out)
    assert len(lines) == 3  # Setup, Data, Experiment: the subsection and later cells add none
    assert lines[0].startswith("ch9 [00:00] Setup (cell 2 of 9; about 5.6 min left (last default run))")
    assert "Data (cell 5 of 9; about 5.6 min left" in lines[1]  # 30 + 4 + 300 s
    assert "Experiment (cell 9 of 9; about 5.0 min left" in lines[2]


def test_without_a_matching_earlier_run():
    out = io.StringIO()
    progress.Progress("ch9", "smoke", CELLS, None, out).on_cell_start(cell=CELLS[1], cell_index=1)
    assert "no earlier smoke run here to estimate the time from" in out.getvalue()
    other = progress.Progress("ch9", "smoke", CELLS, [10.0, 20.0], io.StringIO())  # other cells
    assert other.remaining(4) == pytest.approx(30.0, abs=1.0)  # its total less the time elapsed


def test_the_chapters_own_lines_are_relayed_whole_and_stamped():
    out = io.StringIO()
    run = progress.Progress("ch9", "default", CELLS, None, out)
    run.write("student_alone/seed0 F1 ")
    assert out.getvalue() == ""  # a line is printed only when it is complete
    run.write("54.1\n\nstudent_distilled/seed0 F1 58.4\npartial")
    assert _lines(out) == [
        "ch9 [00:00]   student_alone/seed0 F1 54.1",
        "ch9 [00:00]   student_distilled/seed0 F1 58.4",
    ]


def test_cells_line_up_with_papermills_injected_parameters():
    cells = progress.as_executed(CELLS, parameterised=True)
    assert len(cells) == len(CELLS) + 1
    assert cells[1] is CELLS[1] and cells[2]["source"] == "" and cells[3] is CELLS[2]
    assert progress.as_executed(CELLS, parameterised=False) == CELLS


def test_timings_round_trip_and_a_bad_file_gives_no_estimate(tmp_path: Path):
    path = progress.timings_file(tmp_path, "default", "ch1")
    assert progress.read_timings(path) is None
    path.parent.mkdir(parents=True)
    path.write_text("[1.5, 2]")
    assert progress.read_timings(path) == [1.5, 2.0]
    path.write_text("{not json")
    assert progress.read_timings(path) is None


def test_summary_names_time_memory_verdicts_and_the_page():
    metrics = {
        "wall_time_s": 408.0,
        "peak_memory_mb": 3379.2,
        "claims": [{"verdict": "inconclusive"}, {"verdict": "reproduced"}],
        "hardware": {"processor": "x86_64", "torch_threads": 2, "gpu": None},
    }
    text = progress.summary_table([("ch1", metrics), ("ch2", None)], Path("site/index.html"))
    rows = text.splitlines()
    assert rows[2].split() == ["ch1", "6.8", "min", "3.3", "GB", "inconclusive;", "reproduced"]
    assert "ch2" in rows[3] and "not run in this build" in rows[3]
    assert rows[-2] == "on x86_64, 2 threads, no GPU" and rows[-1] == "the book: site/index.html"


def test_kernels_run_over_local_sockets():
    assert progress.IPCKernelManager().transport == "ipc"


def test_a_reference_run_without_local_timings_estimates_from_the_committed_record():
    record = {
        "wall_time_s": 6420.0,
        "hardware": {"processor": "Xeon", "torch_threads": 2, "gpu": None},
        "record": {"commit": "da0358dad778a530a97802dd4bef01692a8650b6"},
    }
    expected, basis = progress.record_estimate(record)
    assert expected == [6420.0]
    assert basis == "the committed record's run at da0358dad7, on Xeon, 2 threads, no GPU"
    assert progress.record_estimate(None) == (None, None)
    assert progress.record_estimate(record, {})[1] == basis
    _, changed = progress.record_estimate(record, {"epochs": (1.0, 2.0), "train_seeds": ([0, 1, 2], [0])})
    assert changed == basis + ", which ran epochs 1.0, now 2.0; train_seeds [0, 1, 2], now [0]"
    out = io.StringIO()
    run = progress.Progress("ch9", "reference", CELLS, expected, out, basis=basis)
    run.on_cell_start(cell=CELLS[1], cell_index=1)
    assert "about 107.0 min left (the committed record's run at da0358dad7, on Xeon" in out.getvalue()
