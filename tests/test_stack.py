"""Layer surgery on tiny encoders and decoders: the kept layers, renumbered, and nothing else changed."""

import pytest
import torch
from transformers import BertForSequenceClassification

from kdlib.config import ConfigError
from kdlib.stack import keep_layers, layer_stack, middle_block

from conftest import tiny_bert_config, tiny_llama


def llama(layers=4):
    return tiny_llama(layers=layers).eval()


def pythia(layers=4):
    """GPT-NeoX (pythia) keeps its stack in `gpt_neox.layers`, not `model.layers`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    return GPTNeoXForCausalLM(config).eval()


@pytest.mark.parametrize(
    "make", [llama, pythia, lambda: BertForSequenceClassification(tiny_bert_config(layers=4))]
)
def test_kept_layers_carry_their_weights_and_new_indices(make):
    model = make()
    small = keep_layers(model, [0, 3])
    assert small.config.num_hidden_layers == 2 and len(layer_stack(small)) == 2
    assert len(layer_stack(model)) == 4 and model.config.num_hidden_layers == 4  # source untouched
    for new, old in ((0, 0), (1, 3)):
        for (name, value), (_, source) in zip(
            layer_stack(small)[new].state_dict().items(), layer_stack(model)[old].state_dict().items()
        ):
            torch.testing.assert_close(value, source, msg=name)
    indices = [m.layer_idx for m in small.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(indices)) == [0, 1]


@pytest.mark.parametrize("make", [llama, pythia])
def test_a_cut_decoder_generates_the_same_with_and_without_its_cache(make):
    small = keep_layers(make(), [1, 3])  # a stale layer_idx would index the cache wrongly
    prompt = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        cached = small.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = small.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == plain.tolist()


def test_keeping_every_layer_changes_nothing():
    model = llama()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(keep_layers(model, [0, 1, 2, 3])(ids).logits, model(ids).logits)


@pytest.mark.parametrize("indices", [[], [2, 1], [0, 0], [-1, 2], [0, 4]])
def test_bad_layer_lists_are_refused(indices):
    with pytest.raises(ConfigError, match="keep_layers"):
        keep_layers(llama(), indices)


def test_middle_block_drops_one_contiguous_block_in_the_middle():
    assert middle_block(30, 24) == [*range(12), *range(18, 30)]  # layers 12-17 dropped
    assert middle_block(6, 3) == [0, 4, 5]  # drop 3: the block starts at (6 - 3) // 2
    assert middle_block(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="student_layers = 0"):
        middle_block(30, 0, "student_layers")
    with pytest.raises(ConfigError, match="keep = 31"):
        middle_block(30, 31)
