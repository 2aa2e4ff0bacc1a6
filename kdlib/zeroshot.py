"""Zero-shot benchmarks through lm-evaluation-harness, over the local copies of their test sets.

distilpythia's table (piqa, winogrande, lambada perplexity and accuracy, arc, sciq, wsc) came
from lm-evaluation-harness; so do these numbers. Its own task definitions download their data
from the hub, so `task_config` writes the same tasks over the JSON-lines files of the data
mirror (`lmeval/*.jsonl`: three formats, below) with lm-eval's prompts: "Question: ...\\nAnswer:"
for piqa and arc, the bare stem for openbook_qa (standing in for sciq, which has no local copy),
winogrande's and WSC's partial scoring (the option is in the context, the shared continuation
is scored), and lambada's last word scored after the passage. With no mirror, lm-eval's own
task names are used (which need the hub).

Examples are a seeded random subset per task (`per_task`), the same for every model scored, so
models can be compared example by example; lm-eval reports each metric's standard error.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kdlib.config import ConfigError
from kdlib.data import DataError, resolve_data_dir

# task -> (local file stem, format, doc_to_text template)
_LOCAL_TASKS: dict[str, tuple[str, str, str]] = {
    "piqa": ("piqa", "choice", "{{query.strip()}}\nAnswer:"),
    "arc_easy": ("arc_easy", "choice", "{{query}}\nAnswer:"),
    "arc_challenge": ("arc_challenge", "choice", "{{query}}\nAnswer:"),
    "openbook_qa": ("openbook_qa", "choice", "{{query}}"),
    "copa": ("copa", "choice", "{{query}}"),
    "winogrande": ("winogrande", "schema", ""),
    "wsc": ("winograd_wsc", "schema", ""),
    "lambada": ("lambada_openai", "lambada", "{{context}}"),
}
TASKS = tuple(_LOCAL_TASKS)
# lm-eval's own task names, used when the data mirror is absent (they need the hub)
HUB_TASKS = {
    "piqa": "piqa",
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "openbook_qa": "openbookqa",
    "copa": "copa",
    "winogrande": "winogrande",
    "wsc": "wsc273",
    "lambada": "lambada_openai",
}


def check_tasks(tasks: Sequence[str], parameter: str = "zero_shot_tasks") -> None:
    unknown = [t for t in tasks if t not in _LOCAL_TASKS]
    if unknown:
        raise ConfigError(f"{parameter}: unknown task(s) {unknown}; choose from {list(TASKS)}.")


def task_file(task: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local JSON-lines file of `task`, or None when there is no data mirror."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    path = root / "lmeval" / f"{_LOCAL_TASKS[task][0]}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: the data mirror lacks lmeval/{path.name}.")
    return path


def _metric(name: str, aggregation: str = "mean", higher_is_better: bool = True) -> dict[str, Any]:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' progress bars and notices off: a book page shows results, not logs."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    saved = os.dup(2)  # what is written to the descriptor itself (C extensions, subprocesses)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        # tqdm bars write to sys.stderr; lm-eval prints its bootstrap notices to stdout
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


@functools.lru_cache(maxsize=2)
def _task_manager(with_builtin_tasks: bool) -> Any:
    """One lm-eval TaskManager per process: indexing lm-eval's thousands of task files takes
    5-7 s, which `simple_evaluate` would pay for every model scored. Tasks over the local files
    are whole configs and need no index."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=with_builtin_tasks)


def task_config(task: str, path: Path) -> dict[str, Any]:
    """An lm-eval task definition (the dict form of its YAML) over a local JSON-lines file."""
    stem, kind, text = _LOCAL_TASKS[task]
    config: dict[str, Any] = {
        "task": f"kdlib_{task}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "metadata": {"version": 1.0, "source": f"lmeval/{stem}.jsonl"},
    }
    if kind == "choice":
        config |= {
            "output_type": "multiple_choice",
            "doc_to_text": text,
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [_metric("acc"), _metric("acc_norm")],
        }
    elif kind == "schema":  # the gold index as doc_to_text makes lm-eval score each context
        config |= {
            "output_type": "multiple_choice",
            "doc_to_text": "gold",
            "doc_to_choice": "context_options",
            "doc_to_target": "continuation",
            "metric_list": [_metric("acc")],
        }
    else:
        config |= {
            "output_type": "loglikelihood",
            "doc_to_text": text,
            "doc_to_target": "{{' ' + continuation}}",
            "target_delimiter": "",
            "metric_list": [_metric("perplexity", "perplexity", False), _metric("acc")],
        }
    return config


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def evaluate_zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = ("piqa", "winogrande", "lambada", "arc_easy", "wsc"),
    per_task: int | None = 200,
    seed: int = 0,
    batch_size: int = 4,
    bf16: bool = False,
    data_dir: str | os.PathLike | None = None,
    examples: bool = False,
) -> dict[str, dict[str, Any]]:
    """Zero-shot scores of `model`: task -> {metric: value, metric_stderr: value, n: examples}.

    With `examples`, each task also lists what was scored per example: `doc_id`, the
    (context, continuation) pairs lm-eval scored and their log-likelihoods.

    Accuracies are fractions; `lambada` also gives `perplexity` (of its last word). `bf16` runs
    the model under bfloat16 autocast with log-softmax in float32 (as lm-eval's own options do).
    It is off by default: it pays only where the hardware computes in bfloat16 (a GPU, a CPU
    with AMX or AVX512-BF16); elsewhere autocast emulates it (on the project's AVX2-only EPYC a
    training step of chapter 1's student took 14x as long under bf16: README, "What distillation
    costs here").

    `batch_size` is 4: lm-eval pads each batch to its longest request, and on a CPU a larger
    batch pads more than it gains (SmolLM2-135M on piqa and lambada, one thread: 16 took 2.0x
    the time of 4 at 4 examples a task and 1.4x at 24; the scores agreed to 1e-4). A GPU wants more.
    """
    check_tasks(tasks)
    if per_task is not None and per_task < 1:
        raise ConfigError(f"zero_shot_per_task = {per_task}: give a positive number, or None for all.")
    from lm_eval.models.huggingface import HFLM

    specs, names, samples = _task_specs(tasks, per_task, seed, data_dir)
    local = all(isinstance(spec, dict) for spec in specs)  # task definitions over the local files
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                device=str(next(model.parameters()).device),
                mixed_precision_dtype=torch.bfloat16 if bf16 else None,
                softmax_dtype=torch.float32,
                max_length=2048,
            )
            results = _evaluate(
                lm,
                specs,
                _task_manager(with_builtin_tasks=not local),
                samples=samples if local else None,
                limit=None if local else per_task,
                seed=seed,
                examples=examples,
            )
    finally:
        model.train(was_training)
    return {task: _task_scores(results, names[task], examples) for task in tasks}


def _evaluate(
    lm: Any,
    specs: list[Any],
    task_manager: Any,
    samples: dict[str, list[int]] | None,
    limit: int | None,
    seed: int,
    examples: bool,
) -> dict[str, Any]:
    """lm-eval's `evaluate` with what `simple_evaluate` sets up before it: the seeds, and zero
    shots where a task names none. `simple_evaluate` then records the machine's environment for
    its report (torch's environment probe runs `pip list`, and a `git` subprocess): a second or
    two per call that nothing here reads, paid for every model and task list scored."""
    import numpy as np
    from lm_eval.evaluator import evaluate

    loaded = task_manager.load(specs)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return evaluate(
        lm=lm,
        task_dict=loaded,
        limit=limit,
        samples=samples,
        bootstrap_iters=1000,
        log_samples=examples,
        verbosity="ERROR",
    )


def _task_specs(
    tasks: Sequence[str], per_task: int | None, seed: int, data_dir: str | os.PathLike | None
) -> tuple[list[Any], dict[str, str], dict[str, list[int]] | None]:
    """(lm-eval task specs, our name -> lm-eval's, lm-eval name -> seeded example ids or None).

    Local task files when the mirror has every task, else lm-eval's own hub tasks (whose
    subset is its `limit`, so no sample ids).
    """
    paths = {task: task_file(task, data_dir) for task in tasks}
    if not all(path is not None for path in paths.values()):
        return [HUB_TASKS[t] for t in tasks], {t: HUB_TASKS[t] for t in tasks}, None
    specs: list[Any] = []
    names: dict[str, str] = {}
    samples: dict[str, list[int]] | None = {} if per_task is not None else None
    for task in tasks:
        config = task_config(task, paths[task])  # type: ignore[arg-type]
        specs.append(config)
        names[task] = config["task"]
        if samples is not None and per_task is not None:
            total = _count_lines(paths[task])  # type: ignore[arg-type]
            chosen = random.Random(f"{seed}-{task}").sample(range(total), min(per_task, total))
            samples[config["task"]] = sorted(chosen)
    return specs, names, samples


def _task_scores(results: dict[str, Any], name: str, examples: bool) -> dict[str, Any]:
    """One task's metrics (and, with `examples`, what was scored per example) from lm-eval's results."""
    scores: dict[str, Any] = {}
    for key, value in results["results"][name].items():
        if "," in key and isinstance(value, (int, float)):
            scores[key.split(",")[0]] = float(value)
    scores["n"] = float(results.get("n-samples", {}).get(name, {}).get("effective", 0))
    if examples:
        scores["examples"] = [
            {
                "doc_id": sample["doc_id"],
                "requests": [list(args) for args in sample["arguments"]],
                "loglikelihoods": [float(resp[0]) for resp in sample["filtered_resps"]],
            }
            for sample in results["samples"][name]
        ]
    return scores
