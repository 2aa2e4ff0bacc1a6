"""Stand-ins for the hub ids the `paper` profiles name, so those profiles run end to end here.

No machine of this project reaches the hub, so without stand-ins not one line of a paper
profile past its parameter check would ever run. Each hub model id the profiles name gets a
local folder holding a model of the same architecture class and tokenizer kind, built from a
config at tiny width (the paper's depth is kept where the chapter cuts layers) with random
weights; each hub data set gets rows in the hub's own schema, taken from the data mirror.

`install()` patches `kdlib.registry.resolve_model`, `kdlib.hub.require_hub` and
`datasets.load_dataset` to serve them. It is called only by this folder's `sitecustomize.py`,
which a test puts on `PYTHONPATH` (with `KDLIB_STANDINS` naming the built folders) for the
`bookrun` process it starts and the notebook kernels that process starts: no hub id resolves to
a stand-in anywhere else. Any hub id or data set not listed here still fails as it would offline.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# hub model id -> (builder name, builder arguments)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "csarron/bert-base-uncased-squad-v1": ("bert", {"head": "qa", "layers": 12}),
    "distilbert-base-uncased": ("distilbert", {"layers": 6}),
    "textattack/bert-base-uncased-SST-2": ("bert", {"head": "classification", "labels": 2, "layers": 12}),
    "bert-base-chinese": ("bert_chinese", {"layers": 12}),
    "EleutherAI/pythia-160m": ("pythia", {"layers": 12, "seed": 1}),
    "EleutherAI/pythia-70m": ("pythia", {"layers": 6, "seed": 2}),
}
WIDTH = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
SQUAD_ARTICLES = {"train": range(0, 3), "validation": range(40, 41)}  # of the mirror's dev articles
ROWS_PER_SPLIT = 96  # SST-2 and iflytek rows per split


def folder_name(hub_id: str) -> str:
    return hub_id.replace("/", "--")


# --- models -----------------------------------------------------------------------------------


def build_models(root: Path, data: Path) -> Path:
    """Build every stand-in model folder under `root` (once; a finished folder is kept); `data`
    is the mirror (the Chinese vocabulary is built from its iflytek text)."""
    root.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[..., None]] = {
        "bert": _bert,
        "distilbert": _distilbert,
        "bert_chinese": _bert_chinese,
        "pythia": _pythia,
    }
    for hub_id, (kind, kwargs) in MODELS.items():
        target = root / folder_name(hub_id)
        if not (target / "config.json").exists():
            builders[kind](target, **({"data": data} if kind == "bert_chinese" else {}), **kwargs)
    return root


def _uncased_vocab() -> Path:
    """bert-base-uncased's WordPiece vocabulary (MiniLM's is the same 30,522 tokens)."""
    from kdlib.registry import resolve_model

    return Path(resolve_model("minilm-l6")) / "vocab.txt"


def _bert(target: Path, head: str, layers: int, labels: int = 2) -> None:
    import torch
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, num_hidden_layers=layers, num_labels=labels, **WIDTH)
    model_class = BertForQuestionAnswering if head == "qa" else BertForSequenceClassification
    model_class(config).save_pretrained(target)
    BertTokenizerFast(vocab_file=str(_uncased_vocab()), do_lower_case=True).save_pretrained(target)


def _distilbert(target: Path, layers: int) -> None:
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertTokenizerFast

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=30522, n_layers=layers, dim=32, n_heads=2, hidden_dim=64)
    DistilBertForMaskedLM(config).save_pretrained(target)
    DistilBertTokenizerFast(vocab_file=str(_uncased_vocab()), do_lower_case=True).save_pretrained(target)


def _chinese_vocab(target: Path, data: Path) -> Path:
    """A character WordPiece vocabulary (bert-base-chinese's kind) from the iflytek mirror's text."""
    chars: set[str] = set()
    for line in (data / "iflytek" / "train_few_all.json").read_text("utf-8").split("\n"):
        if line.strip():
            chars.update(json.loads(line)["sentence"])
    ascii_words = [chr(c) for c in range(33, 127)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ascii_words]
    tokens += sorted(c for c in chars if not c.isspace() and c not in ascii_words)
    target.mkdir(parents=True, exist_ok=True)
    path = target / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", "utf-8")
    return path


def _bert_chinese(target: Path, data: Path, layers: int) -> None:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    vocab = _chinese_vocab(target, data)
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=False, tokenize_chinese_chars=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, **WIDTH)
    BertForMaskedLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


def _pythia(target: Path, layers: int, seed: int) -> None:
    """GPT-NeoX with a byte-level BPE tokenizer (SmolLM2's), its embedding padded to a multiple
    of 128 with rows to spare, as pythia's is (50,304 rows for 50,277 tokens)."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from kdlib.registry import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=(len(tokenizer) + 127) // 128 * 128 + 128,
        num_hidden_layers=layers,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **WIDTH,
    )
    GPTNeoXForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


# --- data sets --------------------------------------------------------------------------------


def _squad(split: str) -> Any:
    import datasets

    data = Path(os.environ["KDLIB_STANDINS_DATA"])
    articles = json.loads((data / "squad" / "dev-v1.1.json").read_text("utf-8"))["data"]
    rows = []
    for index in SQUAD_ARTICLES[split]:
        article = articles[index]
        for paragraph in article["paragraphs"][:4]:
            for qa in paragraph["qas"]:
                answers = qa["answers"][:1] if split == "train" else qa["answers"]  # the hub's shapes
                rows.append(
                    {
                        "id": qa["id"],
                        "title": article["title"],
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [a["answer_start"] for a in answers],
                        },
                    }
                )
    return datasets.Dataset.from_list(rows)


def _labelled(rows: list[dict[str, Any]], names: list[str], split: str) -> Any:
    """A seeded sample of `rows` in the GLUE/CLUE hub schema; their test splits carry no labels."""
    import datasets

    chosen = random.Random(split).sample(rows, min(ROWS_PER_SPLIT, len(rows)))
    labelled = split != "test"
    label = datasets.ClassLabel(names=names) if labelled else datasets.Value("int64")
    features = datasets.Features(
        {"idx": datasets.Value("int32"), "sentence": datasets.Value("string"), "label": label}
    )
    return datasets.Dataset.from_list(
        [
            {"idx": i, "sentence": r["sentence"], "label": r["label"] if labelled else -1}
            for i, r in enumerate(chosen)
        ],
        features=features,
    )


def _sst2(split: str) -> Any:
    from kdlib.data import load_sst2

    return _labelled(load_sst2(split, os.environ["KDLIB_STANDINS_DATA"]), ["negative", "positive"], split)


def _iflytek(split: str) -> Any:
    from kdlib.data import load_iflytek

    rows = load_iflytek(split, os.environ["KDLIB_STANDINS_DATA"])
    return _labelled(rows, [str(i) for i in range(119)], split)


def _pile(split: str) -> Iterator[dict[str, Any]]:
    """monology/pile-uncopyrighted, streamed: `text` and `meta`, from WikiText-2's validation text."""
    from kdlib.lm_data import load_lm_documents

    for doc in load_lm_documents("wikitext2-valid", os.environ["KDLIB_STANDINS_DATA"]):
        yield {"text": doc, "meta": {"pile_set_name": "Wikipedia (en)"}}


DATASETS: dict[tuple[str, str | None], Callable[[str], Any]] = {
    ("rajpurkar/squad", None): _squad,
    ("stanfordnlp/sst2", None): _sst2,
    ("clue/clue", "iflytek"): _iflytek,
    ("monology/pile-uncopyrighted", None): _pile,
}


# --- the patches ------------------------------------------------------------------------------


def install() -> None:
    """Serve the stand-ins from $KDLIB_STANDINS (model folders) and $KDLIB_STANDINS_DATA (the mirror)."""
    import datasets

    import kdlib.hub
    import kdlib.registry

    root = Path(os.environ["KDLIB_STANDINS"])
    resolve_model, require_hub, load_dataset = (
        kdlib.registry.resolve_model,
        kdlib.hub.require_hub,
        datasets.load_dataset,
    )
    served = {name for name, _ in DATASETS} | set(MODELS)

    def standin_model(name_or_path: str) -> str:
        if name_or_path in MODELS:
            return str(root / folder_name(name_or_path))
        return resolve_model(name_or_path)

    def standin_hub(what: str, timeout: float = 3.0) -> None:
        if not any(repr(name) in what or f"({name})" in what for name in served):
            require_hub(what, timeout)

    def standin_dataset(path: str, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        build = DATASETS.get((path, name))
        if build is None:  # anything else (lm-eval's local JSON tasks) as datasets would load it
            return load_dataset(path, name, *args, **kwargs)
        return build(kwargs["split"])

    replacements = [(resolve_model, standin_model), (require_hub, standin_hub)]
    for module in [m for n, m in sys.modules.items() if n == "kdlib" or n.startswith("kdlib.")]:
        for attribute, value in list(vars(module).items()):  # names bound by earlier imports too
            for original, replacement in replacements:
                if value is original:
                    setattr(module, attribute, replacement)
    datasets.load_dataset = standin_dataset
