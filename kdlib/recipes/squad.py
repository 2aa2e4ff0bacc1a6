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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, EvalPrediction, PrinterCallback

from kdlib import qa
from kdlib.batching import FeatureDataset, PadCollator, inference_batches
from kdlib.cache import TeacherOutputCache, cache_key, model_fingerprint, sequences_fingerprint
from kdlib.config import ConfigError, check_choice, check_range
from kdlib.data import load_squad, split_by_article
from kdlib.lm_cache import bf16_autocast
from kdlib.registry import load_pretrained, quiet_transformers, resolve_model
from kdlib.report import RunRecord, claim_record, gain_verdict, write_json_atomic
from kdlib.trainer import (
    DistillationArguments,
    DistillationTrainer,
    check_same_tokenization,
)

SPLITS = ("dev-by-article", "official")
PRECISIONS = ("float32", "bfloat16")


@dataclass
class SquadDistillationConfig:
    """Every parameter of chapter 1; the chapter's parameters cell lists the same names."""

    profile: str = "default"
    teacher: str = "minilm-l6-squad"
    student: str = "minilm-l3"
    data_dir: str = ""
    split: str = "dev-by-article"
    heldout_articles: list[int] = field(default_factory=lambda: list(range(38, 48)))
    max_train_windows: int = 2000
    eval_questions: int = 400
    curve_questions: int = 100
    max_length: int = 192
    stride: int = 64
    n_best: int = 20
    max_answer_length: int = 30
    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_squad: float = 0.5
    learning_rate: float = 1e-4
    batch_size: int = 16
    epochs: float = 1.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    teacher_precision: str = "float32"
    eval_every: int = 50
    seed: int = 0
    train_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "outputs/ch1"

    def __post_init__(self) -> None:
        check_choice("profile", self.profile, ("smoke", "default", "paper"))
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


def load_qa_model(name: str) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for a registry name, folder or hub id, as a float32 QA model."""
    return load_pretrained(name, AutoModelForQuestionAnswering)


@dataclass
class SquadSplit:
    """Questions and their windows for training, the learning curve, and the final evaluation."""

    train_examples: list[dict]
    eval_examples: list[dict]
    curve_examples: list[dict]
    train: qa.QAWindows
    eval: qa.QAWindows
    curve: qa.QAWindows
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
        train = _subset(train, keep)
    eval_windows = qa.prepare_windows(eval_ex, tokenizer, cfg.max_length, cfg.stride)
    curve = qa.prepare_windows(curve_ex, tokenizer, cfg.max_length, cfg.stride) if curve_ex else None
    record.update(
        train_windows=len(train),
        train_windows_without_answer=int(sum(s == 0 for s in train.start_positions)),
        evaluated_questions=len(eval_ex),
        eval_windows=len(eval_windows),
        curve_questions=len(curve_ex),
    )
    return SquadSplit(train_ex, eval_ex, curve_ex, train, eval_windows, curve, record)


def _order(examples: Sequence[dict]) -> Any:
    position = {ex["id"]: i for i, ex in enumerate(examples)}
    return lambda ex: position[ex["id"]]


def _subset(windows: qa.QAWindows, keep: Sequence[int]) -> qa.QAWindows:
    return qa.QAWindows(
        {k: [v[i] for i in keep] for k, v in windows.features.items()},
        [windows.example_index[i] for i in keep],
        [windows.offsets[i] for i in keep],
        [windows.start_positions[i] for i in keep],
        [windows.end_positions[i] for i in keep],
    )


@torch.inference_mode()
def span_logits(
    model: torch.nn.Module, windows: qa.QAWindows, pad_token_id: int, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Start and end logits `[windows, max_len]` (padding: 0), batched by similar length."""
    model.eval()
    lengths = windows.lengths()
    out = {
        k: np.zeros((len(windows), max(lengths)), dtype=np.float32) for k in ("start_logits", "end_logits")
    }
    for rows, batch in inference_batches(model, windows.features, pad_token_id, batch_size):
        outputs = model(**batch)
        for key in out:
            logits = outputs[key].float().cpu().numpy()
            for j, i in enumerate(rows):
                out[key][i, : lengths[i]] = logits[j, : lengths[i]]
    return out


def teacher_span_logits(
    teacher: torch.nn.Module,
    windows: qa.QAWindows,
    pad_token_id: int,
    cache: TeacherOutputCache,
    teacher_id: str | None = None,
    precision: str = "float32",
) -> dict[str, np.ndarray]:
    """The teacher's span logits for these windows, from the cache or computed once into it.

    `precision` "bfloat16" runs the pass under bfloat16 autocast (2.7x faster on the benchmark's
    CPU, logits within about 0.1 of float32's); the logits are stored in float32 either way, under
    a key that names the precision.
    """
    check_choice("teacher_precision", precision, PRECISIONS)
    key = cache_key(
        kind="qa-span-logits",
        teacher=teacher_id or model_fingerprint(teacher),
        inputs={name: sequences_fingerprint(col) for name, col in sorted(windows.features.items())},
        precision=precision,
    )
    device = next(teacher.parameters()).device

    def compute() -> dict[str, np.ndarray]:
        with torch.inference_mode(), bf16_autocast(precision == "bfloat16", device):
            return span_logits(teacher, windows, pad_token_id)

    return cache.get_or_compute(key, compute)


def evaluate(
    model: torch.nn.Module,
    examples: Sequence[dict],
    windows: qa.QAWindows,
    cfg: SquadDistillationConfig,
    pad_token_id: int,
    logits: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """SQuAD EM/F1 of `model` on `examples`, and its predictions (question id -> answer)."""
    logits = logits if logits is not None else span_logits(model, windows, pad_token_id)
    predictions = qa.predict_answers(
        examples, windows, logits["start_logits"], logits["end_logits"], cfg.n_best, cfg.max_answer_length
    )
    return qa.squad_scores(predictions, examples), predictions


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


def window_dataset(windows: qa.QAWindows, teacher_logits: dict[str, np.ndarray] | None) -> FeatureDataset:
    columns = dict(windows.features)
    columns["start_positions"] = windows.start_positions
    columns["end_positions"] = windows.end_positions
    extra = {f"teacher_{k}": v for k, v in (teacher_logits or {}).items()}
    return FeatureDataset(columns, extra)


def check_models(teacher_tokenizer: Any, student_name: str) -> Any:
    """Load the student's tokenizer and check it tokenises like the teacher's, before training."""
    with quiet_transformers():
        student_tokenizer = AutoTokenizer.from_pretrained(resolve_model(student_name))
    check_same_tokenization(teacher_tokenizer, student_tokenizer)
    return student_tokenizer


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
class StudentRun:
    name: str
    """`student_alone/seed0`, `student_distilled/seed0`, ...: the key of its results."""
    model: torch.nn.Module
    history: list[dict[str, Any]]
    seconds: float


class SquadExperiment:
    """Chapter 1 as a few calls: build it, evaluate the teacher, train two students, write.

    Construction loads the teacher, checks the student tokenises alike, and prepares the data,
    so every configuration problem shows before any training. Results accumulate in `record`
    and `write()` saves metrics.json and each model's predictions in SQuAD's official format.
    """

    def __init__(self, cfg: SquadDistillationConfig, cache: TeacherOutputCache | None = None) -> None:
        self.cfg = cfg
        self.record = RunRecord("ch1", cfg.profile, asdict(cfg))
        self.record["reference"] = reference_numbers()
        self.teacher, self.tokenizer = load_qa_model(cfg.teacher)
        check_models(self.tokenizer, cfg.student)
        self.data = prepare_data(cfg, self.tokenizer)
        self.record["data"] = self.data.record
        self.cache = cache or TeacherOutputCache()
        self.predictions: dict[str, dict[str, str]] = {}
        self.question_scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.timings: dict[str, float] = {}
        started = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        precision = self.cfg.teacher_precision
        self.teacher_train = teacher_span_logits(
            self.teacher, self.data.train, pad, self.cache, precision=precision
        )
        self.teacher_curve = (
            teacher_span_logits(self.teacher, self.data.curve, pad, self.cache, precision=precision)
            if self.data.curve
            else None
        )
        self.timings["teacher_logits_s"] = time.perf_counter() - started

    def evaluate(self, name: str, model: torch.nn.Module) -> dict[str, float]:
        """EM/F1 on the held-out questions; kept under `name` with the predictions."""
        started = time.perf_counter()
        logits = span_logits(model, self.data.eval, self.tokenizer.pad_token_id)
        predictions = qa.predict_answers(
            self.data.eval_examples,
            self.data.eval,
            logits["start_logits"],
            logits["end_logits"],
            self.cfg.n_best,
            self.cfg.max_answer_length,
        )
        self.timings[f"eval_{name}_s"] = time.perf_counter() - started
        scores = qa.squad_scores(predictions, self.data.eval_examples)
        self.predictions[name] = predictions
        self.question_scores[name] = qa.per_question_scores(predictions, self.data.eval_examples)
        if name == "teacher":
            self.teacher_eval_logits = logits
            self.record["results"]["teacher"] = scores
        else:
            self.record["results"].setdefault("runs", {})[name] = scores
        return scores

    def train_student(self, distil: bool, seed: int) -> StudentRun:
        """Fine-tune a fresh copy of the student, alone or with the teacher's cached logits.

        `seed` fixes the new QA head, dropout and the data order, so the two runs of one seed
        differ only in the loss.
        """
        cfg = self.cfg
        name = f"{STUDENTS[distil]}/seed{seed}"
        use_teacher = distil and cfg.alpha_ce > 0
        transformers.set_seed(seed)
        model, tokenizer = load_qa_model(cfg.student)
        args = DistillationArguments(
            output_dir=str(Path(cfg.output_dir) / "runs" / name),
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=32,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_ratio,
            num_train_epochs=cfg.epochs,
            lr_scheduler_type="linear",
            logging_steps=self.logging_steps(),
            eval_strategy="steps" if cfg.eval_every and self.data.curve else "no",
            eval_steps=cfg.eval_every or None,
            save_strategy="no",
            seed=seed,
            temperature=cfg.temperature,
            alpha_ce=cfg.alpha_ce if use_teacher else 0.0,
            alpha_task=cfg.alpha_squad if use_teacher else 1.0,
            train_sampling_strategy="group_by_length",
            dataloader_pin_memory=torch.cuda.is_available(),
            disable_tqdm=True,
            report_to="none",
        )
        curve = self.data.curve
        trainer = DistillationTrainer(
            model=model,
            args=args,
            train_dataset=window_dataset(self.data.train, self.teacher_train if use_teacher else None),
            eval_dataset=window_dataset(curve, self.teacher_curve if use_teacher else None)
            if curve
            else None,
            data_collator=PadCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            compute_metrics=SquadMetric(self.data.curve_examples, curve, cfg) if curve else None,
        )
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        self.timings[f"train_{name}_s"] = seconds
        history = trainer.state.log_history
        self.record["results"].setdefault("curves", {})[name] = history
        return StudentRun(name, trainer.model, history, seconds)

    def logging_steps(self) -> int:
        """Log the loss terms about every 10 steps, and at least 10 times per run."""
        steps = math.ceil(len(self.data.train) / self.cfg.batch_size) * self.cfg.epochs
        return max(1, min(10, int(steps // 10)))

    def summarize(self) -> dict[str, Any]:
        """Mean and spread over the training seeds, and the gain of the second step.

        Each student's EM/F1 are averaged over seeds (with their standard deviation). The gain
        is distilled minus alone, paired twice: per seed (same seed, same data order), and per
        question on the seed-averaged scores, whose standard error measures how much the
        choice of questions alone could move it.
        """
        results, seeds = self.record["results"], self.cfg.train_seeds
        for student in STUDENTS:
            runs = [results["runs"][f"{student}/seed{seed}"] for seed in seeds]
            summary: dict[str, Any] = {"seeds": list(seeds)}
            for metric in ("exact_match", "f1"):
                values = np.array([run[metric] for run in runs])
                summary[metric] = float(values.mean())
                summary[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            results[student] = summary
        gain: dict[str, Any] = {}
        for i, metric in enumerate(("exact_match", "f1")):
            per_seed = [
                results["runs"][f"student_distilled/seed{s}"][metric]
                - results["runs"][f"student_alone/seed{s}"][metric]
                for s in seeds
            ]
            alone = np.mean([self.question_scores[f"student_alone/seed{s}"][i] for s in seeds], axis=0)
            distilled = np.mean(
                [self.question_scores[f"student_distilled/seed{s}"][i] for s in seeds], axis=0
            )
            gain[metric] = {
                **qa.paired_difference(alone, distilled),
                "per_seed": per_seed,
                "seeds_improved": int(sum(g > 0 for g in per_seed)),
            }
        results["kd_gain"] = gain
        f1, em = gain["f1"], gain["exact_match"]
        self.record["claims"] = [
            claim_record(
                "A second distillation step during fine-tuning improves the student on SQuAD v1.1",
                gain_verdict(f1["mean"], f1["se"], f1["seeds_improved"], len(seeds)),
                measured=f"F1 {f1['mean']:+.1f} (± {f1['se']:.1f} SE), EM {em['mean']:+.1f}; better in "
                f"{f1['seeds_improved']} of {len(seeds)} seeds",
                paper="F1 +1.1, EM +1.4: DistilBERT 77.7/85.8 -> 79.1/86.9 EM/F1 (Sanh et al. 2019, Table 2)",
                replication="Tunstall (2021): 'within spitting distance' of 79.1/86.9 with a "
                "DistillationTrainer",
            )
        ]
        return results

    def write(self) -> Path:
        """metrics.json (whole or not at all) and predictions/<model>.json beside it."""
        out = Path(self.cfg.output_dir)
        for name, predictions in self.predictions.items():
            write_json_atomic(out / "predictions" / f"{name.replace('/', '_')}.json", predictions)
        self.record["timings"] = {k: round(v, 1) for k, v in self.timings.items()}
        self.record["cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        return self.record.write(out / "metrics.json")
