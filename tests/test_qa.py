"""SQuAD windows, answer decoding and the official v1.1 metric, on worked examples."""

import numpy as np
import pytest

from kdlib import qa

CONTEXT = "the eiffel tower was built in 1889 by gustave eiffel in paris france"


def example(question="who built the eiffel tower", answer="gustave eiffel", qid="q1"):
    return {
        "id": qid,
        "question": question,
        "context": CONTEXT,
        "answers": {"text": [answer], "answer_start": [CONTEXT.index(answer)]},
    }


# --- the official normalisation and scores ---------------------------------------------


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an  apple, a pear ", "apple pear"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("U.S.A.", "usa"),
        ("A", ""),
    ],
)
def test_normalize_answer(text, normalised):
    assert qa.normalize_answer(text) == normalised


def test_f1_worked_case():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P = 1, R = 2/3
    assert qa.f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert qa.f1("dog", "cat") == 0.0
    assert qa.f1("the", "a") == 0.0  # both normalise to nothing: no common tokens
    assert qa.f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts, not sets


def test_scores_take_max_over_gold_answers_and_count_missing_as_zero():
    examples = [
        {"id": "a", "answers": {"text": ["Paris", "Paris, France"], "answer_start": [0, 0]}},
        {"id": "b", "answers": {"text": ["1889"], "answer_start": [0]}},
    ]
    scores = qa.squad_scores({"a": "paris france"}, examples)  # b has no prediction
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(50.0)
    assert scores["questions"] == 2


# --- windows and labels ---------------------------------------------------------------


def test_windows_label_the_answer_tokens(tiny_tokenizer):
    ex = example()
    windows = qa.prepare_windows([ex], tiny_tokenizer, max_length=64, stride=8)
    assert len(windows) == 1
    ids = windows.features["input_ids"][0]
    start, end = windows.start_positions[0], windows.end_positions[0]
    assert tiny_tokenizer.decode(ids[start : end + 1]) == "gustave eiffel"
    offsets = windows.offsets[0]
    assert CONTEXT[offsets[start][0] : offsets[end][1]] == "gustave eiffel"
    assert offsets[0] is None  # [CLS] is not context


def test_long_context_overflows_into_overlapping_windows(tiny_tokenizer):
    ex = example(answer="paris france")
    windows = qa.prepare_windows([ex], tiny_tokenizer, max_length=16, stride=4)
    assert len(windows) > 1
    assert set(windows.example_index) == {0}
    labelled = [i for i in range(len(windows)) if windows.start_positions[i] != 0]
    assert labelled, "some window must hold the answer"
    for i in range(len(windows)):
        if i not in labelled:
            assert (windows.start_positions[i], windows.end_positions[i]) == (0, 0)
    # consecutive windows share `stride` context tokens
    first = [o for o in windows.offsets[0] if o is not None]
    second = [o for o in windows.offsets[1] if o is not None]
    assert first[-4:] == second[:4]


def test_question_too_long_is_refused_by_name(tiny_tokenizer):
    ex = example(question=" ".join(["who"] * 40))
    with pytest.raises(ValueError, match="q1.*max_length"):
        qa.prepare_windows([ex], tiny_tokenizer, max_length=32, stride=4)


def test_stride_must_be_below_max_length(tiny_tokenizer):
    with pytest.raises(ValueError, match="stride"):
        qa.prepare_windows([example()], tiny_tokenizer, max_length=16, stride=16)


# --- decoding ----------------------------------------------------------------------------


def _logits_for(windows, i, start, end, size=None):
    n = size or len(windows.offsets[i])
    s, e = np.full(n, -10.0), np.full(n, -10.0)
    s[start], e[end] = 5.0, 5.0
    return s, e


def test_predict_answers_recovers_the_span(tiny_tokenizer):
    ex = example()
    windows = qa.prepare_windows([ex], tiny_tokenizer, max_length=64, stride=8)
    s, e = _logits_for(windows, 0, windows.start_positions[0], windows.end_positions[0], size=80)
    predictions = qa.predict_answers([ex], windows, [s], [e])  # padded logits are ignored
    assert predictions == {"q1": "gustave eiffel"}
    assert qa.squad_scores(predictions, [ex])["exact_match"] == 100.0


def test_predict_answers_never_picks_question_or_reversed_spans(tiny_tokenizer):
    ex = example()
    windows = qa.prepare_windows([ex], tiny_tokenizer, max_length=64, stride=8)
    n = len(windows.offsets[0])
    s, e = np.full(n, -100.0), np.full(n, -100.0)
    s[1], e[1] = 100.0, 100.0  # a question token: not allowed
    ctx = [j for j, o in enumerate(windows.offsets[0]) if o is not None]
    s[ctx[5]], e[ctx[2]] = 50.0, 50.0  # end before start: not allowed
    s[ctx[3]], e[ctx[4]] = 10.0, 10.0  # the best valid span
    predictions = qa.predict_answers([ex], windows, [s], [e])
    o = windows.offsets[0]
    assert predictions["q1"] == CONTEXT[o[ctx[3]][0] : o[ctx[4]][1]]


def test_max_answer_length_is_enforced(tiny_tokenizer):
    ex = example()
    windows = qa.prepare_windows([ex], tiny_tokenizer, max_length=64, stride=8)
    ctx = [j for j, o in enumerate(windows.offsets[0]) if o is not None]
    n = len(windows.offsets[0])
    s, e = np.zeros(n), np.zeros(n)
    s[ctx[0]], e[ctx[-1]] = 20.0, 20.0  # a span of the whole context
    s[ctx[1]], e[ctx[1]] = 5.0, 5.0
    long_ok = qa.predict_answers([ex], windows, [s], [e], max_answer_length=len(ctx))
    short = qa.predict_answers([ex], windows, [s], [e], max_answer_length=2)
    assert long_ok["q1"] == CONTEXT
    assert len(short["q1"].split()) <= 2


def test_subset_keeps_each_windows_fields_together():
    windows = qa.QAWindows(
        {"input_ids": [[1], [2, 2], [3, 3, 3]], "attention_mask": [[1], [1, 1], [1, 1, 1]]},
        example_index=[0, 0, 1],
        offsets=[[None], [None, (0, 1)], [None, (0, 2), (3, 4)]],
        start_positions=[0, 1, 2],
        end_positions=[0, 1, 2],
    )
    picked = windows.subset([2, 0])
    assert picked.features["input_ids"] == [[3, 3, 3], [1]]
    assert picked.features["attention_mask"] == [[1, 1, 1], [1]]
    assert picked.example_index == [1, 0] and picked.start_positions == [2, 0]
    assert picked.offsets[0] == [None, (0, 2), (3, 4)] and len(picked) == 2
