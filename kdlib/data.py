"""Data loaders over the local mirror (a data directory) or, without one, the public hub copy.

The data directory comes from the `data_dir` argument, else the `KDLIB_DATA_DIR` environment
variable. SQuAD v1.1's train set is not in the mirror, so offline runs split the dev set by
article (`split_by_article`): questions about one article never straddle train and eval.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdlib.hub import require_hub

SQUAD_FILE = "squad/dev-v1.1.json"
SQUAD_HUB_ID = "rajpurkar/squad"
SST2_FILES = {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv", "test": "sst2/test.tsv"}
SST2_HUB_ID = "stanfordnlp/sst2"
BANKING77_FILES = {"train": "banking77/train.csv", "test": "banking77/test.csv"}
BANKING77_HUB_ID = "PolyAI/banking77"
IFLYTEK_FILES = {
    "train": "iflytek/train_few_all.json",
    "validation": "iflytek/dev_few_all.json",
    "test": "iflytek/test_public.json",
}
IFLYTEK_HUB_ID = "clue/clue"


class DataError(ValueError):
    """A data directory or file is missing, unreadable or malformed."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory to read from: the argument, else $KDLIB_DATA_DIR, else None (hub)."""
    chosen = data_dir or os.environ.get("KDLIB_DATA_DIR") or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        source = "data_dir" if data_dir else "KDLIB_DATA_DIR"
        raise DataError(
            f"{source} = {str(chosen)!r} is not a directory. Point it at the local data mirror "
            "(the folder holding squad/, sst2/, lm/ ...), or leave it empty to use the hub."
        )
    return path


def _hub_rows(name: str, hub_id: str, split: str, *config: str) -> Any:
    """A split of a hub data set, after checking the hub can be reached (fails fast offline)."""
    require_hub(f"the {name} {split} split ({hub_id})")
    import datasets

    return datasets.load_dataset(hub_id, *config, split=split)


def _mirror_file(root: Path, files: dict[str, str], split: str) -> Path:
    path = root / files[split]
    if not path.is_file():
        raise DataError(f"{path} does not exist: the data directory lacks {files[split]}.")
    return path


def load_squad(split: str = "validation", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """SQuAD v1.1 questions in file order, each with `article` (index of its article).

    From the mirror's official JSON when a data directory is set (only "validation" is
    there), else from the hub's `rajpurkar/squad`.
    """
    root = resolve_data_dir(data_dir)
    if root is not None:
        if split != "validation":
            raise DataError(
                f"split={split!r}: the local mirror holds only SQuAD v1.1 dev ('validation'). "
                "Split it by article (split_by_article), or unset the data directory to load "
                "the full train split from the hub."
            )
        return _read_official_json(root / SQUAD_FILE)
    rows = _hub_rows("SQuAD v1.1", SQUAD_HUB_ID, split)
    titles: dict[str, int] = {}
    examples = []
    for row in rows:
        article = titles.setdefault(row["title"], len(titles))
        examples.append(
            {
                "id": row["id"],
                "title": row["title"],
                "article": article,
                "context": row["context"],
                "question": row["question"],
                "answers": {
                    "text": list(row["answers"]["text"]),
                    "answer_start": list(row["answers"]["answer_start"]),
                },
            }
        )
    return examples


def _read_official_json(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path} does not exist: the data directory lacks {SQUAD_FILE}.")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path} is not a valid SQuAD JSON file ({err}); check it against SHA256SUMS."
        ) from err
    examples = []
    for index, article in enumerate(articles):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                examples.append(
                    {
                        "id": qa["id"],
                        "title": article["title"],
                        "article": index,
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [a["text"] for a in qa["answers"]],
                            "answer_start": [a["answer_start"] for a in qa["answers"]],
                        },
                    }
                )
    if not examples:
        raise DataError(f"{path} holds no questions.")
    return examples


def split_by_article(
    examples: Sequence[dict[str, Any]], heldout_articles: Sequence[int]
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Train on every article not in `heldout_articles`, evaluate on those.

    Returns (train, eval, record); `record` names the articles on each side so that
    metrics.json can say exactly what was held out.
    """
    heldout = set(heldout_articles)
    present = sorted({ex["article"] for ex in examples})
    missing = sorted(heldout - set(present))
    if missing:
        raise DataError(
            f"held-out articles {missing} do not exist; articles run from {present[0]} to {present[-1]}."
        )
    train = [ex for ex in examples if ex["article"] not in heldout]
    held = [ex for ex in examples if ex["article"] in heldout]
    if not train or not held:
        raise DataError("splitting by article left an empty side: hold out some articles, not all of them.")
    record = {
        "train_articles": sorted({ex["article"] for ex in train}),
        "eval_articles": sorted(heldout),
        "train_questions": len(train),
        "eval_questions": len(held),
    }
    return train, held, record


def load_sst2(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """SST-2 sentences with 0/1 labels: `{"sentence", "label"}` in file order.

    The mirror's TSVs (label first, then the text; `validation` is GLUE's dev set, `test` its
    labelled test set), else the hub's `stanfordnlp/sst2` (whose test split has no labels).
    """
    if split not in SST2_FILES:
        raise DataError(f"split={split!r}: SST-2 has {sorted(SST2_FILES)}.")
    root = resolve_data_dir(data_dir)
    if root is None:
        rows = _hub_rows("SST-2", SST2_HUB_ID, split)
        return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows]
    path = _mirror_file(root, SST2_FILES, split)
    examples = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        label, _, sentence = line.partition("\t")
        if label not in ("0", "1") or not sentence:
            raise DataError(f"{path}:{number} is not `label<TAB>sentence` with a 0/1 label: {line[:60]!r}")
        examples.append({"sentence": sentence, "label": int(label)})
    if not examples:
        raise DataError(f"{path} holds no examples.")
    return examples


def load_banking77(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Banking77 queries: `{"sentence", "label", "category"}`, labels numbering the 77 intents
    in alphabetical order (the same ids from the mirror's CSVs and from the hub)."""
    if split not in BANKING77_FILES:
        raise DataError(f"split={split!r}: Banking77 has {sorted(BANKING77_FILES)}.")
    root = resolve_data_dir(data_dir)
    if root is None:
        rows = _hub_rows("Banking77", BANKING77_HUB_ID, split)
        names = rows.features["label"].names
        pairs = [(r["text"], names[r["label"]]) for r in rows]
        categories = sorted(names)
    else:
        pairs = _read_banking77_csv(root, split)
        train_pairs = pairs if split == "train" else _read_banking77_csv(root, "train")
        categories = sorted({c for _, c in train_pairs})
    index = {c: i for i, c in enumerate(categories)}
    unknown = sorted({c for _, c in pairs} - set(index))
    if unknown:
        raise DataError(f"Banking77 {split} has intents the train split lacks: {unknown[:5]}.")
    return [{"sentence": text, "label": index[c], "category": c} for text, c in pairs]


def _read_banking77_csv(root: Path, split: str) -> list[tuple[str, str]]:
    path = _mirror_file(root, BANKING77_FILES, split)
    reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8")))
    header = next(reader, None)
    if header != ["text", "category"]:
        raise DataError(f"{path} should start with the header `text,category`, found {header}.")
    pairs = []
    for number, row in enumerate(reader, start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{number} is not `text,category`: {row!r:.80}")
        pairs.append((row[0], row[1]))
    if not pairs:
        raise DataError(f"{path} holds no examples.")
    return pairs


def load_iflytek(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """CLUE iflytek app descriptions (119 classes): `{"sentence", "label"}`.

    The mirror holds the FewCLUE release (train_few_all / dev_few_all / test_public); without a
    data directory the full CLUE set comes from the hub (its test split has no labels).
    """
    if split not in IFLYTEK_FILES:
        raise DataError(f"split={split!r}: iflytek has {sorted(IFLYTEK_FILES)}.")
    root = resolve_data_dir(data_dir)
    if root is None:
        rows = _hub_rows("CLUE iflytek", IFLYTEK_HUB_ID, split, "iflytek")
        return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows]
    path = _mirror_file(root, IFLYTEK_FILES, split)
    examples = []
    # split on "\n" only: the descriptions contain U+2028, which str.splitlines would break on
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append({"sentence": row["sentence"], "label": int(row["label"])})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{path}:{number} is not a JSON line with `sentence` and `label` ({err})."
            ) from err
    if not examples:
        raise DataError(f"{path} holds no examples.")
    return examples
