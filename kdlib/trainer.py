"""A `transformers.Trainer` that distils a frozen teacher into the model it trains.

Following TRL's trainers, the configuration extends `TrainingArguments` (so every Trainer
feature stays: evaluation during training, checkpoints and resume, torchrun/accelerate) and the
trainer overrides `compute_loss` and little else. The loss is DistilBERT's

    loss = alpha_ce * T^2 * KL(teacher_T || student_T) + alpha_task * L_task

with each term logged separately. Teacher logits come either from the batch (precomputed once
by `TeacherOutputCache`, fields named `teacher_<output>`) or from the teacher, run without
gradients on the same batch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase, PrinterCallback, Trainer, TrainingArguments

from kdlib.config import ConfigError, check_range
from kdlib.losses import mix_losses, soft_target_kl

TEACHER_PREFIX = "teacher_"
SPAN_LOGITS = ("start_logits", "end_logits")
_PROBE = "Distillation, 1984: Naïve teachers & their STUDENTS -- tokenised alike?"


@dataclass
class DistillationArguments(TrainingArguments):
    """`TrainingArguments` plus the distillation loss's three numbers."""

    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T (> 0) of the soft targets."}
    )
    alpha_ce: float = field(
        default=0.5, metadata={"help": "Weight in [0, 1] of the distillation (soft-target) term."}
    )
    alpha_task: float = field(
        default=0.5, metadata={"help": "Weight in [0, 1] of the task loss on the gold labels."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: cached teacher outputs are columns the model doesn't take."},
    )
    print_logs: bool = field(
        default=True,
        metadata={
            "help": "Print each log entry when progress bars are off (the Trainer's PrinterCallback); "
            "the entries stay in `state.log_history` either way."
        },
    )

    def __post_init__(self) -> None:
        self.check_distillation()  # before the Trainer's own set-up: bad values cost nothing
        super().__post_init__()

    def loss_weights(self) -> dict[str, float]:
        """Each loss term's weight, by the name of its parameter."""
        return {"alpha_ce": self.alpha_ce, "alpha_task": self.alpha_task}

    def check_distillation(self) -> None:
        check_range("temperature", self.temperature, low=0.0, low_inclusive=False)
        weights = self.loss_weights()
        for name, weight in weights.items():
            check_range(name, weight, low=0.0, high=1.0)
        if not any(weights.values()):
            raise ConfigError(f"{' and '.join(weights)} are all 0: at least one term must count.")


Arguments = TypeVar("Arguments", bound=DistillationArguments)


def quiet_arguments(cls: type[Arguments] = DistillationArguments, **kwargs: Any) -> Arguments:
    """Arguments for a run inside a notebook, a test or a benchmark: nothing printed or reported.

    No progress bars, no printed log lines (the losses stay in `state.log_history`), no report
    integrations, no checkpoints, and pinned host memory only where a GPU would read it. Any
    of these can still be set through `kwargs`.
    """
    defaults: dict[str, Any] = {
        "disable_tqdm": True,
        "print_logs": False,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    return cls(**{**defaults, **kwargs})


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for the loss sums where the device has it (Apple's MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


class LossNotFiniteError(FloatingPointError):
    """A loss term became NaN or infinite; training stops at the next logging step (or the end),
    naming the term and the step where it first appeared."""


def check_same_tokenization(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless both tokenizers map text to the same ids.

    Logit distillation compares outputs position by position: it is meaningless if the two
    models saw different token sequences.
    """
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        raise ValueError(
            "teacher and student tokenizers differ: vocabularies of "
            f"{len(t_vocab)} and {len(s_vocab)} tokens (only in teacher: {only_t}; only in "
            f"student: {only_s}). Choose a student that shares the teacher's tokenizer."
        )
    words = [w for w, _ in sorted(t_vocab.items(), key=lambda item: item[1]) if w.isalpha()]
    sample = words[:: max(1, len(words) // 64)][:64]
    probe = " ".join([_PROBE, *(w.title() for w in sample)])  # casing and word pieces show here
    t_ids, s_ids = teacher(probe)["input_ids"], student(probe)["input_ids"]
    if t_ids != s_ids:
        raise ValueError(
            "teacher and student tokenizers share a vocabulary but tokenise differently "
            f"(a probe text gives {t_ids[:12]}... vs {s_ids[:12]}...): check lower-casing, accents "
            "and special tokens."
        )


@functools.lru_cache(maxsize=32)
def _accepted_inputs(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


LABEL_NAMES = frozenset({"labels", "start_positions", "end_positions"})


def check_aligned_tokenization(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, texts: list[str]
) -> None:
    """Raise ValueError unless both tokenizers cut every text into the same tokens.

    Layer losses compare hidden states position by position: that needs the same word pieces
    at the same positions, though ids and special-token names may differ (MPNet's `<s>` is
    BERT's `[CLS]`, its ids are BERT's plus four).
    """
    t_special, s_special = set(teacher.all_special_tokens), set(student.all_special_tokens)
    for text in texts:
        t_tokens = teacher.convert_ids_to_tokens(teacher(text)["input_ids"])
        s_tokens = student.convert_ids_to_tokens(student(text)["input_ids"])
        same = len(t_tokens) == len(s_tokens) and all(
            (a in t_special) == (b in s_special) and (a in t_special or a == b)
            for a, b in zip(t_tokens, s_tokens)
        )
        if not same:
            raise ValueError(
                f"teacher and student tokenise {text[:60]!r} differently ({t_tokens[:10]}... vs "
                f"{s_tokens[:10]}...): layer distillation needs the same tokens at the same positions."
            )


def forward_inputs(model: torch.nn.Module, inputs: dict[str, Any], *, labels: bool) -> dict[str, Any]:
    """The entries of `inputs` that `model.forward` accepts (labels only if `labels`).

    Wrappers such as DistributedDataParallel take `*args, **kwargs`: the wrapped model's own
    signature decides.
    """
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    accepted = _accepted_inputs(type(model))
    label_names = LABEL_NAMES
    return {
        k: v
        for k, v in inputs.items()
        if k in accepted and (labels or k not in label_names) and not k.startswith(TEACHER_PREFIX)
    }


class DistillationTrainer(Trainer):
    """Trains `model` (the student) with a soft-target term from `teacher_model`.

    Pass `teacher_tokenizer` with `processing_class` to have their tokenisation checked up
    front. Without a teacher, every batch must carry `teacher_<output>` logits.
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: torch.nn.Module | None = None,
        teacher_tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DistillationArguments):
            raise TypeError("DistillationTrainer needs DistillationArguments as `args`.")
        # `compute_loss` returns each batch's mean, never a sum over `num_items_in_batch`: the
        # Trainer must divide by the accumulation steps itself, which it skips for a model whose
        # forward takes loss arguments (Llama's, BERT's) unless told the loss is not normalised
        self.model_accepts_loss_kwargs = False
        if not self.args.print_logs:
            self.remove_callback(PrinterCallback)
        if teacher_tokenizer is not None and self.processing_class is not None:
            check_same_tokenization(teacher_tokenizer, self.processing_class)
        self.teacher = teacher_model
        if teacher_model is not None:
            t_vocab = getattr(teacher_model.config, "vocab_size", None)
            s_vocab = getattr(self.model.config, "vocab_size", None)
            if t_vocab != s_vocab:
                raise ValueError(
                    f"teacher vocab_size {t_vocab} != student vocab_size {s_vocab}: the two "
                    "models cannot read the same input ids."
                )
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            self.teacher = teacher_model.to(self.args.device)
        # each term's running sum and its first non-finite step (0: none yet) and value, kept on
        # the device: reading a number to the host every step would stall a GPU each step
        self._terms: dict[str, torch.Tensor] = {}
        self._nonfinite: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._term_batches = 0

    def _get_eval_sampler(self, eval_dataset: Any) -> torch.utils.data.Sampler | None:
        """Evaluation keeps the dataset's order, even when training groups by length.

        Metrics such as SQuAD's map each prediction back to its row by position; the Trainer
        would otherwise evaluate in length-grouped, shuffled order.
        """
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        if eval_dataset is None or not hasattr(eval_dataset, "__len__") or self.args.world_size > 1:
            return None  # distributed: accelerate shards the dataset in order
        return torch.utils.data.SequentialSampler(eval_dataset)

    def teacher_logits(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The teacher's logits for this batch: cached in the batch, else computed now."""
        cached = {
            k[len(TEACHER_PREFIX) :]: v
            for k, v in inputs.items()
            if k.startswith(TEACHER_PREFIX) and k.endswith("logits")
        }
        if cached:
            return cached
        if self.teacher is None:
            raise ValueError("no teacher_model was given and the batch carries no teacher_<output> logits.")
        # the student's forward runs under the accelerator's mixed precision (bf16/fp16): the
        # teacher's must too, or a bf16 run pays for a full-precision teacher on every step
        with torch.no_grad(), self.accelerator.autocast():
            outputs = self.teacher(**forward_inputs(self.teacher, inputs, labels=False))
        return {k: v for k, v in outputs.items() if k.endswith("logits")}

    def distillation_loss(
        self, student_outputs: Any, teacher: dict[str, torch.Tensor], inputs: dict[str, Any]
    ) -> torch.Tensor:
        """Mean soft-target KL over the model's logit outputs, padding excluded.

        QA span logits are distributions over positions: padding positions are removed from
        the distribution. Token-level logits `[batch, seq, vocab]` are one distribution per
        token: padding tokens are removed from the mean. Sentence logits need no mask.
        """
        keys = [k for k in SPAN_LOGITS if k in student_outputs] or ["logits"]
        attention = inputs.get("attention_mask")
        losses = []
        for key in keys:
            student = student_outputs[key]
            target = teacher[key].to(student.device)
            kwargs: dict[str, torch.Tensor] = {}
            if attention is not None and key in SPAN_LOGITS:
                kwargs["class_mask"] = attention.bool()
            elif attention is not None and student.dim() == 3:
                kwargs["mask"] = attention.bool()
            losses.append(soft_target_kl(student, target, self.args.temperature, **kwargs))
        return torch.stack(losses).mean()

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        args: DistillationArguments = self.args  # type: ignore[assignment]
        outputs = model(**forward_inputs(model, inputs, labels=True), **self.forward_kwargs())
        zero = torch.zeros((), device=args.device)
        task = outputs.loss if outputs.loss is not None else zero
        kd = zero
        if args.alpha_ce > 0:
            kd = self.distillation_loss(outputs, self.teacher_logits(inputs), inputs)
        loss = mix_losses(kd, task, args.alpha_ce, args.alpha_task)
        terms = {"kd": kd} if args.alpha_ce > 0 else {}
        if args.alpha_task > 0:
            terms["task"] = task
        for name, (weight, value) in self.extra_losses(outputs, inputs).items():
            loss = loss + weight * value
            terms[name] = value
        if model.training:
            self._record(**terms, total=loss)
        return (loss, outputs) if return_outputs else loss

    def forward_kwargs(self) -> dict[str, Any]:
        """Extra arguments for the student's forward pass (a subclass may need hidden states)."""
        return {}

    def extra_losses(
        self, student_outputs: Any, inputs: dict[str, Any]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Further weighted terms, name -> (weight, value), added to the loss and logged."""
        return {}

    def _record(self, **terms: torch.Tensor) -> None:
        """Add this step's terms to their sums and note the first non-finite one, all on the device.

        Nothing is read back here: `log` checks finiteness and reads the sums once per logging
        step, so a NaN stops training at the next logging step (or the end), naming the step
        where it first appeared.
        """
        step = self.state.global_step + 1
        for name, value in terms.items():
            value = value.detach().to(_sum_dtype(value.device))
            at, seen = self._nonfinite.get(name) or (torch.zeros_like(value, dtype=torch.long), value)
            first = ~torch.isfinite(value) & (at == 0)
            self._nonfinite[name] = (torch.where(first, step, at), torch.where(first, value, seen))
            if name != "total":
                self._terms[name] = self._terms[name] + value if name in self._terms else value
        self._term_batches += 1

    def check_finite(self) -> None:
        """Raise LossNotFiniteError for the earliest non-finite loss term recorded so far."""
        if not self._nonfinite:
            return
        names = list(self._nonfinite)
        steps = torch.stack([at for at, _ in self._nonfinite.values()]).tolist()
        bad = [(at, name) for at, name in zip(steps, names) if at > 0]
        if bad:
            at, name = min(bad)
            value = float(self._nonfinite[name][1])
            raise LossNotFiniteError(
                f"loss term {name!r} is {value} at step {at} (found at step "
                f"{self.state.global_step}): lower the learning rate or temperature, or check the "
                "inputs of that batch."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.check_finite()
        if "loss" in logs and self._terms:
            names = sorted(self._terms)
            sums = torch.stack([self._terms[n] for n in names])
            batches = torch.tensor([self._term_batches], dtype=sums.dtype, device=sums.device)
            totals = torch.cat([sums, batches])
            if self.args.world_size > 1:  # every process logs; report the terms over all of them
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum")
            totals = totals.cpu().double()
            for name, total in zip(names, totals[:-1].tolist()):
                logs[f"loss_{name}"] = round(total / float(totals[-1]), 6)
            self._terms.clear()
            self._term_batches = 0
        super().log(logs, start_time)
