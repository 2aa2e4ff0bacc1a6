"""The stack of transformer layers inside a Hugging Face model: find it, cut it, rebuild it.

Encoders keep their layers in `<base>.encoder.layer` (BERT, MiniLM, MPNet, RoBERTa), decoders in
`<base>.layers` (Llama, SmolLM2, GPT-NeoX/Pythia). Compressing a model by keeping some of its
layers (a warm start, Theseus' successors, the first layers of an encoder) is the same
operation on both: a new model of the same class, every other weight copied, the chosen layers
as its stack, and the config and per-layer indices made to agree with the new depth.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn


def stack_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the layer list, its attribute name): (encoder, "layer") or (base, "layers")."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder, "layer"
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base, "layers"
    raise TypeError(
        f"{type(model).__name__} has neither an `encoder.layer` nor a `layers` stack; layer "
        "surgery supports BERT-style encoders and Llama/GPT-NeoX-style decoders."
    )


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's layers, in order."""
    owner, attr = stack_owner(model)
    return getattr(owner, attr)


def set_layer_stack(model: nn.Module, layers: nn.ModuleList) -> None:
    owner, attr = stack_owner(model)
    setattr(owner, attr, layers)


def with_layers(model: nn.Module, layers: Sequence[nn.Module]) -> nn.Module:
    """A new model of `model`'s class: copies of its weights, with copies of `layers` as its stack.

    The config's depth and each layer's `layer_idx` (which key/value caches index by) are
    renumbered to the new positions; the source model is left untouched.
    """
    stack = layer_stack(model)
    set_layer_stack(model, nn.ModuleList())  # keep the old stack out of the copy
    try:
        new = copy.deepcopy(model)
    finally:
        set_layer_stack(model, stack)
    copied = nn.ModuleList(copy.deepcopy(layer) for layer in layers)
    for position, layer in enumerate(copied):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    set_layer_stack(new, copied)
    new.config.num_hidden_layers = len(copied)
    return new.requires_grad_(True)


def check_layer_indices(indices: Sequence[int], depth: int, parameter: str = "keep_layers") -> None:
    """Refuse `indices` unless they are distinct, increasing layer indices of a `depth`-layer stack."""
    from kdlib.config import ConfigError

    if not indices or list(indices) != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= depth:
        raise ConfigError(
            f"{parameter} = {list(indices)}: give distinct, increasing layer indices in 0..{depth - 1}."
        )


def keep_layers(model: nn.Module, indices: Sequence[int], parameter: str = "keep_layers") -> nn.Module:
    """The model with only the layers at `indices` (distinct, increasing), everything else kept."""
    stack = layer_stack(model)
    check_layer_indices(indices, len(stack), parameter)
    return with_layers(model, [stack[i] for i in indices])


def middle_block(depth: int, keep: int, parameter: str = "keep") -> list[int]:
    """Indices that keep `keep` of `depth` layers by dropping one contiguous block in the middle.

    Of the layer subsets measured on SmolLM2 (every other layer, every third, first and last
    blocks), dropping a middle block damaged the model least: the first layers build the token
    representations and the last ones turn them into predictions.
    """
    from kdlib.config import ConfigError

    if not 1 <= keep <= depth:
        raise ConfigError(f"{parameter} = {keep}: keep between 1 and the model's {depth} layers.")
    drop = depth - keep
    start = (depth - drop) // 2
    return [i for i in range(depth) if not start <= i < start + drop]
