"""Workshop notebooks: each chapter as a runnable `.ipynb` with no outputs, for attendees.

The chapter's parameters cell stays the first code cell; a profile other than the cell's own
defaults is applied the way papermill applies it, as an "injected-parameters" cell right after
it, so attendees see both the defaults and what the profile changed.
"""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
from papermill.parameterize import parameterize_notebook

from bookrun.chapters import Chapter
from bookrun.params import resolve


def workshop_notebook(chapter: Chapter, profile: str) -> nbformat.NotebookNode:
    """The chapter as a notebook with `profile`'s values injected and every output cleared."""
    notebook = jupytext.read(chapter.source)
    values = resolve(chapter, profile)  # validated like a run
    values.pop("output_dir", None)
    notebook.metadata.setdefault("papermill", {})  # what papermill's own loader adds
    for cell in notebook.cells:
        cell.metadata.setdefault("tags", [])
    if set(values) != {"profile"} or profile != "default":
        notebook = parameterize_notebook(notebook, values, kernel_name="python3", language="python")
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return notebook


def write_notebooks(chapters: list[Chapter], profile: str, folder: Path) -> list[Path]:
    """Write each chapter's workshop notebook into `folder` as `<stem>.ipynb`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter in chapters:
        path = folder / f"{chapter.stem}.ipynb"
        nbformat.write(workshop_notebook(chapter, profile), path)
        written.append(path)
    return written
