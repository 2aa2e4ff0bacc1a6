"""Chapter 4's experiment: BERT-of-Theseus module replacement against its alternatives, per seed.

A pretrained encoder is fine-tuned once on the task (the predecessor). For each successor depth
and seed, each method then yields a compressed model of that depth:

- `finetune-first`: the pretrained model's first layers, fine-tuned directly (the baseline);
- `extract-finetune`: the fine-tuned predecessor's first layers, fine-tuned again (the blog's
  "two-stage" extraction);
- `theseus-constant` / `theseus-linear`: module replacement with a constant coin-flip rate or
  the linear curriculum, then the extracted successor fine-tuned alone;
- `proportional`: the blog's proportional add, one method per k, then the same fine-tuning.

Every method gets the same number of optimizer steps (replacing_steps + successor_steps).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import TrainerCallback

from bookrun.chapters import PROFILES
from kdlib.classification import AccuracyCurve, accuracy, encode, fine_tune, load_classifier, tail_gain
from kdlib.config import ConfigError, check_choice, check_range
from kdlib.data import load_banking77, load_iflytek
from kdlib.registry import resolve_model
from kdlib.report import RunRecord, claim_record
from kdlib.stats import seed_summary, spread_test, welch_test
from kdlib.theseus import (
    SUCCESSOR_INIT,
    BernoulliReplacement,
    Policy,
    ProportionalAdd,
    ReplacementSchedule,
    TheseusTrainer,
    build_theseus,
    extract_successor,
    first_layers,
)
from kdlib.trainer import DistillationTrainer

METHODS = ("finetune-first", "extract-finetune", "theseus-constant", "theseus-linear", "proportional")
"""`proportional` stands for one method per value of `proportional_k` (`proportional-0.5`, ...)."""


@dataclass(frozen=True)
class Task:
    load: Callable[..., list[dict]]
    num_labels: int
    eval_split: str
    description: str


TASKS = {
    "banking77": Task(load_banking77, 77, "test", "Banking77 (77 banking intents)"),
    "iflytek": Task(load_iflytek, 119, "validation", "CLUE iflytek (119 app categories)"),
}


@dataclass
class TheseusExperimentConfig:
    """Every parameter of chapter 4, checked. No defaults here: the chapter's parameters cell
    sets them (`bookrun.params.chapter_config` builds one outside the notebook)."""

    profile: str
    task: str
    predecessor: str
    predecessor_steps: int
    predecessor_learning_rate: float
    data_dir: str
    train_examples: int
    eval_examples: int
    max_length: int
    successor_layers: list[int]
    successor_init: str
    methods: list[str]
    replace_rate: float
    linear_start: float
    linear_k: float
    proportional_k: list[float]
    replacing_steps: int
    successor_steps: int
    learning_rate: float
    batch_size: int
    freeze_embeddings: bool
    bf16: bool
    curve_every: int
    train_seeds: list[int]
    seed: int
    output_dir: str

    def __post_init__(self) -> None:
        check_choice("profile", self.profile, PROFILES)
        check_choice("task", self.task, TASKS)
        check_choice("successor_init", self.successor_init, SUCCESSOR_INIT)
        for name in (
            "predecessor_steps",
            "train_examples",
            "eval_examples",
            "successor_steps",
            "curve_every",
        ):
            check_range(name, getattr(self, name), low=0)
        for name in ("batch_size", "replacing_steps"):
            check_range(name, getattr(self, name), low=1)
        check_range("max_length", self.max_length, low=8, high=4096)
        for name in ("predecessor_learning_rate", "learning_rate"):
            check_range(name, getattr(self, name), low=0.0, high=1.0, low_inclusive=False)
        if not self.successor_layers or min(self.successor_layers) < 1:
            raise ConfigError(f"successor_layers = {self.successor_layers}: give one or more depths >= 1.")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods = {self.methods}: list some of {', '.join(METHODS)}, each once.")
        for name in self.methods:
            check_choice("methods[i]", name, METHODS)
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ConfigError(f"train_seeds = {self.train_seeds} must be a non-empty list of distinct seeds.")
        if "proportional" in self.methods and not self.proportional_k:
            raise ConfigError("proportional_k is empty: give the k values of the proportional method.")
        if "theseus-linear" in self.methods:
            check_range("linear_start", self.linear_start, low=0.0, high=1.0, low_inclusive=False)
            check_range("linear_k", self.linear_k, low=0.0)
            if self.linear_start + self.linear_slope() >= 1.0 and self.linear_start < 1.0:
                raise ConfigError(
                    f"linear_start + linear_k = {self.linear_start + self.linear_slope():g} >= 1: every "
                    "module is replaced from the second step on. Choose linear_k well below "
                    f"1 - linear_start, or 0 to reach 1 at the last of the {self.replacing_steps} "
                    "replacing steps."
                )
        self.policies()  # the replacement settings are checked here, not after the predecessor trains

    def linear_slope(self) -> float:
        """k of the linear curriculum: as given, or (0) such that p reaches 1 at the last replacing step."""
        if self.linear_k:
            return self.linear_k
        return (1.0 - self.linear_start) / max(1, self.replacing_steps - 1)

    def policies(self) -> dict[str, Policy]:
        """Replacement method name -> its policy."""
        found: dict[str, Policy] = {}
        if "theseus-constant" in self.methods:
            found["theseus-constant"] = BernoulliReplacement(self.replace_rate)
        if "theseus-linear" in self.methods:
            found["theseus-linear"] = BernoulliReplacement(self.linear_start, self.linear_slope())
        if "proportional" in self.methods:
            for k in self.proportional_k:
                found[f"proportional-{k:g}"] = ProportionalAdd(k)
        return found

    def method_names(self) -> list[str]:
        """The methods as run and reported, `proportional` expanded per k."""
        return method_names(self.methods, self.proportional_k)


def method_names(methods: list[str], proportional_k: list[float]) -> list[str]:
    """`methods` as run and reported: `proportional` expanded into one name per k."""
    names = []
    for method in methods:
        names += [f"proportional-{k:g}" for k in proportional_k] if method == "proportional" else [method]
    return names


def reference_numbers() -> dict[str, Any]:
    return {
        "citation": "xu2020theseus",
        "claim": "module replacement compresses BERT-base to 6 layers keeping most of its accuracy",
        "glue_dev": {
            "MNLI": {"bert_base": 83.5, "theseus_6": 82.1},
            "QNLI": {"bert_base": 91.2, "theseus_6": 88.8},
            "SST-2": {"bert_base": 91.5, "theseus_6": 91.8},
        },
        "replication": {
            "citation": "theseus2020blog",
            "task": "CLUE iflytek dev accuracy",
            "finetune_12": 60.11,
            "finetune_first_6": 58.99,
            "finetune_first_3": 57.96,
            "proportional_6": 59.7,
            "proportional_3": 59.5,
            "claims": [
                "binary random replacement is unstable across runs",
                "proportional add is stabler and ends 0.5-1 point below the predecessor",
                "fine-tuning layers extracted from the predecessor does not beat 3-layer fine-tuning",
            ],
        },
    }


PAPER_FIGURES = {
    "module replacement is needed: it beats fine-tuning the extracted layers": "BERT-of-Theseus "
    "(Xu et al. 2020): 6 layers keep most of BERT-base (MNLI 82.1 vs 83.5, SST-2 91.8 vs 91.5, GLUE dev)"
}
BLOG_FIGURES = {
    "binary random replacement varies more across seeds than proportional add": "iflytek: binary runs "
    "ranged from 0.6 below the 12-layer model to no better than 3-layer fine-tuning",
    "proportional add ends 0.5-1 point below the predecessor": "iflytek: 12 layers 60.11%; "
    "proportional 6 layers 59.7%, 3 layers 59.5%",
    "fine-tuning layers extracted from the predecessor does not beat fine-tuning the first layers "
    "directly": "iflytek: no extraction variant beat 3-layer fine-tuning (57.96%)",
    "module replacement is needed: it beats fine-tuning the extracted layers": "iflytek: conclusion "
    "'theseus is necessary'",
}
"""What the paper and the blog reported for each claim `claim_verdicts` checks."""


class TheseusExperiment:
    """Chapter 4 as a few calls: fine-tune the predecessor, then `run(method, layers, seed)`."""

    def __init__(self, cfg: TheseusExperimentConfig) -> None:
        self.cfg = cfg
        self.task = TASKS[cfg.task]
        self.record = RunRecord("ch4", cfg.profile, asdict(cfg))
        self.record["reference"] = reference_numbers()
        self.timings: dict[str, float] = {}
        data_dir = cfg.data_dir or None
        train = self.task.load("train", data_dir)
        evaluation = self.task.load(self.task.eval_split, data_dir)
        rng = np.random.default_rng(cfg.seed)
        if cfg.train_examples:
            train = [train[i] for i in sorted(rng.permutation(len(train))[: cfg.train_examples])]
        if cfg.eval_examples:
            evaluation = [
                evaluation[i] for i in sorted(rng.permutation(len(evaluation))[: cfg.eval_examples])
            ]
        depth = transformers.AutoConfig.from_pretrained(resolve_model(cfg.predecessor)).num_hidden_layers
        bad = [n for n in cfg.successor_layers if n >= depth or depth % n]
        if bad:
            divisors = [d for d in range(1, depth) if depth % d == 0]
            raise ConfigError(
                f"successor_layers {bad} do not divide the predecessor's {depth} layers into equal "
                f"groups; choose from {divisors}."
            )
        transformers.set_seed(cfg.seed)  # the predecessor's new task head
        self.predecessor, self.tokenizer = load_classifier(cfg.predecessor, self.task.num_labels)
        self.depth = depth
        self.train_columns = encode(self.tokenizer, train, cfg.max_length)
        self.eval_columns = encode(self.tokenizer, evaluation, cfg.max_length)
        self.record["data"] = {
            "task": self.task.description,
            "train_examples": len(train),
            "eval_examples": len(evaluation),
            "eval_split": self.task.eval_split,
            "classes": self.task.num_labels,
        }

    # --- training ----------------------------------------------------------------------

    def _train(
        self,
        model: torch.nn.Module,
        steps: int,
        learning_rate: float,
        seed: int,
        name: str,
        callbacks: list[TrainerCallback] | None = None,
        trainer_class: type[DistillationTrainer] = DistillationTrainer,
    ) -> tuple[list[dict[str, Any]], DistillationTrainer | None, list[dict[str, float]]]:
        """`steps` AdamW steps on the task labels (warmup 10%, linear decay): (loss curve, trainer,
        evaluation accuracy every `curve_every` steps, [] when 0)."""
        if steps == 0:
            return [], None, []
        tracker = None
        if self.cfg.curve_every:
            tracker = AccuracyCurve(
                self.eval_columns, self.tokenizer.pad_token_id, self.cfg.curve_every, self.cfg.bf16
            )
            callbacks = [*(callbacks or []), tracker]
        trainer = fine_tune(
            model,
            self.train_columns,
            self.tokenizer.pad_token_id,
            output_dir=str(Path(self.cfg.output_dir) / "runs" / name),
            steps=steps,
            batch_size=self.cfg.batch_size,
            learning_rate=learning_rate,
            seed=seed,
            trainer_class=trainer_class,
            callbacks=callbacks,
            bf16=self.cfg.bf16,
        )
        losses = [entry for entry in trainer.state.log_history if "loss" in entry]
        return losses, trainer, tracker.points if tracker else []

    def evaluate(self, model: torch.nn.Module) -> float:
        return accuracy(model, self.eval_columns, self.tokenizer.pad_token_id, self.cfg.bf16)

    def fine_tune_predecessor(self) -> float:
        """Fine-tune the whole pretrained model on the task; its accuracy is the ceiling."""
        started = time.perf_counter()
        curve, _, points = self._train(
            self.predecessor,
            self.cfg.predecessor_steps,
            self.cfg.predecessor_learning_rate,
            self.cfg.seed,
            "predecessor",
        )
        acc = self.evaluate(self.predecessor)
        self.record["results"]["predecessor"] = {"accuracy": acc, "layers": self.depth, "curve": curve}
        if points:
            self.record["results"]["predecessor"]["accuracy_curve"] = points
        self.timings["predecessor_s"] = time.perf_counter() - started
        return acc

    def _fit_compressed(
        self, model: torch.nn.Module, steps: int, seed: int, name: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
        """Fine-tune a compressed model (its embeddings frozen if `freeze_embeddings`): (loss
        curve, accuracy curve)."""
        if self.cfg.freeze_embeddings:
            model.base_model.embeddings.requires_grad_(False)
        curve, _, points = self._train(model, steps, self.cfg.learning_rate, seed, name)
        return curve, points

    def run(self, method: str, layers: int, seed: int) -> dict[str, Any]:
        """Train one compressed model of `layers` layers with `method`; its record."""
        if "predecessor" not in self.record["results"]:
            raise RuntimeError(
                "call fine_tune_predecessor() first: every method starts from it or beside it."
            )
        cfg = self.cfg
        name = f"{method}/L{layers}/seed{seed}"
        tag = name.replace("/", "-")
        started = time.perf_counter()
        entry: dict[str, Any] = {"method": method, "layers": layers, "seed": seed}
        transformers.set_seed(seed)
        if method in ("finetune-first", "extract-finetune"):
            if method == "finetune-first":  # the pretrained encoder, a fresh head
                source, _ = load_classifier(cfg.predecessor, self.task.num_labels)
            else:
                source = self.predecessor
            model = first_layers(source, layers)
            curve, points = self._fit_compressed(model, cfg.replacing_steps + cfg.successor_steps, seed, tag)
        else:
            policy = cfg.policies()[method]
            theseus = copy.deepcopy(self.predecessor)
            state = build_theseus(theseus, layers, policy, cfg.successor_init)
            curve, trainer, points = self._train(
                theseus,
                cfg.replacing_steps,
                cfg.learning_rate,
                seed,
                tag + "-replacing",
                callbacks=[ReplacementSchedule(state)],
                trainer_class=TheseusTrainer,
            )
            entry["idle_steps"] = trainer.idle_steps  # every group kept its predecessor
            entry["after_replacing"] = self.evaluate(theseus)  # eval mode = the successor alone
            if isinstance(policy, BernoulliReplacement):
                entry["replaced_fraction"] = state.replaced_fraction()
            model = extract_successor(theseus)
            del theseus
            alone, alone_points = self._fit_compressed(model, cfg.successor_steps, seed, tag + "-successor")
            curve += [dict(point, step=point["step"] + cfg.replacing_steps) for point in alone]
            points += [dict(point, step=point["step"] + cfg.replacing_steps) for point in alone_points]
        entry["accuracy"] = self.evaluate(model)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        entry["curve"] = curve
        if points:  # during replacing: the successor alone (eval mode), as `after_replacing`
            entry["accuracy_curve"] = points
        self.record["results"].setdefault("runs", {})[name] = entry
        return entry

    def summarize(self) -> dict[str, dict[str, Any]]:
        """Per `method/L<layers>`: accuracy mean, std, min, max over the seeds."""
        runs = self.record["results"]["runs"]
        table = {}
        for layers in self.cfg.successor_layers:
            for method in self.cfg.method_names():
                values = [runs[f"{method}/L{layers}/seed{s}"]["accuracy"] for s in self.cfg.train_seeds]
                table[f"{method}/L{layers}"] = {
                    "method": method,
                    "layers": layers,
                    **seed_summary(values),
                    "seeds": list(self.cfg.train_seeds),
                }
        self.record["results"]["methods"] = table
        self.record["results"]["plateau"] = plateau(self.record["results"])
        self.record["claims"] = [
            claim_record(
                f"{v['claim'][0].upper()}{v['claim'][1:]} ({layers} layers)",
                v["verdict"],
                measured=v["evidence"],
                paper=PAPER_FIGURES.get(v["claim"], ""),
                replication=BLOG_FIGURES.get(v["claim"]),
            )
            for layers in self.cfg.successor_layers
            for v in claim_verdicts(self.record["results"], layers, self.cfg.train_seeds)
        ]
        return table

    def write(self) -> Path:
        self.record["timings"] = {k: round(v, 1) for k, v in self.timings.items()}
        return self.record.write(Path(self.cfg.output_dir) / "metrics.json")


def check_record(record: dict[str, Any]) -> list[str]:
    """What is inconsistent in a chapter 4 record: every run its parameters name must be there,
    and its method summaries and claims must be what its own per-seed accuracies give."""
    params, results = record["parameters"], record["results"]
    cfg_methods = method_names(params["methods"], params["proportional_k"])
    runs = results["runs"]
    missing = [
        f"{m}/L{layers}/seed{seed}"
        for layers in params["successor_layers"]
        for m in cfg_methods
        for seed in params["train_seeds"]
        if f"{m}/L{layers}/seed{seed}" not in runs
    ]
    if missing:
        return [f"run {name} is missing" for name in missing]
    problems = []
    for layers in params["successor_layers"]:
        for m in cfg_methods:
            values = [runs[f"{m}/L{layers}/seed{seed}"]["accuracy"] for seed in params["train_seeds"]]
            row = results["methods"].get(f"{m}/L{layers}")
            if row is None or not np.isclose(row["mean"], np.mean(values)):
                problems.append(f"the summary of {m}/L{layers} is not the mean of its runs")
    verdicts = [
        v["verdict"]
        for layers in params["successor_layers"]
        for v in claim_verdicts(results, layers, params["train_seeds"])
    ]
    if verdicts != [c["verdict"] for c in record.get("claims", [])]:
        problems.append("the claims are not what the runs give")
    return problems


def plateau(results: dict[str, Any]) -> dict[str, Any]:
    """Accuracy each curve gained over its last 20% of steps (`tail_gain`): the predecessor's
    and every run's, for the runs that recorded one (`curve_every`)."""
    runs = results.get("runs", {})
    return {
        "predecessor": tail_gain(results["predecessor"].get("accuracy_curve", [])),
        "runs": {
            name: tail_gain(run["accuracy_curve"]) for name, run in runs.items() if "accuracy_curve" in run
        },
    }


def _interval(test: dict[str, float]) -> str:
    return f"95% interval [{test['low']:+.1f}, {test['high']:+.1f}]"


def claim_verdicts(results: dict[str, Any], layers: int, seeds: list[int]) -> list[dict[str, Any]]:
    """The blog's claims, each checked against this run's per-seed accuracies at one depth.

    Significance is at the 5% level over seeds: a Welch test for means (with its 95% interval),
    Brown-Forsythe's test for spread (`kdlib.stats.spread_test`; an F-test loses its level when
    one of a handful of seeds is an outlier).
    "Reproduced" for a claim of *no* gain means only that no significant gain was seen. A claim
    whose methods were not run (or that needs two seeds and has one) is left out.
    """
    runs = results["runs"]
    methods = sorted({r["method"] for r in runs.values() if r["layers"] == layers})

    def accs(method: str) -> list[float]:
        return [runs[f"{method}/L{layers}/seed{s}"]["accuracy"] for s in seeds]

    binary = [m for m in methods if m.startswith("theseus-")]
    proportional = [m for m in methods if m.startswith("proportional-")]
    best_prop = max(proportional, key=lambda m: np.mean(accs(m)), default=None)
    several = len(seeds) > 1
    verdicts = []
    if binary and proportional and several:
        verdicts.append(binary_less_stable([accs(m) for m in binary], [accs(m) for m in proportional]))
    if best_prop is not None:
        verdicts.append(proportional_near_predecessor(results["predecessor"], best_prop, accs(best_prop)))
    if {"extract-finetune", "finetune-first"} <= set(methods) and several:
        verdicts.append(extraction_no_better(accs("extract-finetune"), accs("finetune-first")))
    if best_prop is not None and "extract-finetune" in methods and several:
        verdicts.append(replacement_needed(best_prop, accs(best_prop), accs("extract-finetune")))
    return verdicts


def binary_less_stable(binary: list[list[float]], proportional: list[list[float]]) -> dict[str, Any]:
    """The blog: binary replacement varies more across seeds than proportional add (Brown-Forsythe)."""
    test = spread_test(binary, proportional)
    ratio, p = test["ratio"], test["p"]
    verdict = (
        "inconclusive"
        if ratio is None
        else "reproduced"
        if p < 0.05
        else "not reproduced"
        if ratio <= 1.0
        else "inconclusive"
    )
    return {
        "claim": "binary random replacement varies more across seeds than proportional add",
        "evidence": f"seed std {test['std_a']:.2f} (binary) vs {test['std_b']:.2f} (proportional); "
        f"mean deviation from the median {test['deviation_a']:.2f} vs {test['deviation_b']:.2f}"
        + ("" if p is None else f", Brown-Forsythe p = {p:.2f}"),
        "verdict": verdict,
        "test": test,
    }


def proportional_near_predecessor(
    predecessor: dict[str, Any], method: str, accuracies: list[float]
) -> dict[str, Any]:
    """The blog: proportional add ends within about a point of the predecessor."""
    gap = predecessor["accuracy"] - float(np.mean(accuracies))
    interval = ""
    if len(accuracies) > 1:
        from scipy import stats

        se = float(np.std(accuracies, ddof=1) / np.sqrt(len(accuracies)))
        half = float(stats.t.ppf(0.975, len(accuracies) - 1)) * se
        interval = f" (95% interval {gap - half:.1f} to {gap + half:.1f} over {len(accuracies)} seeds)"
    return {
        "claim": "proportional add ends 0.5-1 point below the predecessor",
        "evidence": f"`{method}` is {gap:.1f} points below the {predecessor['layers']}-layer "
        f"predecessor{interval}",
        "verdict": "reproduced" if gap <= 1.0 else "not reproduced",
    }


def extraction_no_better(extracted: list[float], direct: list[float]) -> dict[str, Any]:
    """The blog: fine-tuning the predecessor's extracted layers does not beat direct fine-tuning."""
    test = welch_test(extracted, direct)
    gained = test["difference"] > 0 and test["p"] < 0.05
    return {
        "claim": "fine-tuning layers extracted from the predecessor does not beat fine-tuning the "
        "first layers directly",
        "evidence": f"extracted minus direct: {test['difference']:+.1f} points, {_interval(test)} "
        f"(Welch p = {test['p']:.3f})",
        "verdict": "not reproduced" if gained else "reproduced",
        "test": test,
    }


def replacement_needed(method: str, replaced: list[float], extracted: list[float]) -> dict[str, Any]:
    """The blog's conclusion: module replacement beats fine-tuning the extracted layers."""
    test = welch_test(replaced, extracted)
    verdict = (
        "reproduced"
        if test["difference"] > 0 and test["p"] < 0.05
        else "not reproduced"
        if test["difference"] <= 0
        else "inconclusive"
    )
    return {
        "claim": "module replacement is needed: it beats fine-tuning the extracted layers",
        "evidence": f"`{method}` minus extracted: {test['difference']:+.1f} points, {_interval(test)} "
        f"(Welch p = {test['p']:.3f})",
        "verdict": verdict,
        "test": test,
    }
