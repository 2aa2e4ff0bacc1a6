"""Shared fixtures: tiny models built from configs, and a tokenizer that needs no files."""

from __future__ import annotations

import os

import pytest
import torch

from kdlib.runtime import keep_freed_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)
keep_freed_memory()  # as the book and the benchmark run: see kdlib.runtime

WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the a an of in was is who what when where did born city paris france "
    "london england river flows through capital year 1889 tower built eiffel gustave by".split()
)


def make_tokenizer(words=WORDS):
    """A real BERT WordPiece tokenizer over a small vocabulary (fast, offline)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


def tiny_bert_config(vocab_size: int = len(WORDS), layers: int = 2, hidden: int = 16):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )


def tiny_llama(layers: int = 1, vocab: int = 40, seed: int = 0, hidden: int = 16, positions: int = 64):
    """A seeded Llama causal LM small enough to train in milliseconds (grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=positions,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_qa_pair():
    """(teacher, student): BERT QA models of 2 and 1 layers, seeded."""
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    teacher = BertForQuestionAnswering(tiny_bert_config(layers=2))
    student = BertForQuestionAnswering(tiny_bert_config(layers=1))
    return teacher, student
