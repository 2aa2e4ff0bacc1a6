"""Chapter 1's experiment: DistilBERT's second distillation step on SQuAD v1.1.

A teacher fine-tuned on SQuAD; a student fine-tuned alone (cross-entropy on the gold span);
the same student fine-tuned with the teacher's span distributions as an extra, tempered KL
term (Sanh et al. 2019, section 4.2; the blog's `DistillationTrainer`). The teacher's logits on
the training windows are computed once and cached, so the distilled run costs what the plain
run costs.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, EvalPrediction

from bookrun.chapters import PROFILES
from kdlib import qa
from kdlib.batching import PadCollator
from kdlib.cache import TeacherOutputCache
from kdlib.config import ConfigError, check_choice, check_range
from kdlib.data import load_squad, split_by_article
from kdlib.lm_cache import bf16_autocast
from kdlib.qa_teacher import PRECISIONS, load_qa_model, span_logits, teacher_span_logits, window_dataset
from kdlib.registry import quiet_transformers, resolve_model
from kdlib.report import RunRecord, claim_record, gain_verdict, write_json_atomic
from kdlib.stack import check_layer_indices, keep_layers
from kdlib.stats import paired_difference, seed_summary
from kdlib.trainer import (
    DistillationArguments,
    DistillationTrainer,
    check_same_tokenization,
    quiet_arguments,
)

SPLITS = ("dev-by-article", "official")


@dataclass
class SquadDistillationConfig:
    """Every parameter of chapter 1, checked. No defaults here: the chapter's parameters cell
    sets them (`bookrun.params.chapter_config` builds one outside the notebook)."""

    profile: str
    teacher: str
    student: str
    student_layers: list[int]
    data_dir: str
    split: str
    heldout_articles: list[int]
    max_train_windows: int
    eval_questions: int
    curve_questions: int
    max_length: int
    stride: int
    n_best: int
    max_answer_length: int
    temperature: float
    alpha_ce: float
    alpha_squad: float
    learning_rate: float
    batch_size: int
    epochs: float
    warmup_ratio: float
    weight_decay: float
    teacher_precision: str
    bf16: bool
    eval_every: int
    seed: int
    train_seeds: list[int]
    output_dir: str

    def __post_init__(self) -> None:
        check_choice("profile", self.profile, PROFILES)
        check_choice("split", self.split, SPLITS)
        check_choice("teacher_precision", self.teacher_precision, PRECISIONS)
        if self.split == "dev-by-article" and not self.heldout_articles:
            raise ConfigError("heldout_articles is empty: split='dev-by-article' needs some.")
        for name in ("max_train_windows", "eval_questions", "curve_questions", "eval_every"):
            check_range(name, getattr(self, name), low=0)
        for name in ("batch_size", "n_best", "max_answer_length", "stride"):
            check_range(name, getattr(self, name), low=1)
        check_range("max_length", self.max_length, low=32, high=4096)
        if self.max_length <= self.stride:
            raise ConfigError(
                f"max_length = {self.max_length} must exceed stride = {self.stride}: consecutive "
                "windows overlap by `stride` tokens, so each must be longer than the overlap."
            )
        check_range("temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range("alpha_ce", self.alpha_ce, low=0.0, high=1.0)
        check_range("alpha_squad", self.alpha_squad, low=0.0, high=1.0)
        if self.alpha_ce == 0 and self.alpha_squad == 0:
            raise ConfigError("alpha_ce and alpha_squad are both 0: at least one term must count.")
        check_range("learning_rate", self.learning_rate, low=0.0, high=1.0, low_inclusive=False)
        check_range("epochs", self.epochs, low=0.0, low_inclusive=False)
        check_range("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_inclusive=False)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("seed", self.seed, low=0)
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ConfigError(f"train_seeds = {self.train_seeds} must be a non-empty list of distinct seeds.")
        for seed in self.train_seeds:
            check_range("train_seeds[i]", seed, low=0)
        if not self.output_dir:
            raise ConfigError("output_dir is empty: name a folder for metrics.json.")


@dataclass
class SquadSplit:
    """Questions and their windows for training, the learning curve, and the final evaluation."""

    train_examples: list[dict]
    eval_examples: list[dict]
    curve_examples: list[dict]
    train: qa.QAWindows
    eval: qa.QAWindows
    curve: qa.QAWindows | None
    pad_token_id: int
    record: dict[str, Any]


def prepare_data(cfg: SquadDistillationConfig, tokenizer: Any) -> SquadSplit:
    """Load SQuAD, split it, take the configured subsets, and cut every question into windows."""
    if cfg.max_length > tokenizer.model_max_length:
        raise ConfigError(
            f"max_length = {cfg.max_length} exceeds the tokenizer's model_max_length "
            f"({tokenizer.model_max_length})."
        )
    data_dir = cfg.data_dir or None
    if cfg.split == "dev-by-article":
        train_ex, eval_ex, record = split_by_article(load_squad("validation", data_dir), cfg.heldout_articles)
    else:
        train_ex, eval_ex = load_squad("train", data_dir), load_squad("validation", data_dir)
        record = {
            "train": "official train split",
            "eval": "official validation split",
            "train_questions": len(train_ex),
            "eval_questions": len(eval_ex),
        }
    rng = random.Random(cfg.seed)
    if cfg.eval_questions:
        eval_ex = sorted(rng.sample(eval_ex, min(cfg.eval_questions, len(eval_ex))), key=_order(eval_ex))
    curve_ex = eval_ex[: cfg.curve_questions] if cfg.curve_questions else []
    train = qa.prepare_windows(train_ex, tokenizer, cfg.max_length, cfg.stride)
    if cfg.max_train_windows and len(train) > cfg.max_train_windows:
        keep = sorted(rng.sample(range(len(train)), cfg.max_train_windows))
        train = train.subset(keep)
    eval_windows = qa.prepare_windows(eval_ex, tokenizer, cfg.max_length, cfg.stride)
    curve = qa.prepare_windows(curve_ex, tokenizer, cfg.max_length, cfg.stride) if curve_ex else None
    record.update(
        train_windows=len(train),
        train_windows_without_answer=int(sum(s == 0 for s in train.start_positions)),
        evaluated_questions=len(eval_ex),
        eval_windows=len(eval_windows),
        curve_questions=len(curve_ex),
    )
    return SquadSplit(train_ex, eval_ex, curve_ex, train, eval_windows, curve, tokenizer.pad_token_id, record)


def _order(examples: Sequence[dict]) -> Any:
    position = {ex["id"]: i for i, ex in enumerate(examples)}
    return lambda ex: position[ex["id"]]


class SquadMetric:
    """`compute_metrics` for the Trainer: span logits of the curve windows -> EM/F1."""

    def __init__(self, examples: Sequence[dict], windows: qa.QAWindows, cfg: SquadDistillationConfig):
        self.examples, self.windows, self.cfg = examples, windows, cfg

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        start, end = prediction.predictions[:2]
        predictions = qa.predict_answers(
            self.examples, self.windows, start, end, self.cfg.n_best, self.cfg.max_answer_length
        )
        scores = qa.squad_scores(predictions, self.examples)
        return {"exact_match": scores["exact_match"], "f1": scores["f1"]}


def check_models(teacher_tokenizer: Any, cfg: SquadDistillationConfig) -> Any:
    """Before any training: the student tokenises like the teacher, and its layers to keep exist."""
    with quiet_transformers():
        path = resolve_model(cfg.student)
        student_tokenizer = AutoTokenizer.from_pretrained(path)
        depth = AutoConfig.from_pretrained(path).num_hidden_layers
    check_same_tokenization(teacher_tokenizer, student_tokenizer)
    if cfg.student_layers:
        check_layer_indices(cfg.student_layers, depth, "student_layers")
    return student_tokenizer


def load_student(cfg: SquadDistillationConfig) -> tuple[torch.nn.Module, Any]:
    """The student as it starts: `cfg.student` with a new answer head, cut to `student_layers`.

    DistilBERT initialised its student from every other layer of its teacher; cutting a
    pretrained encoder the same way gives a 3-layer student that already represents text well,
    where a model pretrained at 3 layers learns SQuAD far more slowly (a probe on this machine,
    recorded in the project's issue on reference runs: one seed, one epoch of 747 steps at lr
    3e-4, F1 54.1 for the cut student against 12.1 for MiniLM-L3 on all 1,988 held-out questions).
    """
    model, tokenizer = load_qa_model(cfg.student)
    if cfg.student_layers:
        model = keep_layers(model, cfg.student_layers, "student_layers")
    return model, tokenizer


def reference_numbers() -> dict[str, Any]:
    """Sanh et al. (2019), Table 2: SQuAD v1.1 dev EM/F1, and the gain of the second step."""
    return {
        "citation": "sanh2019distilbert",
        "table": "Table 2 (SQuAD v1.1 dev)",
        "teacher": {"model": "BERT-base", "exact_match": 81.2, "f1": 88.5},
        "student_alone": {"model": "DistilBERT", "exact_match": 77.7, "f1": 85.8},
        "student_distilled": {"model": "DistilBERT (D)", "exact_match": 79.1, "f1": 86.9},
    }


STUDENTS = ("student_alone", "student_distilled")


@dataclass
class TeacherLogits:
    """The teacher's span logits on the training windows and on the learning-curve windows."""

    train: dict[str, np.ndarray]
    curve: dict[str, np.ndarray] | None
    seconds: float


def teacher_pass(
    teacher: torch.nn.Module, data: SquadSplit, cfg: SquadDistillationConfig, cache: TeacherOutputCache
) -> TeacherLogits:
    """The teacher's span logits on the training and learning-curve windows, cached.

    Keyed by the teacher's weights, the windows' ids and the precision: a rerun, another seed or
    another temperature reuses them, so a distilled run costs what a plain run costs.
    """
    started, precision = time.perf_counter(), cfg.teacher_precision
    train = teacher_span_logits(teacher, data.train, data.pad_token_id, cache, precision)
    curve = (
        teacher_span_logits(teacher, data.curve, data.pad_token_id, cache, precision) if data.curve else None
    )
    return TeacherLogits(train, curve, time.perf_counter() - started)


@dataclass
class Scored:
    """One model's answers to the held-out questions: scores, predictions, and their sources."""

    scores: dict[str, float]
    predictions: dict[str, str]
    per_question: tuple[np.ndarray, np.ndarray]
    """(exact match, F1) per question, in [0, 1]: what the paired comparisons use."""
    logits: dict[str, np.ndarray]
    seconds: float


def score(model: torch.nn.Module, data: SquadSplit, cfg: SquadDistillationConfig) -> Scored:
    """EM/F1 of `model` on the held-out questions, as SQuAD's official script computes them
    (under bfloat16 autocast when `cfg.bf16`, as the students are trained and their curves scored)."""
    started = time.perf_counter()
    with bf16_autocast(cfg.bf16, next(model.parameters()).device):
        logits = span_logits(model, data.eval, data.pad_token_id)
    predictions = qa.predict_answers(
        data.eval_examples,
        data.eval,
        logits["start_logits"],
        logits["end_logits"],
        cfg.n_best,
        cfg.max_answer_length,
    )
    return Scored(
        qa.squad_scores(predictions, data.eval_examples),
        predictions,
        qa.per_question_scores(predictions, data.eval_examples),
        logits,
        time.perf_counter() - started,
    )


@dataclass
class StudentRun:
    name: str
    """`student_alone/seed0`, `student_distilled/seed0`, ...: the key of its results."""
    model: torch.nn.Module
    history: list[dict[str, Any]]
    seconds: float


def logging_steps(cfg: SquadDistillationConfig, train_windows: int) -> int:
    """Log the loss terms about every 10 steps, and at least 10 times per run."""
    steps = math.ceil(train_windows / cfg.batch_size) * cfg.epochs
    return max(1, min(10, int(steps // 10)))


def student_arguments(
    cfg: SquadDistillationConfig, data: SquadSplit, name: str, seed: int, distil: bool
) -> DistillationArguments:
    """The blog's recipe as `DistillationArguments`; the chapter's loss weights mapped onto kdlib's.

    The blog's `alpha_squad` is kdlib's `alpha_task`. A student fine-tuned alone has the task
    loss only; a distilled one with `alpha_ce` = 0 is the same run.
    """
    return quiet_arguments(
        output_dir=str(Path(cfg.output_dir) / "runs" / name),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.epochs,
        lr_scheduler_type="linear",
        logging_steps=logging_steps(cfg, len(data.train)),
        eval_strategy="steps" if cfg.eval_every and data.curve else "no",
        eval_steps=cfg.eval_every or None,
        seed=seed,
        temperature=cfg.temperature,
        alpha_ce=cfg.alpha_ce if distil else 0.0,
        alpha_task=cfg.alpha_squad if distil else 1.0,
        train_sampling_strategy="group_by_length",
        bf16=cfg.bf16,
        use_cpu=cfg.bf16 and not torch.cuda.is_available(),  # the Trainer's condition for bf16 on a CPU
    )


def train_student(
    cfg: SquadDistillationConfig,
    data: SquadSplit,
    seed: int,
    teacher_logits: TeacherLogits | None = None,
) -> StudentRun:
    """Fine-tune a fresh copy of the student: alone, or with the teacher's cached logits.

    `seed` fixes the new QA head, dropout and the data order, so the two runs of one seed
    differ only in the loss.
    """
    distil = teacher_logits is not None
    name = f"{STUDENTS[distil]}/seed{seed}"
    use_teacher = distil and cfg.alpha_ce > 0
    transformers.set_seed(seed)
    model, tokenizer = load_student(cfg)
    args = student_arguments(cfg, data, name, seed, use_teacher)
    curve = data.curve
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=window_dataset(data.train, teacher_logits.train if use_teacher else None),
        eval_dataset=window_dataset(curve, teacher_logits.curve if use_teacher else None) if curve else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        compute_metrics=SquadMetric(data.curve_examples, curve, cfg) if curve else None,
    )
    started = time.perf_counter()
    trainer.train()
    return StudentRun(name, trainer.model, trainer.state.log_history, time.perf_counter() - started)


def seed_means(cfg: SquadDistillationConfig, scored: dict[str, Scored]) -> dict[str, dict[str, Any]]:
    """Each student's EM/F1 averaged over the training seeds, with their standard deviation."""
    means = {}
    for student in STUDENTS:
        summary: dict[str, Any] = {"seeds": list(cfg.train_seeds)}
        for metric in ("exact_match", "f1"):
            spread = seed_summary([scored[f"{student}/seed{s}"].scores[metric] for s in cfg.train_seeds])
            summary[metric], summary[f"{metric}_std"] = spread["mean"], spread["std"]
        means[student] = summary
    return means


def kd_gain(cfg: SquadDistillationConfig, scored: dict[str, Scored]) -> dict[str, dict[str, Any]]:
    """The second step's gain, distilled minus alone, paired twice.

    Per seed (same seed, same data order), and per question on the seed-averaged scores, whose
    standard error measures how much the choice of questions alone could move it.
    """
    seeds, gain = cfg.train_seeds, {}
    for i, metric in enumerate(("exact_match", "f1")):
        per_seed = [
            scored[f"student_distilled/seed{s}"].scores[metric]
            - scored[f"student_alone/seed{s}"].scores[metric]
            for s in seeds
        ]
        alone = np.mean([scored[f"student_alone/seed{s}"].per_question[i] for s in seeds], axis=0)
        distilled = np.mean([scored[f"student_distilled/seed{s}"].per_question[i] for s in seeds], axis=0)
        gain[metric] = {
            **paired_difference(alone, distilled),
            "per_seed": per_seed,
            "seeds_improved": int(sum(g > 0 for g in per_seed)),
        }
    return gain


def claims(gain: dict[str, dict[str, Any]], seeds: int) -> list[dict[str, Any]]:
    """The paper's claim with this run's verdict (`kdlib.report.gain_verdict` on the F1 gain)."""
    f1, em = gain["f1"], gain["exact_match"]
    return [
        claim_record(
            "A second distillation step during fine-tuning improves the student on SQuAD v1.1",
            gain_verdict(f1["mean"], f1["se"], f1["seeds_improved"], seeds),
            measured=f"F1 {f1['mean']:+.1f} (± {f1['se']:.1f} SE), EM {em['mean']:+.1f}; better in "
            f"{f1['seeds_improved']} of {seeds} seeds",
            paper="F1 +1.1, EM +1.4: DistilBERT 77.7/85.8 -> 79.1/86.9 EM/F1 (Sanh et al. 2019, Table 2)",
            replication="Tunstall (2021): 'within spitting distance' of 79.1/86.9 with a DistillationTrainer",
        )
    ]


def start_record(cfg: SquadDistillationConfig) -> RunRecord:
    """The run's record, opened now (its wall time counts from here) with the paper's numbers."""
    record = RunRecord("ch1", cfg.profile, asdict(cfg))
    record["reference"] = reference_numbers()
    return record


def write_record(
    record: RunRecord,
    cfg: SquadDistillationConfig,
    data: SquadSplit,
    teacher: TeacherLogits,
    scored: dict[str, Scored],
    runs: dict[str, StudentRun],
    cache: TeacherOutputCache,
) -> Path:
    """metrics.json (whole or not at all) and predictions/<model>.json in SQuAD's format beside it."""
    record["data"] = data.record
    gain = kd_gain(cfg, scored)
    record["results"] = {
        "teacher": scored["teacher"].scores,
        "runs": {name: s.scores for name, s in scored.items() if name != "teacher"},
        "curves": {name: run.history for name, run in runs.items()},
        **seed_means(cfg, scored),
        "kd_gain": gain,
    }
    record["claims"] = claims(gain, len(cfg.train_seeds))
    out = Path(cfg.output_dir)
    for name, s in scored.items():
        write_json_atomic(out / "predictions" / f"{name.replace('/', '_')}.json", s.predictions)
    timings = {"teacher_logits_s": teacher.seconds}
    timings |= {f"eval_{name}_s": s.seconds for name, s in scored.items()}
    timings |= {f"train_{name}_s": run.seconds for name, run in runs.items()}
    record["timings"] = {k: round(v, 1) for k, v in timings.items()}
    record["cache"] = {"hits": cache.hits, "misses": cache.misses}
    return record.write(out / "metrics.json")


def check_record(metrics: dict[str, Any]) -> list[str]:
    """What in a chapter 1 record disagrees with itself: each student's summary against its
    per-seed scores, the paired gain against the per-seed differences, and the verdict against
    `claims`' rule on the recorded gain. [] when it is consistent."""
    results, seeds = metrics["results"], metrics["parameters"]["train_seeds"]
    problems = []
    for student in STUDENTS:
        for metric in ("exact_match", "f1"):
            values = [results["runs"][f"{student}/seed{s}"][metric] for s in seeds]
            summary = seed_summary(values)
            if not math.isclose(results[student][metric], summary["mean"], rel_tol=1e-9, abs_tol=1e-9):
                problems.append(f"{student} {metric} {results[student][metric]} is not its seeds' mean")
            if not math.isclose(
                results[student][f"{metric}_std"], summary["std"], rel_tol=1e-9, abs_tol=1e-9
            ):
                problems.append(f"{student} {metric}_std is not its seeds' standard deviation")
    for metric, gain in results["kd_gain"].items():
        per_seed = [
            results["runs"][f"student_distilled/seed{s}"][metric]
            - results["runs"][f"student_alone/seed{s}"][metric]
            for s in seeds
        ]
        if not np.allclose(gain["per_seed"], per_seed) or gain["seeds_improved"] != sum(
            g > 0 for g in per_seed
        ):
            problems.append(f"the {metric} gain per seed is not distilled minus alone")
    if metrics["claims"] != claims(results["kd_gain"], len(seeds)):
        problems.append("the verdict does not follow from the recorded gain by the chapter's rule")
    return problems
