"""kdlib.zeroshot: lm-eval over local task files gives the scores computed here by hand.

A tiny Llama over a byte-level tokenizer (one token per byte, so contexts and continuations
split exactly where the text does) is scored by lm-evaluation-harness on small task files in
the data mirror's three formats; each accuracy and perplexity is recomputed from the model's
own log-probabilities.
"""

import json
import math
import subprocess

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kdlib.config import ConfigError
from kdlib.zeroshot import evaluate_zero_shot, task_config

from conftest import tiny_llama

pytest.importorskip("lm_eval")

CHOICE = [
    {
        "query": "Question: How do I dry wet shoes?\n",
        "choices": ["Stuff them with paper.", "Fill with water."],
        "gold": 0,
    },
    {"query": "Question: What opens a lock?\n", "choices": ["a key", "a spoon"], "gold": 0},
    {"query": "Question: Which is a fruit?\n", "choices": ["stone", "apple"], "gold": 1},
    {"query": "Question: Where do fish live?\n", "choices": ["water", "sky"], "gold": 0},
]
SCHEMA = [
    {
        "context_options": ["Ann beat Bo because Ann", "Ann beat Bo because Bo"],
        "continuation": "was faster.",
        "gold": 0,
    },
    {
        "context_options": [
            "The cup fell off the shelf so the cup",
            "The cup fell off the shelf so the shelf",
        ],
        "continuation": "broke.",
        "gold": 0,
    },
    {
        "context_options": ["Tim gave Al a gift since Tim", "Tim gave Al a gift since Al"],
        "continuation": "had a birthday.",
        "gold": 1,
    },
]
LAMBADA = [
    {"context": "She opened the door and saw her old friend. She hugged her", "continuation": "friend"},
    {"context": "The dog barked at the mailman, so the mailman ran from the", "continuation": "dog"},
    {"context": "He poured the coffee into a", "continuation": "cup"},
]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def lm():
    tokenizer = byte_tokenizer()
    return tiny_llama(layers=2, vocab=len(tokenizer), hidden=32, positions=256).eval(), tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    (root / "lmeval").mkdir()
    for stem, rows in [("piqa", CHOICE), ("winogrande", SCHEMA), ("lambada_openai", LAMBADA)]:
        (root / "lmeval" / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def loglikelihood(model, tokenizer, context, continuation):
    """Sum of log p(continuation tokens | context) and whether each was the greedy choice."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:][-len(cont) :]
    picked = log_p[-len(cont) :].gather(-1, targets[:, None]).squeeze(-1)
    greedy = bool((log_p[-len(cont) :].argmax(-1) == targets).all())
    return float(picked.sum()), greedy


def test_scores_match_hand_computed_log_likelihoods(lm, data_dir):
    model, tokenizer = lm
    scores = evaluate_zero_shot(
        model,
        tokenizer,
        ["piqa", "winogrande", "lambada"],
        per_task=None,
        bf16=False,
        data_dir=data_dir,
        batch_size=2,
        examples=True,
    )
    expected = {  # (context, continuation) per choice, as lm-eval's own piqa / winogrande / lambada
        "piqa": [[(d["query"].strip() + "\nAnswer:", " " + c) for c in d["choices"]] for d in CHOICE],
        "winogrande": [[(c, " " + d["continuation"]) for c in d["context_options"]] for d in SCHEMA],
        "lambada": [[(d["context"], " " + d["continuation"])] for d in LAMBADA],
    }
    golds = {"piqa": [d["gold"] for d in CHOICE], "winogrande": [d["gold"] for d in SCHEMA]}
    for task, docs in expected.items():
        scored = sorted(scores[task]["examples"], key=lambda e: e["doc_id"])
        assert [[tuple(r) for r in e["requests"]] for e in scored] == docs
        hand = [[loglikelihood(model, tokenizer, *pair) for pair in doc] for doc in docs]
        for example, mine in zip(scored, hand):
            assert example["loglikelihoods"] == pytest.approx([ll for ll, _ in mine], abs=1e-4)
        if task in golds:
            right = [max(range(len(h)), key=lambda i: h[i][0]) == g for h, g in zip(hand, golds[task])]
            assert scores[task]["acc"] == pytest.approx(sum(right) / len(right))
            assert scores[task]["n"] == len(docs)
    lam = [doc[0] for doc in hand]
    assert scores["lambada"]["perplexity"] == pytest.approx(
        math.exp(-sum(ll for ll, _ in lam) / len(lam)), rel=1e-4
    )
    assert scores["lambada"]["acc"] == pytest.approx(sum(g for _, g in lam) / len(lam))


def test_subsets_are_seeded_and_shared_across_models(lm, data_dir):
    model, tokenizer = lm
    first = evaluate_zero_shot(
        model, tokenizer, ["lambada"], per_task=2, seed=1, bf16=False, data_dir=data_dir
    )
    again = evaluate_zero_shot(
        model, tokenizer, ["lambada"], per_task=2, seed=1, bf16=False, data_dir=data_dir
    )
    assert first == again and first["lambada"]["n"] == 2


def test_scoring_starts_no_subprocess(lm, data_dir, monkeypatch):
    """lm-eval's `simple_evaluate` probes the machine for its report on every call (`pip list`
    through torch's environment probe, and `git`): seconds per model scored, for nothing read."""
    model, tokenizer = lm
    started, popen = [], subprocess.Popen

    def recording(args, *rest, **kwargs):
        started.append(args)
        return popen(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording)
    scores = evaluate_zero_shot(model, tokenizer, ["piqa"], per_task=2, bf16=False, data_dir=data_dir)
    assert scores["piqa"]["n"] == 2 and started == []


def test_task_configs_use_the_local_file_and_lm_eval_prompts(tmp_path):
    config = task_config("arc_easy", tmp_path / "arc_easy.jsonl")
    assert config["dataset_kwargs"]["data_files"]["test"].endswith("arc_easy.jsonl")
    assert config["doc_to_text"] == "{{query}}\nAnswer:" and config["doc_to_choice"] == "choices"
    assert task_config("wsc", tmp_path / "w.jsonl")["doc_to_text"] == "gold"  # partial scoring
    assert task_config("lambada", tmp_path / "l.jsonl")["target_delimiter"] == ""


def test_bad_task_and_count_are_named(lm, data_dir):
    model, tokenizer = lm
    with pytest.raises(ConfigError, match="sciq.*choose from"):
        evaluate_zero_shot(model, tokenizer, ["sciq"], data_dir=data_dir)
    with pytest.raises(ConfigError, match="zero_shot_per_task = 0"):
        evaluate_zero_shot(model, tokenizer, ["piqa"], per_task=0, data_dir=data_dir)
