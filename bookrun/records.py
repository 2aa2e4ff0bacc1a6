"""Reference runs: a chapter at its `reference` profile, recorded in the repository.

A reference run is long (up to ~100 minutes on 2 cores) and is what decides a chapter's
claims, so CI never runs one: it reads the committed record. The record is the chapter's
`metrics.json` and what a reader needs to check it (chapter 1's SQuAD predictions), under
`book/records/<chapter>/`, with a fingerprint of everything that decides its numbers: the
reference profile's values, the source of the chapter and of its experiment module, the
definitions of every `kdlib` module they reach (`bookrun.reach`), and the torch and
transformers versions. A record whose fingerprint no longer matches the checkout is *stale*:
the page says so, and which file moved. The chapter's text counts by its code cells only:
prose cannot change a number, and a reading of the record written after the run must not mark
it stale.

Older records are read in their own scheme: those of the `definitions` scheme (the chapter's
text hashed whole) are re-fingerprinted from the commit they name, when that commit is at hand
and its files give exactly the recorded fingerprint; those before it hashed each reached
`kdlib` file whole.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bookrun.chapters import BOOK, CHAPTERS, ROOT, Chapter
from bookrun.params import chapter_config, profile_values
from bookrun.reach import code_cells, reached_digests
from kdlib.config import ConfigError

RECORDS = BOOK / "records"
PROFILE = "reference"
KEPT = ("metrics.json", "predictions")
"""What a record keeps of the run's output folder (the executed notebook and trainer folders go)."""
MAX_RECORD_BYTES = 2_000_000
PINNED_VERSIONS = ("torch", "transformers")
_IMPORT = re.compile(
    r"^\s*(?:from\s+((?:kdlib|experiments)[\w.]*)\s+import|import\s+((?:kdlib|experiments)[\w.]*))", re.M
)


def record_dir(chapter: Chapter) -> Path:
    return RECORDS / chapter.key


def read_record(chapter: Chapter) -> dict[str, Any] | None:
    """The chapter's committed reference record, or None if it has none yet."""
    path = record_dir(chapter) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


SCHEME = "code"
"""How `fingerprint` hashes: the chapter's code cells, its own modules and profile whole, the
library by the definitions the chapter reaches (`bookrun.reach`)."""
PREVIOUS_SCHEME = "definitions"
"""The same, but with the chapter's text hashed whole (records made before 2026-12-03)."""


def _module_file(name: str, root: Path = ROOT) -> Path | None:
    top, *rest = name.split(".")
    base = {"kdlib": root / "kdlib", "experiments": root / BOOK.relative_to(ROOT) / "experiments"}[top]
    for candidate in (base.joinpath(*rest).with_suffix(".py"), base.joinpath(*rest, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """The kdlib and experiments modules `path` imports (a chapter's text or a Python file)."""
    text = path.read_text()
    if path.suffix == ".md":
        return {a or b for a, b in _IMPORT.findall(text)}
    found = set()
    for node in ast.walk(ast.parse(text)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] in ("kdlib", "experiments")}
    return found


def decisive_files(chapter: Chapter, root: Path = ROOT) -> list[Path]:
    """The chapter's source, its reference profile, and every project module it imports (under
    `root`: another checkout of the project, such as a record's commit)."""
    source = root / chapter.source.relative_to(ROOT)
    params = root / chapter.params_file(PROFILE).relative_to(ROOT)
    files = {source} | {p for p in [params] if p.is_file()}
    todo = [source]
    while todo:
        for name in _imports(todo.pop()):
            module = _module_file(name, root)
            if module is not None and module not in files:
                files.add(module)
                todo.append(module)
    return sorted(files)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(
    chapter: Chapter, versions: dict[str, str], root: Path = ROOT, scheme: str = SCHEME
) -> dict[str, Any]:
    """The chapter's code cells (its whole text in the previous scheme), its own modules and
    profile hashed whole, the library by the definitions they reach."""
    files = decisive_files(chapter, root)
    source = root / chapter.source.relative_to(ROOT)
    own = [p for p in files if p.relative_to(root).parts[0] != "kdlib"]
    cells = code_cells(source.read_text())
    roots = [("chapter", cells)]
    roots += [(".".join(("experiments", p.stem)), p.read_text()) for p in own if p.suffix == ".py"]
    digests = {str(p.relative_to(root)): _sha256(p) for p in own}
    if scheme == SCHEME:
        digests[str(source.relative_to(root))] = hashlib.sha256(cells.encode()).hexdigest()
    return {
        "scheme": scheme,
        "files": digests | reached_digests(roots, root),
        "versions": {k: versions.get(k) for k in PINNED_VERSIONS},
    }


@contextlib.contextmanager
def _files_at(chapter: Chapter, commit: str, root: Path) -> Iterator[Path | None]:
    """The files that decide the chapter's numbers as they were at `commit`, in a scratch folder;
    None when the repository at `root` lacks that commit (a shallow clone) or git is missing."""
    book = BOOK.relative_to(ROOT)
    paths = [str(book / "experiments"), str(book / "params"), str(chapter.source.relative_to(ROOT)), "kdlib"]
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit, "--", *paths],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        yield None
        return
    with tempfile.TemporaryDirectory() as scratch, tarfile.open(fileobj=io.BytesIO(archive)) as files:
        files.extractall(scratch, filter="data")
        yield Path(scratch)


def _whole_files(chapter: Chapter, versions: dict[str, str], root: Path = ROOT) -> dict[str, Any]:
    """The fingerprint of records made before the definitions scheme: every decisive file whole."""
    return {
        "files": {str(p.relative_to(root)): _sha256(p) for p in decisive_files(chapter, root)},
        "versions": {k: versions.get(k) for k in PINNED_VERSIONS},
    }


def _in_current_scheme(chapter: Chapter, record: dict[str, Any], root: Path) -> dict[str, Any] | None:
    """A `definitions`-scheme record's fingerprint in today's scheme, computed from the commit it
    names; None unless that commit's files give exactly the fingerprint the record carries."""
    meta = record["record"]
    recorded = meta["fingerprint"]
    if meta.get("uncommitted_changes"):
        return None
    with _files_at(chapter, meta["commit"], root) as then:
        if then is None or fingerprint(chapter, recorded["versions"], then, PREVIOUS_SCHEME) != recorded:
            return None
        return fingerprint(chapter, recorded["versions"], then, SCHEME)


def staleness(
    chapter: Chapter, record: dict[str, Any], versions: dict[str, str], root: Path = ROOT
) -> list[str]:
    """Why the record no longer describes the checkout at `root`: one line per changed input;
    [] if fresh."""
    recorded = record["record"]["fingerprint"]
    scheme = recorded.get("scheme")
    if scheme == PREVIOUS_SCHEME:
        upgraded = _in_current_scheme(chapter, record, root)
        recorded, scheme = (upgraded, SCHEME) if upgraded else (recorded, scheme)
    if scheme in (SCHEME, PREVIOUS_SCHEME):
        now = fingerprint(chapter, versions, root, scheme)
    else:
        now = _whole_files(chapter, versions, root)
    text = str(chapter.source.relative_to(ROOT))
    reasons = [
        ("the code cells of " if path == text and scheme == SCHEME else "")
        + (f"`{path}` changed" if path in now["files"] else f"`{path}` is gone")
        for path, digest in recorded["files"].items()
        if now["files"].get(path) != digest
    ]
    reasons += [f"`{path}` is new" for path in now["files"] if path not in recorded["files"]]
    reasons += [
        f"{name} {recorded['versions'].get(name)} -> {now['versions'][name]}"
        for name in PINNED_VERSIONS
        if recorded["versions"].get(name) != now["versions"][name]
    ]
    return reasons


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def check_runnable(chapter: Chapter, allow_dirty: bool) -> str:
    """The commit the record will name, once the chapter has a reference profile and the files
    that decide its numbers are committed (else the record could not be reproduced from it)."""
    profile_values(chapter, PROFILE)  # refuses a chapter without a reference profile
    commit = _git("rev-parse", "HEAD")
    paths = [str(p.relative_to(ROOT)) for p in decisive_files(chapter)]
    dirty = _git("status", "--porcelain", "--", *paths)
    if dirty and not allow_dirty:
        raise ConfigError(
            f"uncommitted changes in what decides chapter {chapter.key}'s numbers:\n{dirty}\n"
            "commit them first, so that the record names a commit it can be reproduced from."
        )
    return commit


def run_reference(chapter: Chapter, allow_dirty: bool = False) -> Path:
    """Run the chapter at the reference profile and replace its record, whole or not at all."""
    from bookrun.execute import run_chapter  # the kernel machinery, only when a run is asked for

    commit = check_runnable(chapter, allow_dirty)
    scratch = RECORDS / f".{chapter.key}-running"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        run_chapter(chapter, PROFILE, {}, scratch)
        metrics = json.loads((scratch / "metrics.json").read_text())
        metrics["commit"] = commit  # beside profile, hardware and versions: what the run was
        metrics["record"] = {
            "commit": commit,
            "uncommitted_changes": bool(allow_dirty and _git("status", "--porcelain")),
            "date": datetime.date.today().isoformat(),
            "command": f"make reference CH={chapter.key}",
            "fingerprint": fingerprint(chapter, metrics["versions"]),
        }
        (scratch / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        for entry in scratch.iterdir():
            if entry.name not in KEPT:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        size = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
        if size > MAX_RECORD_BYTES:
            raise ConfigError(
                f"the record is {size / 1e6:.1f} MB, over the {MAX_RECORD_BYTES / 1e6:.0f} MB a record may "
                "take: keep fewer per-example outputs."
            )
        target = record_dir(chapter)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{chapter.key}: reference record written to {target} (commit {commit[:10]}); commit it")
    return target


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds >= 60 else f"{seconds:.0f} s"


def reference_run(key: str) -> tuple[dict[str, Any] | None, str]:
    """(the chapter's committed reference record or None, a Markdown note for its page): what
    the run was (commit, date, hardware, time) and whether it is stale, or how to make one."""
    from kdlib.report import versions

    chapter = CHAPTERS[key]
    record = read_record(chapter)
    command = f"`make reference CH={key}`"
    if record is None:
        return None, (
            f"**No reference run is recorded for this chapter yet.** {command} runs it and writes "
            f"`book/records/{key}/`; until one is committed, the verdict below comes from this "
            "build's run, which is too small to decide it."
        )
    meta, hw = record["record"], record["hardware"]
    lines = [
        f"**The reference run**: profile `{record['profile']}`, commit `{meta['commit'][:10]}`, "
        f"{meta['date']}, {hw['processor']} ({hw['torch_threads']} threads, {hw.get('gpu') or 'no GPU'}), "
        f"{_minutes(record['wall_time_s'])}, peak memory {record['peak_memory_mb'] / 1024:.1f} GB."
    ]
    if meta.get("uncommitted_changes"):
        lines.append(
            "> **Recorded with uncommitted changes**, so its commit does not reproduce it. "
            f"Rerun {command} on a clean checkout."
        )
    reasons = staleness(chapter, record, versions())
    if reasons:
        lines.append(
            f"> **This record is stale.** It was recorded at commit `{meta['commit'][:10]}`; "
            f"what decides its numbers changed since: {'; '.join(reasons)}. {command} reruns it."
        )
    return record, "\n\n".join(lines)


def parameter_drift(
    chapter: Chapter, record: dict[str, Any], parameters: dict[str, Any] | None = None
) -> dict[str, tuple[Any, Any]]:
    """name -> (recorded, what a run gets now), for every parameter that differs: by default
    what the reference profile gives, else what a run's injected `parameters` (profile values
    and overrides) give."""
    if parameters is None:
        parameters = {**profile_values(chapter, PROFILE), "profile": PROFILE}
    now = dataclasses.asdict(chapter_config(chapter, **parameters))
    recorded = record["parameters"]
    return {
        name: (recorded.get(name), value)
        for name, value in now.items()
        if name != "output_dir" and recorded.get(name) != value
    }
