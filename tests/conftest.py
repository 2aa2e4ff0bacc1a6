"""Shared fixtures: tiny models built from configs, and a tokenizer that needs no files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kdlib.runtime import freeze_imported_objects, keep_freed_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two pytest-xdist workers on this 2-core machine: each worker, and every
# process it starts (the smoke book's kernels, the CLI runs), then computes on one thread. Two
# processes of two threads each on two cores spin against each other: a first try ran the
# suite several times slower than one process alone. A plain `pytest` run keeps two threads.
UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ
if UNDER_XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if UNDER_XDIST else 2)
keep_freed_memory()  # as the book and the benchmark run: see kdlib.runtime


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every test module is imported now: freeze what the imports made, as the book's kernels
    do (`bookrun.kernel`), so that each of the tests' Trainer runs does not walk it again."""
    freeze_imported_objects("kdlib.trainer")


@pytest.fixture(scope="session")
def shared_data():
    """The data mirror and the fine-tuned teachers (../shared): skip without them, fail in CI."""
    missing = [v for v in ("KDLIB_DATA_DIR", "KDLIB_MODELS_DIR") if not os.environ.get(v)]
    if missing:
        reason = f"{missing} not set: the chapters read the data mirror and fine-tuned teachers"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that read the smoke book go first, as one pytest-xdist group (`--dist
    loadgroup`): one worker builds the book once, the longest chain of the run, while the other
    takes the remaining tests beside it, the slow ones first. pytest-xdist hands each worker its
    next test when it has two or fewer left, so the unit tests (a second or less each) fill in
    at the end, and no worker finishes with a long test while the other waits."""
    smoke = {id(item) for item in items if "smoke_book" in getattr(item, "fixturenames", ())}
    for item in items:
        if id(item) in smoke:
            item.add_marker(pytest.mark.xdist_group("smoke_book"))
    # stable: each part keeps its order
    items.sort(key=lambda item: (id(item) not in smoke, item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session")
def smoke_book(shared_data, tmp_path_factory):
    """The whole book built once at the smoke profile, as `make book PROFILE=smoke` builds it:
    its build folder (each chapter's metrics.json under outputs/smoke/<chapter>, the HTML under
    site). The chapter tests read the records, the page tests the pages."""
    build = tmp_path_factory.mktemp("build")
    result = subprocess.run(
        [sys.executable, "-m", "bookrun", "build", "--profile", "smoke"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, BOOKRUN_BUILD_DIR=str(build)),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return build


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
