"""Intermediate-layer distillation on top of prediction distillation (CoFi / RAIL-KD).

    loss = layer_weight * sum_i MSE(h_t[T_i], W h_s[a(i)])  +  alpha_ce * L_KD  +  alpha_task * L_task

T is the set of teacher layers chosen at this step (fixed, evenly spaced, or drawn at random),
a(i) the student layer matched to teacher layer T_i (see `kdlib.alignment`), and W a learned
linear map from the student's width to the teacher's (CoFi's `layer_transformation`). CoFi's
recipe: layer_weight 0.9, alpha_ce 0.1 with T = 2, no hard-label term.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdlib.alignment import (
    MATCHINGS,
    SELECTIONS,
    align,
    aligned_loss,
    layer_loss_matrix,
    select_teacher_layers,
)
from kdlib.batching import RaggedArray
from kdlib.cache import TeacherOutputCache, cache_key, model_fingerprint, sequences_fingerprint
from kdlib.classification import forward_all
from kdlib.config import ConfigError, check_choice, check_range
from kdlib.trainer import TEACHER_PREFIX, DistillationArguments, DistillationTrainer, forward_inputs

PROJECTION = "kd_layer_projection"
HIDDEN_KEY = TEACHER_PREFIX + "hidden_states"


@dataclass
class LayerDistillationArguments(DistillationArguments):
    """`DistillationArguments` plus the layer loss: which teacher layers, matched how.

    The defaults are CoFi's recipe: layer loss 0.9, prediction distillation 0.1 at T = 2, no
    hard-label term, teacher layers evenly spaced (TinyBERT's [2, 5, 8, 11] for 12), ordered
    matching.
    """

    layer_weight: float = field(default=0.9, metadata={"help": "Weight in [0, 1] of the layer loss."})
    alpha_ce: float = field(
        default=0.1, metadata={"help": "Weight in [0, 1] of prediction distillation (CoFi: 0.1)."}
    )
    alpha_task: float = field(
        default=0.0, metadata={"help": "Weight in [0, 1] of the hard-label loss (CoFi: none)."}
    )
    selection: str = field(default="fixed", metadata={"help": f"Teacher-layer choice: {SELECTIONS}."})
    teacher_layers: list[int] | None = field(
        default=None, metadata={"help": "The layers for selection='fixed' (default: evenly spaced)."}
    )
    num_teacher_layers: int = field(default=4, metadata={"help": "How many teacher layers per step."})
    matching: str = field(default="ordered", metadata={"help": f"Student-layer matching: {MATCHINGS}."})
    layer_warmup: float = field(
        default=0.0,
        metadata={
            "help": "Share in [0, 1) of the training steps over which the layer weight rises linearly "
            "from 0 to layer_weight (0: constant, CoFi's recipe)."
        },
    )

    def loss_weights(self) -> dict[str, float]:
        return {"layer_weight": self.layer_weight, **super().loss_weights()}

    def check_distillation(self) -> None:
        super().check_distillation()
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("matching", self.matching, MATCHINGS)
        check_range("num_teacher_layers", self.num_teacher_layers, low=1)
        check_range("layer_warmup", self.layer_warmup, low=0.0, high=1.0, high_inclusive=False)
        if self.teacher_layers is not None and len(self.teacher_layers) != self.num_teacher_layers:
            raise ConfigError(
                f"teacher_layers = {self.teacher_layers} lists {len(self.teacher_layers)} layers but "
                f"num_teacher_layers = {self.num_teacher_layers}."
            )


def cached_teacher_states(
    teacher: torch.nn.Module, columns: dict[str, list], pad_token_id: int, cache: TeacherOutputCache
) -> dict[str, Any]:
    """The teacher's logits and every layer's hidden states on `columns`, computed once.

    Every layer is kept (float16, ragged by sentence length), so that strategies which draw
    their teacher layers at random can ask for any of them. Returns the two training columns
    `LayerDistillationTrainer` reads, `teacher_logits` and `teacher_hidden_states`, and the
    states' size in MB.
    """
    key = cache_key(
        kind="sequence-classification-hidden",
        teacher=model_fingerprint(teacher),
        inputs=sequences_fingerprint(columns["input_ids"]),
    )

    def compute() -> dict[str, np.ndarray]:
        out = forward_all(teacher, columns, pad_token_id, hidden=True)
        return {"logits": out["logits"], "hidden": out["hidden"].values, "offsets": out["hidden"].offsets}

    stored = cache.get_or_compute(key, compute)
    return {
        "teacher_logits": list(stored["logits"]),
        HIDDEN_KEY: RaggedArray(stored["hidden"], stored["offsets"]),
        "megabytes": stored["hidden"].nbytes / 2**20,
    }


def add_projection(student: torch.nn.Module, teacher_width: int) -> torch.nn.Linear:
    """Attach the learned student->teacher width map to the student, so the optimiser trains it."""
    projection = torch.nn.Linear(student.config.hidden_size, teacher_width)
    student.add_module(PROJECTION, projection)
    return projection


class LayerDistillationTrainer(DistillationTrainer):
    """DistillationTrainer plus the layer loss; records each step's layers and alignment.

    `existing_student_layers` (bool per student layer) removes pruned layers from matching.
    Teacher hidden states come from the batch (`teacher_hidden_states`: `[batch, seq, layers,
    width]`, one entry per transformer block, embeddings excluded) or from the teacher.
    """

    def __init__(self, *args: Any, existing_student_layers: torch.Tensor | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LayerDistillationArguments):
            raise TypeError("LayerDistillationTrainer needs LayerDistillationArguments as `args`.")
        if not hasattr(self.model, PROJECTION):
            raise ValueError(f"the student has no {PROJECTION}: call add_projection(student, teacher_width).")
        # a host list, read once here: `align` then reads nothing from the device to apply it
        existing = existing_student_layers
        self.existing = None if existing is None else [bool(x) for x in existing.tolist()]
        self.generator = torch.Generator().manual_seed(self.args.seed)
        # (step, teacher layers, alignment, loss matrix) per training step, the tensors left on
        # the device until `alignment_log` is read: a read every step would stall a GPU each step
        self._alignments: list[tuple[int, list[int], torch.Tensor, torch.Tensor]] = []
        self._alignment_log: list[dict[str, Any]] = []  # the entries read so far, as lists
        self._teacher_depth: int | None = None

    def teacher_hidden(self, inputs: dict[str, Any]) -> torch.Tensor:
        """`[batch, seq, layers, width]` teacher block outputs for this batch."""
        if HIDDEN_KEY in inputs:
            return inputs[HIDDEN_KEY]
        if self.teacher is None:
            raise ValueError("no teacher_model was given and the batch carries no teacher_hidden_states.")
        with torch.no_grad():
            out = self.teacher(
                **forward_inputs(self.teacher, inputs, labels=False), output_hidden_states=True
            )
        return torch.stack(out.hidden_states[1:], dim=2)

    def layer_loss(self, student_outputs: Any, inputs: dict[str, Any]) -> torch.Tensor:
        args: LayerDistillationArguments = self.args  # type: ignore[assignment]
        hidden = self.teacher_hidden(inputs)
        depth = hidden.shape[2]
        layers = select_teacher_layers(
            args.selection,
            depth,
            args.num_teacher_layers,
            fixed=args.teacher_layers,
            generator=self.generator,
        )
        model = self.accelerator.unwrap_model(self.model)
        projection = getattr(model, PROJECTION)
        student_states = [projection(h) for h in student_outputs.hidden_states[1:]]
        # the wider of the two dtypes, not the student's: a bfloat16 student (autocast) would
        # round a float16 cache to 3 mantissa bits fewer; float16 and bfloat16 promote to float32
        dtype = torch.promote_types(hidden.dtype, student_states[0].dtype)
        teacher_states = [hidden[:, :, layer].to(dtype) for layer in layers]
        matrix = layer_loss_matrix(teacher_states, student_states, inputs.get("attention_mask"))
        alignment = align(matrix.detach(), args.matching, self.existing)
        if self.model.training:
            self._alignments.append((self.state.global_step + 1, layers, alignment, matrix.detach()))
        return aligned_loss(matrix, alignment)

    @property
    def alignment_log(self) -> list[dict[str, Any]]:
        """Each training step's teacher layers, alignment and layer-loss matrix, as plain lists
        (the steps since the last read are brought to the host in one copy)."""
        new = self._alignments[len(self._alignment_log) :]
        if new:
            alignments = torch.stack([a.to(m.device) for _, _, a, m in new]).cpu().tolist()
            matrices = torch.stack([m for *_, m in new]).cpu().tolist()
            self._alignment_log += [
                {"step": step, "teacher_layers": layers, "alignment": alignment, "loss_matrix": matrix}
                for (step, layers, _, _), alignment, matrix in zip(new, alignments, matrices)
            ]
        return self._alignment_log

    def forward_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": True}

    def layer_weight_now(self) -> float:
        """The layer weight at this step: `layer_weight`, ramped up over `layer_warmup` of the steps.

        A student that does not know the task yet learns it from the prediction term alone; a
        warm-up lets it do so before the layer term, whose gradient can be far larger, takes over.
        """
        args: LayerDistillationArguments = self.args  # type: ignore[assignment]
        ramp = args.layer_warmup * max(self.state.max_steps, 1)
        if ramp <= 0:
            return args.layer_weight
        return args.layer_weight * min(1.0, (self.state.global_step + 1) / ramp)

    def extra_losses(
        self, student_outputs: Any, inputs: dict[str, Any]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        weight = self.layer_weight_now()
        return {"layer": (weight, self.layer_loss(student_outputs, inputs))} if weight > 0 else {}
