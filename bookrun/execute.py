"""Execute chapters with papermill and build the book with Jupyter Book 1.x.

The text notebook (MyST markdown) is converted to `.ipynb` only inside the build tree, never
beside its source, and executed there with the profile's parameters. Every chapter's
parameters are checked before the first one runs, so a typo in the last chapter's file costs
seconds, not the whole book.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jupytext
import papermill

from bookrun import kernel, notebooks, progress, records, results, teachers
from bookrun.chapters import CHAPTERS, ROOT, Chapter
from bookrun.params import resolve
from kdlib.config import ConfigError
from kdlib.runtime import keep_freed_memory

BUILD = Path(os.environ.get("BOOKRUN_BUILD_DIR") or ROOT / "_build")
"""Everything the build writes; $BOOKRUN_BUILD_DIR moves it (the page test builds elsewhere)."""
SOURCE_TREE = BUILD / "src"
SITE = BUILD / "site"
BOOK_FILES = ("_config.yml", "_toc.yml", "references.bib")


def vendor_mathjax(tree: Path) -> None:
    """Serve MathJax from the site itself, so that equations render on an offline laptop.

    It goes in as an extra path (copied verbatim to the site's root), not as a static path:
    Jupyter Book would add every script under `_static` to every page.
    """
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "MathJax for offline pages is missing: pip install --no-deps jupyter-server-mathjax==0.2.6"
        )
    shutil.copytree(Path(spec.origin).parent / "static", tree / "_mathjax" / "mathjax")


def outputs_dir(chapter: Chapter, profile: str) -> Path:
    return BUILD / "outputs" / profile / chapter.key


def offline_unless_paper(profile: str) -> None:
    """Smoke and default profiles need nothing from the hub: make any attempt fail fast."""
    if profile != "paper":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def execute(chapter: Chapter, parameters: dict[str, Any], notebook_out: Path) -> float:
    """Run one chapter; raises papermill's execution error (naming the cell) if a cell fails.

    The notebook runs in its own folder and gets `output_dir` relative to it, so the pages
    show no path of the machine that built them. While it runs, `bookrun.progress` prints its
    stages and its own output lines; a successful run's cell times are kept for the next
    run's estimate.
    """
    notebook_out.parent.mkdir(parents=True, exist_ok=True)
    parameters = dict(parameters)
    if "output_dir" in parameters:
        parameters["output_dir"] = os.path.relpath(parameters["output_dir"], notebook_out.parent)
    source = notebook_out.with_name(f".{chapter.stem}.source.ipynb")
    notebook = jupytext.read(chapter.source)
    jupytext.write(notebook, source)
    profile = str(parameters.get("profile", "default"))
    timings = progress.timings_file(BUILD, profile, chapter.key)
    cells = progress.as_executed(notebook.cells, parameterised=bool(parameters))
    expected, basis = progress.read_timings(timings), None
    if expected is None and profile == records.PROFILE:
        record = records.read_record(chapter)
        drift = records.parameter_drift(chapter, record, parameters) if record else None
        expected, basis = progress.record_estimate(record, drift)
    reporter = progress.Progress(chapter.key, profile, cells, expected, basis=basis)
    keep_freed_memory()  # the kernel inherits it: no page faults for every step's large tensors
    started = time.perf_counter()
    try:
        executed = papermill.execute_notebook(
            str(source),
            str(notebook_out),
            parameters=parameters,
            kernel_name="python3",
            language="python",
            cwd=str(notebook_out.parent),
            progress_bar=False,
            stdout_file=reporter,
            kernel_manager_class=progress.IPCKernelManager,
            on_cell_start=reporter.on_cell_start,
            extra_arguments=kernel.ARGUMENTS,
        )
    finally:
        source.unlink(missing_ok=True)
    timings.parent.mkdir(parents=True, exist_ok=True)
    timings.write_text(json.dumps(progress.cell_durations(executed)))
    return time.perf_counter() - started


def ensure_writable(folder: Path) -> None:
    """Create `folder` and prove a file can be written there, or stop before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"output folder {folder} is not writable ({err.strerror}): pass --output-dir with a "
            "folder you can write to."
        ) from err


def run_chapter(chapter: Chapter, profile: str, overrides: dict[str, Any], output_dir: Path | None) -> Path:
    output_dir = (output_dir or outputs_dir(chapter, profile)).resolve()
    parameters = resolve(chapter, profile, overrides, output_dir)
    ensure_writable(output_dir)
    offline_unless_paper(profile)
    teachers.check_hub_models([(chapter, parameters)])
    teachers.ensure_teachers([(chapter, parameters)])
    notebook = output_dir / f"{chapter.stem}.ipynb"
    seconds = execute(chapter, parameters, notebook)
    print(f"{chapter.key}: executed in {seconds:.0f} s -> {notebook}")
    return notebook


def build(profile: str, keys: list[str] | None = None, execute_chapters: bool = True) -> Path:
    """Execute the chapters under `profile` into a fresh build tree and build the HTML."""
    chapters = [CHAPTERS[k] for k in (keys or list(CHAPTERS))]
    planned = {c.key: resolve(c, profile, None, outputs_dir(c, profile).resolve()) for c in chapters}
    offline_unless_paper(profile)
    if execute_chapters:
        teachers.check_hub_models((c, planned[c.key]) for c in chapters)
        teachers.ensure_teachers((c, planned[c.key]) for c in chapters)
    if SOURCE_TREE.exists():
        shutil.rmtree(SOURCE_TREE)
    (SOURCE_TREE / "book").mkdir(parents=True)
    for name in BOOK_FILES:
        shutil.copy2(ROOT / name, SOURCE_TREE / name)
    vendor_mathjax(SOURCE_TREE)
    chapter_sources = {c.source for c in CHAPTERS.values()}
    for page in (ROOT / "book").glob("*.md"):
        if page not in chapter_sources:
            shutil.copy2(page, SOURCE_TREE / "book" / page.name)
    timings = {}
    for chapter in chapters:
        target = SOURCE_TREE / "book" / f"{chapter.stem}.ipynb"
        if execute_chapters:
            timings[chapter.key] = execute(chapter, planned[chapter.key], target)
            print(f"{chapter.key}: executed in {timings[chapter.key]:.0f} s", flush=True)
            metrics = results.read_metrics(outputs_dir(chapter, profile) / "metrics.json")
            if metrics is not None:
                results.add_provenance(target, chapter, metrics)
        else:
            jupytext.write(jupytext.read(chapter.source), target)
    measured = [
        (c, results.read_metrics(outputs_dir(c, profile) / "metrics.json") if execute_chapters else None)
        for c in CHAPTERS.values()
    ]
    references = {c.key: r for c in CHAPTERS.values() if (r := records.read_record(c)) is not None}
    (SOURCE_TREE / "book" / "results.md").write_text(results.results_page(measured, references))
    # the workshop notebooks, served with the site (html_extra_path) and linked from each chapter
    notebooks.write_notebooks(list(CHAPTERS.values()), profile, SOURCE_TREE / "_workshop" / "notebooks")
    command = [
        str(Path(sys.executable).parent / "jupyter-book"),
        "build",
        str(SOURCE_TREE),
        "--path-output",
        str(SITE),
        "--builder",
        "html",
        "-W",
        "-n",
        "--keep-going",
    ]
    subprocess.run(command, check=True)
    index = SITE / "_build" / "html" / "index.html"
    print(f"book built at profile {profile!r}; the verdicts of this build's runs (the results page "
          "says which run decides each claim):")
    ran = [(c.key, m if c.key in timings else None) for c, m in measured]
    print(progress.summary_table(ran, index), flush=True)
    return index
