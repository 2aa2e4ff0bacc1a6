"""Pages made from what the chapters measured: the results page and each chapter's provenance box.

Both read only the `metrics.json` a chapter run wrote (its `claims`, parameters, versions,
hardware, wall time), so the published numbers are the run's, never retyped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import yaml

from bookrun.chapters import Chapter


def _cell(text: Any) -> str:
    return str(text or "—").replace("|", "\\|").replace("\n", " ")


def read_metrics(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def chapter_title(chapter: Chapter) -> str:
    """The chapter's `# Title` line, without the hashes."""
    for line in chapter.source.read_text().splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return chapter.stem


def hardware_text(hw: dict[str, Any]) -> str:
    """A run's hardware as the pages name it: processor, threads, GPU."""
    return f"{hw['processor']}, {hw['torch_threads']} threads, {hw.get('gpu') or 'no GPU'}"


def _run_row(chapter: Chapter, metrics: dict[str, Any], which: str) -> str:
    return (
        f"| {{doc}}`{chapter.key} <{chapter.stem}>` | {which} | {metrics['profile']} | "
        f"{_minutes(metrics['wall_time_s'])} | {metrics['peak_memory_mb'] / 1024:.1f} GB | "
        f"{hardware_text(metrics['hardware'])} |"
    )


def results_page(
    chapters: list[tuple[Chapter, dict[str, Any] | None]],
    references: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The book's results page (MyST markdown): per chapter, one row per claim it tests.

    A chapter's committed reference record (`references`, by chapter key) decides its verdicts;
    without one, the verdicts are this build's run's, labelled as too small to decide.
    """
    references = references or {}
    lines = [
        "# Results",
        "",
        "Every claim the chapters test, the verdict, what the deciding run measured, and the figure",
        "its source published, read from the runs' `metrics.json` when the book was built. A",
        "chapter's *reference* run (long, run outside CI, its record committed) decides its claims;",
        "where a chapter has none yet, the verdict is this build's run's, which is too small to decide",
        "and is marked so. Verdicts follow each chapter's stated test: *reproduced*, *not reproduced*,",
        "or *inconclusive* (within the noise of the run). Each chapter says why a result at its scale",
        "may differ from the source's.",
    ]
    runs = []
    for chapter, metrics in chapters:
        lines += ["", f"## [{chapter_title(chapter)}]({chapter.stem}.ipynb)", ""]  # as built
        reference = references.get(chapter.key)
        if metrics is None and reference is None:
            lines.append("Not run in this build.")
            continue
        decided: dict[str, Any] = reference if reference is not None else metrics  # type: ignore[assignment]
        if reference is not None:
            source = f"reference run, commit `{reference['record']['commit'][:10]}`"
        else:
            source = f"this build's {decided['profile']} run: too small to decide"
        live = {
            c["claim"]: f"this build's {metrics['profile']} run: {c['verdict']}"
            for c in (metrics or {}).get("claims", [])
        }
        lines += [
            "| claim | verdict | decided by | measured | source's figure | public replication |",
            "|---|---|---|---|---|---|",
        ]
        for claim in decided.get("claims", []):
            by = source
            if reference is not None and claim["claim"] in live:
                by += f" ({live[claim['claim']]})"
            lines.append(
                f"| {_cell(claim['claim'])} | **{claim['verdict']}** | {_cell(by)} | "
                f"{_cell(claim['measured'])} | {_cell(claim['paper'])} | {_cell(claim.get('replication'))} |"
            )
        if metrics is not None:
            runs.append(_run_row(chapter, metrics, "this build"))
        if reference is not None:
            runs.append(_run_row(chapter, reference, f"reference, {reference['record']['date']}"))
    lines += [
        "",
        "## The runs behind these numbers",
        "",
        "| chapter | run | profile | wall time | peak memory | hardware |",
        "|---|---|---|---|---|---|",
        *runs,
    ]
    return "\n".join(lines) + "\n"


def provenance_box(chapter: Chapter, metrics: dict[str, Any]) -> str:
    """An admonition with the profile, the values it set, hardware, versions, time and memory."""
    profile = metrics["profile"]
    params_file = chapter.params_file(profile)
    chosen = yaml.safe_load(params_file.read_text()) if params_file.is_file() else {}
    values = metrics["parameters"]
    shown = ", ".join(f"`{k}={values[k]}`" for k in chosen or {} if k in values)
    sets = f"which sets {shown}" if shown else "the parameters cell's defaults"
    versions = ", ".join(f"{k} {v}" for k, v in metrics["versions"].items())
    return "\n".join(
        [
            ":::{admonition} Provenance of this page",
            ":class: note",
            f"- **profile** `{profile}`, {sets} (every parameter is in `metrics.json`)",
            f"- **hardware** {hardware_text(metrics['hardware'])}",
            f"- **wall time** {_minutes(metrics['wall_time_s'])}, peak memory "
            f"{metrics['peak_memory_mb'] / 1024:.1f} GB",
            f"- **versions** {versions}",
            f'- **run it yourself** <a href="../notebooks/{chapter.stem}.ipynb" download>this chapter as a '
            f"notebook</a> (parameters cell first, no outputs; profile `{profile}`)",
            ":::",
        ]
    )


def add_provenance(notebook_path: Path, chapter: Chapter, metrics: dict[str, Any]) -> None:
    """Insert the provenance box before the chapter's `## Setup` heading (after its overview)."""
    notebook = nbformat.read(notebook_path, as_version=4)
    box = provenance_box(chapter, metrics)
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and "\n## Setup" in cell.source:
            cell.source = cell.source.replace("\n## Setup", f"\n{box}\n\n## Setup", 1)
            break
    else:
        raise ValueError(f"{chapter.source.name} has no '## Setup' heading to put the provenance box above.")
    nbformat.write(notebook, notebook_path)
