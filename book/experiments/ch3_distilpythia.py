"""Chapter 3's experiment: distilpythia's warm-started causal-LM distillation, and its lambada puzzle.

distilpythia trained a student warm-started from a smaller pretrained model on
`(1 - a) * L_kd + a * L_clm` (a = 0.5, T = 2, constant lr 1e-4, bf16), once on padded/truncated
documents and once on constant-length packed blocks, and scored both with lm-eval. Here each
named run trains a copy of the same warm-started student for the same number of steps:

- `kd-padded`, `kd-packed`: the card's loss on the two data layouts;
- `clm-packed`: the control, next-token loss only (a = 1), no teacher;
- `kd-packed-t1`: the card's loss at T = 1 (does the temperature flatten the student?);
- `kd-packed-topk`: the card's loss against the teacher's cached top-k distribution.

Every model (the student base, the teacher, each run) is scored on held-out text (perplexity
and the entropy of its predictions) and on the zero-shot tasks.

A student cut from the teacher's layers is a damaged model that any training repairs, while
distilpythia's base had converged on its own. `heal()` closes that gap when `heal_steps` > 0:
the cut student is trained with the next-token loss alone on text kept apart from the
distillation and held-out text (`heal_corpus`) until its held-out perplexity flattens, and the
healed weights are cached by fingerprint, so that reruns start from the same base.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from bookrun.chapters import PROFILES
from kdlib.batching import FeatureDataset, PadCollator
from kdlib.cache import TeacherOutputCache, cache_key, model_fingerprint, sequences_fingerprint
from kdlib.config import ConfigError, check_choice, check_range
from kdlib.data import DataError
from kdlib.hub import require_hub
from kdlib.lm import DIVERGENCES, perplexity, token_divergence, topk_forward_kl, topk_teacher
from kdlib.lm_cache import bf16_autocast, cached_topk
from kdlib.lm_data import LM_FILES, load_lm_documents, pack, pad_truncate
from kdlib.lm_trainer import (
    TOPK_FIELDS,
    LMDistillationArguments,
    LMDistillationTrainer,
    PerplexityCurve,
    relative_tail_drop,
)
from kdlib.registry import cache_dir, load_pretrained, quiet_transformers
from kdlib.report import RunRecord, claim_record
from kdlib.stack import keep_layers, layer_stack, middle_block
from kdlib.stats import paired_log_ratio
from kdlib.trainer import quiet_arguments
from kdlib.zeroshot import check_tasks, evaluate_zero_shot


@dataclass(frozen=True)
class RunSpec:
    data: str  # "padded" or "packed"
    distil: bool
    temperature: float | None = None  # None: the config's
    topk: bool = False
    description: str = ""


RUNS = {
    "kd-padded": RunSpec("padded", True, description="distilled, padded/truncated documents"),
    "kd-packed": RunSpec("packed", True, description="distilled, constant-length packed blocks"),
    "clm-packed": RunSpec("packed", False, description="control: next-token loss only, no teacher"),
    "kd-packed-t1": RunSpec("packed", True, 1.0, description="distilled at T = 1"),
    "kd-packed-topk": RunSpec(
        "packed", True, topk=True, description="distilled from the cached top-k teacher"
    ),
}
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class LMExperimentConfig:
    """Every parameter of chapter 3, checked. No defaults here: the chapter's parameters cell
    sets them (`bookrun.params.chapter_config` builds one outside the notebook)."""

    profile: str
    teacher: str
    student: str
    student_layers: int
    warm_start_candidates: list[int]
    heal_corpus: list[str]
    heal_steps: int
    heal_batch_size: int
    heal_learning_rate: float
    heal_curve_every: int
    corpus: list[str]
    heldout_articles: int
    heldout_blocks: int
    max_length: int
    runs: list[str]
    steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler: str
    alpha_clm: float
    temperature: float
    divergence: str
    topk: int
    topk_probe: list[int]
    bf16: bool
    freeze_embeddings: bool
    zero_shot_tasks: list[str]
    zero_shot_examples: int
    lambada_examples: int
    seed: int
    data_dir: str
    output_dir: str

    def __post_init__(self) -> None:
        check_choice("profile", self.profile, PROFILES)
        check_choice("lr_scheduler", self.lr_scheduler, SCHEDULES)
        check_choice("divergence", self.divergence, DIVERGENCES)
        for name in (
            "student_layers",
            "steps",
            "batch_size",
            "gradient_accumulation_steps",
            "heldout_blocks",
        ):
            check_range(name, getattr(self, name), low=1)
        for name in (
            "heldout_articles",
            "zero_shot_examples",
            "lambada_examples",
            "heal_steps",
            "heal_curve_every",
        ):
            check_range(name, getattr(self, name), low=0)
        check_range("heal_batch_size", self.heal_batch_size, low=1)
        check_range("heal_learning_rate", self.heal_learning_rate, low=0.0, high=1.0, low_inclusive=False)
        if self.heal_steps:
            self.check_heal_corpus()
        check_range("max_length", self.max_length, low=8, high=8192)
        check_range("learning_rate", self.learning_rate, low=0.0, high=1.0, low_inclusive=False)
        check_range("alpha_clm", self.alpha_clm, low=0.0, high=1.0)
        check_range("temperature", self.temperature, low=0.0, low_inclusive=False)
        check_range("topk", self.topk, low=1)
        if not self.runs or len(set(self.runs)) != len(self.runs):
            raise ConfigError(f"runs = {self.runs}: list some of {', '.join(RUNS)}, each once.")
        for name in self.runs:
            check_choice("runs[i]", name, RUNS)
        if any(RUNS[r].distil for r in self.runs) and self.alpha_clm == 1.0:
            raise ConfigError("alpha_clm = 1.0 leaves no distillation term: choose a < 1 for the kd-* runs.")
        if "kd-packed-topk" in self.runs and self.divergence != "forward":
            raise ConfigError(
                f"divergence = {self.divergence!r}: the top-k cache supports forward KL only; drop "
                "'kd-packed-topk' from runs or use divergence='forward'."
            )
        if not self.corpus:
            raise ConfigError(
                f"corpus is empty: name local corpora ({', '.join(LM_FILES)}) or a hub data set."
            )
        if self.heldout_articles and self.corpus[0] != "wikitext2-test":
            raise ConfigError(
                "heldout_articles > 0 holds out the last WikiText-2 articles: put 'wikitext2-test' "
                "first in corpus, or set heldout_articles = 0 to hold out the last blocks of the corpus."
            )
        check_tasks(self.zero_shot_tasks)
        if not self.student:
            for n in [self.student_layers, *self.warm_start_candidates]:
                check_range("student_layers / warm_start_candidates", n, low=1)

    def check_heal_corpus(self) -> None:
        """Healing text must be local and apart from the distillation and held-out text."""
        if not self.heal_corpus:
            raise ConfigError(
                f"heal_steps = {self.heal_steps} with an empty heal_corpus: name local corpora "
                f"({', '.join(LM_FILES)}) apart from corpus, or set heal_steps = 0."
            )
        for name in self.heal_corpus:
            check_choice("heal_corpus[i]", name, LM_FILES)
        shared = sorted(set(self.heal_corpus) & set(self.corpus))
        if shared:
            raise ConfigError(
                f"heal_corpus and corpus share {shared}: the student base would be healed on the text it "
                "is then distilled and evaluated on. Heal on other text (e.g. gutenberg, wikitext2-valid)."
            )

    def temperature_of(self, run: str) -> float:
        return RUNS[run].temperature or self.temperature


# distilpythia's model card, Table 1 (lm-eval; accuracy %, lambada perplexity)
CARD_TABLE = {
    "pythia-70m (student base)": {
        "piqa": 59.85,
        "winogrande": 51.22,
        "lambada_ppl": 140.81,
        "lambada_acc": 21.40,
        "arc": 17.15,
        "sciq": 65.00,
        "wsc": 36.53,
    },
    "pythia-160m (teacher)": {
        "piqa": 62.68,
        "winogrande": 51.07,
        "lambada_ppl": 30.03,
        "lambada_acc": 36.76,
        "arc": 19.62,
        "sciq": 76.20,
        "wsc": 36.58,
    },
    "distilpythia (padded)": {
        "piqa": 59.74,
        "winogrande": 51.62,
        "lambada_ppl": 420.70,
        "lambada_acc": 15.82,
        "arc": 17.15,
        "sciq": 61.30,
        "wsc": 36.54,
    },
    "distilpythia-cl (packed)": {
        "piqa": 59.30,
        "winogrande": 50.75,
        "lambada_ppl": 403.78,
        "lambada_acc": 15.16,
        "arc": 16.98,
        "sciq": 59.20,
        "wsc": 36.54,
    },
}


def _is_paragraph(line: str) -> bool:
    """A WikiText line with text that is not a ` = Heading = ` line."""
    return bool(line.strip()) and not line.strip().startswith("=")


def _hub_documents(name: str, limit: int) -> list[str]:
    """The first `limit` documents of a hub data set's train split, streamed (field `text`)."""
    import datasets

    require_hub(f"the corpus {name!r}")
    stream = datasets.load_dataset(name, split="train", streaming=True)
    return [row["text"] for _, row in zip(range(limit), stream) if row.get("text")]


class LMExperiment:
    """Chapter 3 as a few calls: `warm_start()`, `evaluate(name, model)`, `train(run)`, `summarize()`."""

    def __init__(self, cfg: LMExperimentConfig) -> None:
        self.cfg = cfg
        self.record = RunRecord("ch3", cfg.profile, asdict(cfg))
        self.record["reference"] = {"citation": "distilpythia2023", "card_table": CARD_TABLE}
        self.timings: dict[str, float] = {}
        self.teacher, self.tokenizer = load_pretrained(cfg.teacher, AutoModelForCausalLM)
        self.teacher.eval().requires_grad_(False)
        self.tokenizer.model_max_length = max(cfg.max_length, 2048)
        self.eos = self.tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError(
                f"teacher {cfg.teacher!r}: its tokenizer has no EOS token to separate packed documents."
            )
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self._load_text()
        self.student_base: torch.nn.Module | None = None
        self.models: dict[str, torch.nn.Module] = {}
        self.cache = TeacherOutputCache()

    # --- data ---------------------------------------------------------------------------

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        with quiet_transformers():  # long documents are cut into rows later, not by the tokenizer
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [ids for ids in encoded if ids]

    def _load_text(self) -> None:
        cfg = self.cfg
        train_docs: list[str] = []
        heldout_docs: list[str] = []
        for i, corpus in enumerate(cfg.corpus):
            if corpus in LM_FILES:
                docs = load_lm_documents(corpus, cfg.data_dir or None)
            else:
                wanted = cfg.steps * cfg.batch_size * cfg.gradient_accumulation_steps
                docs = _hub_documents(corpus, 2 * wanted)
            if i == 0 and cfg.heldout_articles:
                if len(docs) <= cfg.heldout_articles:
                    raise DataError(
                        f"heldout_articles = {cfg.heldout_articles}: {corpus} has only {len(docs)} articles."
                    )
                heldout_docs = docs[-cfg.heldout_articles :]
                docs = docs[: -cfg.heldout_articles]
            if corpus.startswith("wikitext"):  # an article's paragraphs (lines) are its documents
                docs = [line.strip() for doc in docs for line in doc.split("\n") if _is_paragraph(line)]
            train_docs += docs
        train_tokens = self._tokens(train_docs)
        self.rows = {
            "padded": pad_truncate(train_tokens, cfg.max_length),
            "packed": pack(train_tokens, cfg.max_length, self.eos),
        }
        if heldout_docs:
            heldout = pack(self._tokens(heldout_docs), cfg.max_length, self.eos)
        else:  # no held-out articles: the packed stream's last blocks, removed from training
            heldout = self.rows["packed"][-cfg.heldout_blocks :]
            self.rows["packed"] = self.rows["packed"][: -cfg.heldout_blocks]
        self.heldout = heldout[: cfg.heldout_blocks]
        self.record["data"] = {
            "corpus": cfg.corpus,
            "train_documents": len(train_tokens),
            "train_tokens": sum(len(t) for t in train_tokens),
            "padded_rows": len(self.rows["padded"]),
            "padded_mean_length": float(np.mean([len(r) for r in self.rows["padded"]])),
            "padded_truncated_share": float(np.mean([len(t) > cfg.max_length for t in train_tokens])),
            "packed_rows": len(self.rows["packed"]),
            "heldout_blocks": len(self.heldout),
            "heldout_tokens": sum(len(r) for r in self.heldout),
            "rows_per_run": cfg.steps * cfg.batch_size * cfg.gradient_accumulation_steps,
        }
        wanted = cfg.steps * cfg.batch_size * cfg.gradient_accumulation_steps
        for layout, rows in list(self.rows.items()):  # the rows a run sees: one seeded draw per layout
            if len(rows) < wanted:
                raise DataError(
                    f"{layout} data has {len(rows)} rows; steps x batch_size x gradient_accumulation_steps "
                    f"= {wanted}: use more text or fewer steps."
                )
            order = np.random.default_rng(cfg.seed).permutation(len(rows))[:wanted]
            self.rows[layout] = [rows[i] for i in sorted(order)]
        self.record["data"]["padded_tokens_seen"] = sum(len(r) for r in self.rows["padded"])
        self.record["data"]["packed_tokens_seen"] = sum(len(r) for r in self.rows["packed"])

    # --- models -------------------------------------------------------------------------

    def heldout_score(self, model: torch.nn.Module) -> dict[str, float]:
        return perplexity(model, self.heldout, batch_size=8, bf16=self.cfg.bf16)

    def warm_start(self) -> torch.nn.Module:
        """The student before training: a smaller pretrained model, or the teacher minus a middle block.

        With no `student`, each candidate depth is scored on the held-out text and the chosen
        `student_layers` kept; the table goes into the record.
        """
        cfg = self.cfg
        started = time.perf_counter()
        if cfg.student:
            student, tokenizer = load_pretrained(cfg.student, AutoModelForCausalLM)
            if tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(
                    f"student {cfg.student!r} and teacher {cfg.teacher!r} have different vocabularies: "
                    "token-level distillation needs a student that shares the teacher's tokenizer."
                )
            self.record["results"]["warm_start"] = {"student": cfg.student}
        else:
            depth = len(layer_stack(self.teacher))
            table = {}
            for keep in sorted({*cfg.warm_start_candidates, cfg.student_layers}, reverse=True):
                candidate = keep_layers(
                    self.teacher, middle_block(depth, keep, "student_layers"), "student_layers"
                )
                score = self.heldout_score(candidate)
                table[str(keep)] = {
                    "layers": keep,
                    "dropped": depth - keep,
                    "perplexity": score["perplexity"],
                    "parameters_m": sum(p.numel() for p in candidate.parameters()) / 1e6,
                }
                if keep == cfg.student_layers:
                    student = candidate
            self.record["results"]["warm_start"] = {
                "teacher_layers": depth,
                "kept": middle_block(depth, cfg.student_layers),
                "candidates": table,
            }
        student.eval().requires_grad_(False)
        self.student_base = student
        self.timings["warm_start_s"] = time.perf_counter() - started
        return student

    def _heal_rows(self) -> list[list[int]]:
        """heal_steps x heal_batch_size packed rows of the healing text, one seeded draw."""
        cfg = self.cfg
        docs = [doc for corpus in cfg.heal_corpus for doc in load_lm_documents(corpus, cfg.data_dir or None)]
        rows = pack(self._tokens(docs), cfg.max_length, self.eos)
        wanted = cfg.heal_steps * cfg.heal_batch_size
        if len(rows) < wanted:
            raise DataError(
                f"heal_corpus {cfg.heal_corpus} makes {len(rows)} rows of {cfg.max_length} tokens; "
                f"heal_steps x heal_batch_size = {wanted}: name more text or take fewer steps."
            )
        order = np.random.default_rng(cfg.seed).permutation(len(rows))[:wanted]
        self.record["data"]["heal"] = {
            "corpus": cfg.heal_corpus,
            "documents": len(docs),
            "rows_available": len(rows),
            "rows_seen": wanted,
            "tokens_seen": wanted * cfg.max_length,
        }
        return [rows[i] for i in order]

    def heal(self) -> torch.nn.Module:
        """The student base trained with the next-token loss alone on `heal_corpus` (cosine
        schedule, 5% warm-up), its held-out perplexity every `heal_curve_every` steps; loaded
        from the cache when the same base, rows and settings were healed before."""
        cfg = self.cfg
        if self.student_base is None:
            raise RuntimeError("call warm_start() before heal().")
        if not cfg.heal_steps:
            return self.student_base
        started = time.perf_counter()
        rows = self._heal_rows()
        settings = [
            "heal_steps", "heal_batch_size", "heal_learning_rate", "heal_curve_every", "freeze_embeddings",
            "bf16", "seed",
        ]  # fmt: skip
        key = cache_key(
            student=model_fingerprint(self.student_base),
            rows=sequences_fingerprint(rows),
            heldout=sequences_fingerprint(self.heldout),
            versions=[torch.__version__, transformers.__version__],
            **{name: getattr(cfg, name) for name in settings},
        )
        store = TeacherOutputCache(cache_dir() / "healed-students")
        healed = copy.deepcopy(self.student_base)
        found = store.load(key)
        cache_hit = found is not None
        if found is None:
            found = self._heal_training(healed, rows)
            found["train_seconds"] = np.array([time.perf_counter() - started])
            store.store(key, found)
        else:
            weights = {k.removeprefix("weight."): v for k, v in found.items() if k.startswith("weight.")}
            healed.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        points = [
            {"step": int(step), "perplexity": float(ppl)}
            for step, ppl in zip(found["curve_step"], found["curve_perplexity"])
        ]
        self.record["results"]["heal"] = {
            "steps": cfg.heal_steps,
            "curve": points,
            "loss": [{"step": int(a), "loss": float(b)} for a, b in zip(found["loss_step"], found["loss"])],
            "tail_drop": relative_tail_drop(points),
            "train_seconds": round(float(found["train_seconds"][0]), 1),
            "cache_hit": cache_hit,
            "cache_key": key,
        }
        healed.eval().requires_grad_(False)
        self.student_base = healed
        self.timings["heal_s"] = time.perf_counter() - started
        return healed

    def _heal_training(self, model: torch.nn.Module, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """Train `model` in place on `rows` (next-token loss alone); its weights and curves as arrays."""
        cfg = self.cfg
        curve = PerplexityCurve(self.heldout, cfg.heal_curve_every or cfg.heal_steps, bf16=cfg.bf16)
        model.requires_grad_(True)
        if cfg.freeze_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        trainer = self._trainer(
            model,
            _lm_dataset(rows),
            "heal",
            steps=cfg.heal_steps,
            batch_size=cfg.heal_batch_size,
            gradient_accumulation_steps=1,
            learning_rate=cfg.heal_learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            callbacks=[curve],
        )
        trainer.train()
        losses = [entry for entry in trainer.state.log_history if "loss" in entry]
        arrays = {f"weight.{k}": v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        return arrays | {
            "curve_step": np.array([p["step"] for p in curve.points], dtype=np.int64),
            "curve_perplexity": np.array([p["perplexity"] for p in curve.points]),
            "loss_step": np.array([entry["step"] for entry in losses], dtype=np.int64),
            "loss": np.array([entry["loss"] for entry in losses]),
        }

    def evaluate(self, name: str, model: torch.nn.Module) -> dict[str, Any]:
        """Held-out perplexity and entropy, and the zero-shot scores, recorded under `name`."""
        cfg = self.cfg
        started = time.perf_counter()
        entry: dict[str, Any] = {"heldout": self.heldout_score(model)}
        entry["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        if cfg.zero_shot_tasks:
            scores = {}
            others = [t for t in cfg.zero_shot_tasks if t != "lambada"]
            if others and cfg.zero_shot_examples:
                scores |= evaluate_zero_shot(
                    model,
                    self.tokenizer,
                    others,
                    cfg.zero_shot_examples,
                    cfg.seed,
                    bf16=cfg.bf16,
                    data_dir=cfg.data_dir or None,
                )
            if "lambada" in cfg.zero_shot_tasks and cfg.lambada_examples:
                lambada = evaluate_zero_shot(
                    model,
                    self.tokenizer,
                    ["lambada"],
                    cfg.lambada_examples,
                    cfg.seed,
                    bf16=cfg.bf16,
                    data_dir=cfg.data_dir or None,
                    examples=True,
                )["lambada"]
                passages = sorted(lambada.pop("examples"), key=lambda e: e["doc_id"])
                lambada["doc_ids"] = [e["doc_id"] for e in passages]  # the same for every model
                lambada["loglikelihoods"] = [e["loglikelihoods"][0] for e in passages]
                scores["lambada"] = lambada
            entry["zero_shot"] = scores
        entry["seconds"] = round(time.perf_counter() - started, 1)
        self.record["results"].setdefault("models", {})[name] = entry
        return entry

    def topk_fidelity(self) -> dict[str, Any]:
        """How much of the teacher's tempered distribution a top-k cache keeps, on held-out text.

        Per k: the teacher's probability mass in its top k, and the top-k + rest loss of the
        student base as a fraction of its full-vocabulary forward KL (a lower bound: 1 = exact).
        """
        cfg = self.cfg
        rows = torch.tensor(self.heldout[: min(16, len(self.heldout))])
        temperatures = sorted({cfg.temperature, 1.0})
        with torch.inference_mode(), bf16_autocast(cfg.bf16):
            teacher = self.teacher(input_ids=rows).logits.float()
            student = self.student_base(input_ids=rows).logits.float()
        out: dict[str, Any] = {}
        vocab = teacher.shape[-1]
        for t in temperatures:
            full = float(token_divergence(student, teacher, t))
            per_k = {}
            for k in [k for k in cfg.topk_probe if k < vocab]:
                indices, log_p = topk_teacher(teacher, k, t)
                per_k[str(k)] = {
                    "mass": float(log_p.exp().sum(-1).mean()),
                    "kl_share": float(topk_forward_kl(student, indices, log_p, t)) / full,
                }
            out[f"T={t:g}"] = {"full_kl": full, "topk": per_k}
        out["bytes_per_token"] = {"full_fp16": 2 * vocab, f"top{cfg.topk}": 6 * cfg.topk}
        self.record["results"]["topk_fidelity"] = out
        return out

    # --- training -----------------------------------------------------------------------

    def _dataset(self, run: str) -> tuple[FeatureDataset, dict[str, Any]]:
        spec = RUNS[run]
        rows = self.rows[spec.data]
        info: dict[str, Any] = {}
        extra = None
        if spec.topk:
            started = time.perf_counter()
            arrays, hit = cached_topk(
                self.teacher,
                rows,
                self.cfg.topk,
                self.cfg.temperature_of(run),
                self.cache,
                bf16=self.cfg.bf16,
            )
            extra = {TOPK_FIELDS[0]: arrays["indices"], TOPK_FIELDS[1]: arrays["logprobs"]}
            info = {
                "cache_hit": hit,
                "cache_seconds": round(time.perf_counter() - started, 1),
                "cache_mb": (arrays["indices"].values.nbytes + arrays["logprobs"].values.nbytes) / 2**20,
            }
        return _lm_dataset(rows, extra), info

    def _trainer(
        self,
        student: torch.nn.Module,
        dataset: FeatureDataset,
        name: str,
        *,
        steps: int,
        batch_size: int,
        gradient_accumulation_steps: int,
        learning_rate: float,
        lr_scheduler_type: str,
        warmup_steps: float = 0.0,
        alpha_ce: float = 0.0,
        alpha_task: float = 1.0,
        temperature: float = 1.0,
        teacher: torch.nn.Module | None = None,
        callbacks: list[Any] | None = None,
    ) -> LMDistillationTrainer:
        """A trainer for `student` (`alpha_ce` = 0: the next-token loss alone, no teacher)."""
        cfg = self.cfg
        transformers.set_seed(cfg.seed)
        args = quiet_arguments(
            LMDistillationArguments,
            output_dir=str(Path(cfg.output_dir) / "runs" / name),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=learning_rate,
            lr_scheduler_type=lr_scheduler_type,
            warmup_steps=warmup_steps,
            max_steps=steps,
            logging_steps=max(1, steps // 15),
            seed=cfg.seed,
            bf16=cfg.bf16,
            alpha_ce=alpha_ce,
            alpha_task=alpha_task,
            temperature=temperature,
            divergence=cfg.divergence,
            use_cpu=not torch.cuda.is_available(),
        )
        return LMDistillationTrainer(
            model=student,
            args=args,
            train_dataset=dataset,
            data_collator=PadCollator(self.pad, {"labels": -100, "attention_mask": 0}),
            teacher_model=teacher,
            callbacks=callbacks,
        )

    def train(self, run: str) -> dict[str, Any]:
        """Train a copy of the student base as `run` describes; its curve, timings and scores."""
        cfg = self.cfg
        spec = RUNS[run]
        if self.student_base is None:
            raise RuntimeError("call warm_start() before train().")
        started = time.perf_counter()
        dataset, info = self._dataset(run)
        student = copy.deepcopy(self.student_base).requires_grad_(True)
        if cfg.freeze_embeddings:
            student.get_input_embeddings().requires_grad_(False)
        trainer = self._trainer(
            student,
            dataset,
            run,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            alpha_ce=(1.0 - cfg.alpha_clm) if spec.distil else 0.0,
            alpha_task=cfg.alpha_clm if spec.distil else 1.0,
            temperature=cfg.temperature_of(run),
            teacher=self.teacher if spec.distil and not spec.topk else None,
        )
        trainer.train()
        train_seconds = time.perf_counter() - started
        student.eval().requires_grad_(False)
        curve = [entry for entry in trainer.state.log_history if "loss" in entry]
        entry = self.evaluate(run, student)
        entry |= {
            "curve": curve,
            "train_seconds": round(train_seconds, 1),
            "description": spec.description,
            "temperature": cfg.temperature_of(run) if spec.distil else None,
            **info,
        }
        self.models[run] = student
        return entry

    # --- verdicts -----------------------------------------------------------------------

    def summarize(self) -> list[dict[str, Any]]:
        """The card's claims checked (`claim_verdicts`), the lambada causes weighed (`lambada_findings`)."""
        self.record["results"]["lambada_findings"] = lambada_findings(self.record["results"])
        self.record["claims"] = [
            claim_record(v["claim"], v["verdict"], measured=v["evidence"], paper=v["card"])
            for v in claim_verdicts(self.record["results"])
        ]
        return self.record["claims"]

    def write(self) -> Path:
        self.record["timings"] = {k: round(v, 1) for k, v in self.timings.items()}
        return self.record.write(Path(self.cfg.output_dir) / "metrics.json")


def _lm_dataset(rows: list[list[int]], extra: dict[str, Any] | None = None) -> FeatureDataset:
    """Token rows as a causal-LM dataset: the labels are the inputs (the loss shifts them)."""
    columns = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    return FeatureDataset(columns, extra)


def _task(models: dict[str, Any], name: str, task: str, metric: str) -> tuple[float, float] | None:
    scores = models.get(name, {}).get("zero_shot", {}).get(task)
    if not scores or metric not in scores:
        return None
    return scores[metric], scores.get(f"{metric}_stderr", 0.0)


def lambada_ratio(models: dict[str, Any], a: str, b: str) -> dict[str, float] | None:
    """Lambada perplexity of model `a` over model `b`, with a 95% interval from paired passages.

    lm-eval's lambada perplexity is exp(-mean log-likelihood of the last word), so the log of
    the ratio is the mean per-passage difference b - a; both models scored the same passages.
    """
    la = models.get(a, {}).get("zero_shot", {}).get("lambada")
    lb = models.get(b, {}).get("zero_shot", {}).get("lambada")
    if not la or not lb or la["doc_ids"] != lb["doc_ids"]:
        return None
    return paired_log_ratio(la["loglikelihoods"], lb["loglikelihoods"])


def heldout_ratio(models: dict[str, Any], a: str, b: str) -> dict[str, float] | None:
    """Held-out perplexity of model `a` over model `b`, with a 95% interval from paired blocks
    (each block's mean NLL, `kdlib.lm.perplexity`'s `row_nll`; packed blocks are of equal length,
    so the mean of the block means is the token mean)."""
    ra = models.get(a, {}).get("heldout", {}).get("row_nll")
    rb = models.get(b, {}).get("heldout", {}).get("row_nll")
    if not ra or not rb or len(ra) != len(rb):
        return None
    pairs = [(x, y) for x, y in zip(ra, rb) if x is not None and y is not None]
    return paired_log_ratio([-x for x, _ in pairs], [-y for _, y in pairs])


def check_record(record: dict[str, Any]) -> list[str]:
    """What is inconsistent in a chapter 3 record: every model its parameters name must have been
    scored, a healed base must carry its curve, and the claims must be what its models give."""
    params, results = record["parameters"], record["results"]
    models = results.get("models", {})
    problems = [
        f"model {name} was not scored"
        for name in ["student-base", "teacher", *params["runs"]]
        if name not in models
    ]
    if problems:
        return problems
    if params["heal_steps"] and not results.get("heal", {}).get("curve"):
        problems.append("heal_steps is set but the record has no healing curve")
    expected = [v["verdict"] for v in claim_verdicts(results)]
    if expected != [c["verdict"] for c in record.get("claims", [])]:
        problems.append("the claims are not what the models give")
    return problems


def _direction(ratio: dict[str, float]) -> str:
    return "higher" if ratio["low"] > 1 else "lower" if ratio["high"] < 1 else "no clear difference"


def _ratio_text(ratio: dict[str, float]) -> str:
    return f"{ratio['ratio']:.2f}x (95% interval {ratio['low']:.2f}-{ratio['high']:.2f})"


def claim_verdicts(results: dict[str, Any]) -> list[dict[str, str]]:
    """distilpythia's findings, each checked against this run's models.

    Accuracy differences count only beyond two standard errors of the difference; lambada
    perplexities are compared passage by passage (`lambada_ratio`). A claim whose models were
    not run is left out.
    """
    models = results.get("models", {})
    distilled = [n for n in ("kd-padded", "kd-packed") if n in models]
    verdicts = []
    if "student-base" in models and distilled:
        verdicts.append(no_better_than_base(models, distilled))
        rise = lambada_rise(models, distilled)
        if rise is not None:
            verdicts.append(rise)
    if {"kd-padded", "kd-packed"} <= set(models):
        verdicts.append(packed_no_better(models))
    return verdicts


def no_better_than_base(models: dict[str, Any], distilled: list[str]) -> dict[str, str]:
    """The card: the distilled student is no better than its base on any task."""
    better, worse, compared = [], [], 0
    for name in distilled:
        for task in models[name].get("zero_shot", {}):
            mine, theirs = _task(models, name, task, "acc"), _task(models, "student-base", task, "acc")
            if mine is None or theirs is None:
                continue
            compared += 1
            gap, se = mine[0] - theirs[0], math.hypot(mine[1], theirs[1])
            if abs(gap) > 2 * se:
                (better if gap > 0 else worse).append(f"{name}/{task}")
        ratio = lambada_ratio(models, name, "student-base")
        if ratio is not None:  # the card's lambada perplexity column, compared passage by passage
            compared += 1
            direction = _direction(ratio)
            if direction != "no clear difference":
                (better if direction == "lower" else worse).append(f"{name}/lambada perplexity")
    return {
        "claim": "the distilled student is no better than its base on the zero-shot tasks",
        "evidence": f"{len(better)} of {compared} task scores clearly better than the base's "
        f"({', '.join(better) or 'none'}), {len(worse)} clearly below",
        "verdict": "not reproduced" if better else "reproduced",
        "card": "piqa 59.74 vs 59.85, lambada acc 15.82 vs 21.40, sciq 61.30 vs 65.00",
    }


def lambada_rise(models: dict[str, Any], distilled: list[str]) -> dict[str, str] | None:
    """The card: distillation raised lambada perplexity (both layouts); None without lambada."""
    ratios = {n: lambada_ratio(models, n, "student-base") for n in distilled}
    if not all(ratios.values()):
        return None
    directions = {n: _direction(r) for n, r in ratios.items()}  # type: ignore[arg-type]
    verdict = (
        "reproduced"
        if all(d == "higher" for d in directions.values())
        else "not reproduced"
        if all(d == "lower" for d in directions.values())
        else "inconclusive"
    )
    return {
        "claim": "distillation raises the student's lambada perplexity",
        "evidence": "; ".join(f"{n}: {_ratio_text(r)} the base's" for n, r in ratios.items()),  # type: ignore[arg-type]
        "verdict": verdict,
        "card": "140.81 -> 420.70 (padded), 403.78 (packed)",
    }


def packed_no_better(models: dict[str, Any]) -> dict[str, str]:
    """The card: packed constant-length rows did no better than padded documents."""
    padded, packed = (models[n]["heldout"]["perplexity"] for n in ("kd-padded", "kd-packed"))
    ratio = lambada_ratio(models, "kd-packed", "kd-padded")
    return {
        "claim": "packed constant-length data is no better than padded/truncated documents",
        "evidence": f"held-out perplexity {packed:.1f} (packed) vs {padded:.1f} (padded)"
        + (f"; lambada, packed over padded: {_ratio_text(ratio)}" if ratio else ""),
        "verdict": "reproduced" if not ratio or _direction(ratio) != "lower" else "not reproduced",
        "card": "lambada perplexity 403.78 vs 420.70, piqa 59.30 vs 59.74",
    }


def lambada_findings(results: dict[str, Any]) -> list[dict[str, str]]:
    """Each suspected cause of distilpythia's lambada rise, against this run's own evidence."""
    models = results.get("models", {})
    found = []

    def add(cause: str, a: str, b: str, explain: str, supported_if: str) -> None:
        ratio = lambada_ratio(models, a, b)
        if ratio is None:
            found.append({"cause": cause, "evidence": f"needs runs {a} and {b}", "verdict": "not tested"})
            return
        direction = _direction(ratio)
        verdict = "supported" if direction == supported_if else "not supported"
        found.append(
            {
                "cause": cause,
                "evidence": f"lambada perplexity of {a} over {b}: {_ratio_text(ratio)}; {explain}",
                "verdict": verdict,
            }
        )

    add(
        "padding and truncation",
        "kd-padded",
        "kd-packed",
        "a padded run that hurt lambada more would point at the data layout",
        "higher",
    )
    add(
        "distillation itself, rather than more training",
        "kd-packed",
        "clm-packed",
        "the control trains on the same rows with the next-token loss alone",
        "higher",
    )
    add(
        "the temperature (T = 2 flattens the student)",
        "kd-packed",
        "kd-packed-t1",
        "the same run at T = 1",
        "higher",
    )
    if "kd-packed" in models and "clm-packed" in models:
        gaps = {
            n: models[n]["heldout"]["entropy"] - models[n]["heldout"]["nll"]
            for n in ("kd-packed", "clm-packed")
        }
        flatter = gaps["kd-packed"] - gaps["clm-packed"]
        found.append(
            {
                "cause": "a flatter (less confident) distilled student",
                "evidence": f"entropy minus NLL on held-out text: {gaps['kd-packed']:+.2f} nats distilled, "
                f"{gaps['clm-packed']:+.2f} control",
                "verdict": "supported" if flatter > 0.05 else "not supported",
            }
        )
    return found
