"""Module replacement (BERT-of-Theseus): compress an encoder by training small successor modules
in place of groups of its layers.

Xu et al. (2020) split a fine-tuned predecessor's L layers into n equal groups and give each
group one successor layer. While training, each group's output comes from its successor with
probability p (constant, or rising as min(k*t + b, 1)) and from the frozen predecessor layers
otherwise; afterwards the successors alone, with the predecessor's embeddings and head, are the
compressed model. A reproduction on CLUE iflytek found the coin flip unstable and replaced it by
a proportional add, x = k*x_predecessor + (1 - k)*x_successor, with constant k.

Only the encoder's layer list is swapped (for `ReplacedGroup`s): the model keeps its class and
forward, so the Trainer, losses and evaluation code see an ordinary model. `extract_successor`
and `first_layers` return plain models of the same class that save and load on their own.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from kdlib.config import ConfigError, check_range
from kdlib.stack import keep_layers, stack_owner, with_layers
from kdlib.trainer import DistillationTrainer

SUCCESSOR_INIT = ("first", "group-first", "group-last")
"""Which predecessor layer a successor starts from: layer i (the original's choice), or the
first or last layer of the group it replaces."""


@dataclass(frozen=True)
class BernoulliReplacement:
    """Each group uses its successor with probability min(replace_rate + linear_k * step, 1).

    `linear_k` = 0 is the paper's constant rate; > 0 its linear curriculum. A slope that reaches
    full replacement after one step is refused: the original code's defaults did exactly that,
    silently turning module replacement into plain fine-tuning of the successor.
    """

    replace_rate: float
    linear_k: float = 0.0

    def __post_init__(self) -> None:
        check_range("replace_rate", self.replace_rate, low=0.0, high=1.0, low_inclusive=False)
        check_range("linear_k", self.linear_k, low=0.0)
        if self.replace_rate < 1.0 and self.replace_rate + self.linear_k >= 1.0:
            raise ConfigError(
                f"replace_rate + linear_k = {self.replace_rate + self.linear_k:g} >= 1: every module "
                "is replaced from the second step on, which is plain fine-tuning of the successor. "
                "Choose linear_k well below 1 - replace_rate, e.g. (1 - replace_rate) / steps."
            )

    def rate(self, step: int) -> float:
        return min(1.0, self.replace_rate + self.linear_k * step)


@dataclass(frozen=True)
class ProportionalAdd:
    """Every group outputs k * predecessor + (1 - k) * successor; no randomness."""

    proportional_k: float

    def __post_init__(self) -> None:
        check_range("proportional_k", self.proportional_k, low=0.0, high=1.0, high_inclusive=False)


Policy = BernoulliReplacement | ProportionalAdd


@dataclass
class ReplacementState:
    """What every group of one model shares: the policy, the current step, and the tallies."""

    policy: Policy
    groups: int
    step: int = 0
    draws: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.draws = [0] * self.groups
        self.replaced = [0] * self.groups

    def replaced_fraction(self) -> list[float]:
        """Per group, the share of training forwards that ran its successor."""
        return [r / d if d else 0.0 for r, d in zip(self.replaced, self.draws)]


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ReplacedGroup(nn.Module):
    """A group of frozen predecessor layers and the successor layer that may stand in for it.

    Called like one encoder layer. In eval mode it is the successor alone: evaluating the
    wrapped model measures the compressed model.
    """

    def __init__(
        self, predecessors: Sequence[nn.Module], successor: nn.Module, index: int, state: ReplacementState
    ) -> None:
        super().__init__()
        self.predecessors = nn.ModuleList(predecessors)
        self.successor = successor
        self.index = index
        self.state = state

    def run_predecessors(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for layer in self.predecessors:
            hidden_states = _hidden(layer(hidden_states, *args, **kwargs))
        return hidden_states

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training:
            return _hidden(self.successor(hidden_states, *args, **kwargs))
        policy = self.state.policy
        if isinstance(policy, ProportionalAdd):
            k = policy.proportional_k
            predecessor = self.run_predecessors(hidden_states, *args, **kwargs)
            successor = _hidden(self.successor(hidden_states, *args, **kwargs))
            return k * predecessor + (1.0 - k) * successor
        replace = bool(torch.rand(()) < policy.rate(self.state.step))
        self.state.draws[self.index] += 1
        self.state.replaced[self.index] += int(replace)
        if replace:
            return _hidden(self.successor(hidden_states, *args, **kwargs))
        return self.run_predecessors(hidden_states, *args, **kwargs)


class ReplacementSchedule(TrainerCallback):
    """Tells the groups the Trainer's step, which the linear curriculum reads."""

    def __init__(self, state: ReplacementState) -> None:
        self.state = state

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.state.step = state.global_step


class TheseusTrainer(DistillationTrainer):
    """Trains the successors of a `build_theseus` model on the task loss.

    When every group keeps its predecessor (probability (1 - p)^n per step) nothing trainable
    is in the graph; the step still counts, with zero gradient, instead of failing backward.
    Such steps are counted in `idle_steps`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_steps = 0

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        if model.training and not loss.requires_grad:
            self.idle_steps += 1
            anchor = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + 0.0 * anchor.sum()
            result = (loss, result[1]) if isinstance(result, tuple) else loss
        return result


def encoder_of(model: nn.Module) -> nn.Module:
    """The module whose `layer` attribute is an encoder's stack of transformer layers."""
    owner, attr = stack_owner(model)
    if attr != "layer":
        raise TypeError(
            f"{type(model).__name__} is not an encoder with an `encoder.layer` stack; module "
            "replacement supports BERT-style encoders (BERT, MiniLM, MPNet, RoBERTa, ...)."
        )
    return owner


def build_theseus(
    model: nn.Module, successor_layers: int, policy: Policy, init: str = "first"
) -> ReplacementState:
    """Turn `model` (the fine-tuned predecessor) into predecessor + successors, in place.

    Everything the predecessor had is frozen, embeddings and task head included; only the new
    successor layers train. Returns the state the groups share (for `ReplacementSchedule` and
    the replacement tallies).
    """
    encoder = encoder_of(model)
    layers = list(encoder.layer)
    depth = len(layers)
    if isinstance(encoder.layer[0], ReplacedGroup):
        raise ValueError("the model already has successor modules; start again from the predecessor.")
    if not 1 <= successor_layers < depth or depth % successor_layers:
        divisors = [d for d in range(1, depth) if depth % d == 0]
        raise ConfigError(
            f"successor_layers = {successor_layers}: the predecessor's {depth} layers must split into "
            f"equal groups, one per successor layer; choose one of {divisors}."
        )
    if init not in SUCCESSOR_INIT:
        raise ConfigError(f"successor_init = {init!r}: choose one of {', '.join(SUCCESSOR_INIT)}.")
    size = depth // successor_layers
    model.requires_grad_(False)
    state = ReplacementState(policy, successor_layers)
    groups = []
    for g in range(successor_layers):
        source = {"first": g, "group-first": g * size, "group-last": g * size + size - 1}[init]
        successor = copy.deepcopy(layers[source]).requires_grad_(True)
        groups.append(ReplacedGroup(layers[g * size : (g + 1) * size], successor, g, state))
    encoder.layer = nn.ModuleList(groups)
    return state


def extract_successor(model: nn.Module) -> nn.Module:
    """The compressed model: the successors with the predecessor's embeddings and head."""
    groups = list(encoder_of(model).layer)
    if not all(isinstance(g, ReplacedGroup) for g in groups):
        raise ValueError("the model has no successor modules: build them with build_theseus first.")
    return with_layers(model, [g.successor for g in groups])


def first_layers(model: nn.Module, count: int) -> nn.Module:
    """The model cut to its first `count` layers (embeddings and head kept)."""
    depth = len(encoder_of(model).layer)
    if not 1 <= count <= depth:
        raise ConfigError(f"successor_layers = {count}: the model has {depth} layers; choose 1..{depth}.")
    return keep_layers(model, list(range(count)), "successor_layers")
