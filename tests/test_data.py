"""SQuAD loading from a data directory, the article split, and clear errors."""

import json
import time

import pytest

from kdlib.data import DataError, load_squad, resolve_data_dir, split_by_article
from kdlib.hub import HubUnavailableError


def write_squad(root, n_articles=4, questions=2):
    data = []
    for a in range(n_articles):
        context = f"article {a} says the answer is number {a}"
        qas = [
            {
                "id": f"{a}-{q}",
                "question": f"what does article {a} say {q}",
                "answers": [{"text": f"number {a}", "answer_start": context.index("number")}],
            }
            for q in range(questions)
        ]
        data.append({"title": f"T{a}", "paragraphs": [{"context": context, "qas": qas}]})
    (root / "squad").mkdir(parents=True)
    (root / "squad" / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": data}))
    return root


def test_loads_official_json_with_article_index(tmp_path):
    examples = load_squad("validation", write_squad(tmp_path))
    assert len(examples) == 8
    assert [ex["article"] for ex in examples] == [0, 0, 1, 1, 2, 2, 3, 3]
    ex = examples[2]
    assert ex["context"][ex["answers"]["answer_start"][0] :].startswith(ex["answers"]["text"][0])


def test_split_by_article_is_disjoint_and_recorded(tmp_path):
    examples = load_squad("validation", write_squad(tmp_path))
    train, held, record = split_by_article(examples, [2, 3])
    assert {ex["article"] for ex in train} == {0, 1}
    assert {ex["article"] for ex in held} == {2, 3}
    assert not {ex["context"] for ex in train} & {ex["context"] for ex in held}
    assert record == {
        "train_articles": [0, 1],
        "eval_articles": [2, 3],
        "train_questions": 4,
        "eval_questions": 4,
    }


def test_split_refuses_missing_or_all_articles(tmp_path):
    examples = load_squad("validation", write_squad(tmp_path))
    with pytest.raises(DataError, match=r"\[9\] do not exist"):
        split_by_article(examples, [9])
    with pytest.raises(DataError, match="empty side"):
        split_by_article(examples, [0, 1, 2, 3])


def test_env_variable_is_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    monkeypatch.delenv("KDLIB_DATA_DIR")
    assert resolve_data_dir(None) is None


def test_missing_directory_names_the_source(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data_dir.*not a directory"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("KDLIB_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="KDLIB_DATA_DIR"):
        resolve_data_dir(None)


def test_corrupt_file_says_so(tmp_path):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev-v1.1.json").write_text('{"data": [ {"title": ')
    with pytest.raises(DataError, match="not a valid SQuAD JSON"):
        load_squad("validation", tmp_path)


def test_train_split_is_not_offline(tmp_path):
    with pytest.raises(DataError, match="only SQuAD v1.1 dev"):
        load_squad("train", write_squad(tmp_path))


def test_hub_fallback_fails_fast_offline(monkeypatch):
    monkeypatch.delenv("KDLIB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="rajpurkar/squad"):
        load_squad("validation")
    assert time.perf_counter() - started < 5


def write_sst2(root, rows=("1\tgood film", "0\tdull , slow")):
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    for name in ("train", "dev", "test"):
        (root / "sst2" / f"{name}.tsv").write_text("label\tsentence\n" + "\n".join(rows) + "\n")
    return root


def test_sst2_reads_label_and_sentence(tmp_path):
    from kdlib.data import load_sst2

    rows = load_sst2("validation", write_sst2(tmp_path))
    assert rows == [{"sentence": "good film", "label": 1}, {"sentence": "dull , slow", "label": 0}]


def test_sst2_malformed_line_is_named(tmp_path):
    from kdlib.data import load_sst2

    write_sst2(tmp_path, rows=("1\tgood", "positive\tbad label"))
    with pytest.raises(DataError, match=r"train.tsv:3 .*0/1 label"):
        load_sst2("train", tmp_path)
