"""What a run measured, where it ran, and with what: the contents of a chapter's metrics.json.

Results are data. The chapter's prose and tables read this file, and its tests assert on it, so
it is written whole or not at all (temporary file, then rename).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "numpy", "kdlib")


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to `path` via a temporary sibling and a rename; NaN is refused, not written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=_jsonable)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_memory_mb() -> float:
    """Peak resident (host) memory of this process in MB; GPU memory is not included."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class RunRecord:
    """Collects a chapter run's parameters and results and writes metrics.json once, whole."""

    def __init__(self, chapter: str, profile: str, parameters: dict[str, Any]) -> None:
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {
            "chapter": chapter,
            "profile": profile,
            "parameters": parameters,
            "results": {},
            "reference": {},
        }

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def write(self, path: str | os.PathLike) -> Path:
        self.data["wall_time_s"] = round(time.perf_counter() - self.started, 1)
        self.data["peak_memory_mb"] = round(peak_memory_mb(), 1)
        self.data["versions"] = versions()
        self.data["hardware"] = hardware()
        _check_finite(self.data)
        return write_json_atomic(path, self.data)


def _check_finite(value: Any, where: str = "metrics") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}: refusing to write a non-finite result.")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


VERDICTS = ("reproduced", "inconclusive", "not reproduced")


def claim_record(
    claim: str, verdict: str, measured: str, paper: str, replication: str | None = None
) -> dict[str, str | None]:
    """One published claim as the book's results page shows it: what was claimed, by whom, what
    this run measured, and the verdict (one of `VERDICTS`)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict = {verdict!r}: choose one of {VERDICTS}.")
    return {
        "claim": claim,
        "paper": paper,
        "replication": replication,
        "measured": measured,
        "verdict": verdict,
    }


def gain_verdict(mean: float, se: float, seeds_improved: int, seeds: int) -> str:
    """Whether a claimed improvement showed up: one of `VERDICTS`.

    "reproduced": the mean gain exceeds two standard errors and every seed improved;
    "not reproduced": the mean gain is zero or negative; "inconclusive": anything between
    (a positive gain within the noise, or seeds that disagree).
    """
    if mean <= 0:
        return "not reproduced"
    if mean > 2 * se and seeds_improved == seeds:
        return "reproduced"
    return "inconclusive"
