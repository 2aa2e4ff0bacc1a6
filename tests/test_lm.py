"""Language-model distillation losses against their definitions, computed by hand."""

import math

import pytest
import torch

import kdlib.lm
from kdlib.config import ConfigError
from kdlib.data import DataError
from kdlib.lm import TeacherHead, lm_distillation_loss, token_divergence, topk_forward_kl, topk_teacher
from kdlib.lm_data import (
    gutenberg_body,
    load_lm_documents,
    pack,
    pad_truncate,
    prose_paragraphs,
    wikitext_articles,
)

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.2, 0.5, 0.3]  # student


def logits(probs):
    return torch.log(torch.tensor([probs]))


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_forward_and_reverse_kl_match_their_definitions_at_t1():
    forward = token_divergence(logits(Q), logits(P), temperature=1.0, divergence="forward")
    reverse = token_divergence(logits(Q), logits(P), temperature=1.0, divergence="reverse")
    assert forward.item() == pytest.approx(kl(P, Q), rel=1e-5)  # 0.5341
    assert reverse.item() == pytest.approx(kl(Q, P), rel=1e-5)  # 0.5094
    assert forward.item() != pytest.approx(reverse.item(), rel=1e-3)


def test_generalised_jsd_matches_its_definition():
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
    expected = beta * kl(P, m) + (1 - beta) * kl(Q, m)
    got = token_divergence(logits(Q), logits(P), temperature=1.0, divergence="jsd", beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() < math.log(2)  # a JSD is bounded


def test_temperature_softens_both_sides_and_scales_by_t_squared():
    t = 2.0
    soft = lambda probs: [x ** (1 / t) / sum(y ** (1 / t) for y in probs) for x in probs]  # noqa: E731
    got = token_divergence(logits(Q), logits(P), temperature=t)
    assert got.item() == pytest.approx(t**2 * kl(soft(P), soft(Q)), rel=1e-5)


def test_padding_tokens_do_not_count():
    student = torch.randn(2, 4, 7)
    teacher = torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    full = token_divergence(student, teacher, mask=mask)
    garbage = student.clone()
    garbage[0, 3] = 100.0
    garbage[1, 2:] = -50.0
    assert token_divergence(garbage, teacher, mask=mask).item() == pytest.approx(full.item(), rel=1e-6)
    kept = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    each = [token_divergence(student[i, j], teacher[i, j]).item() for i, j in kept]
    assert full.item() == pytest.approx(sum(each) / len(each), rel=1e-5)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_identical_distributions_give_zero(divergence):
    x = torch.randn(3, 5, 11)
    assert token_divergence(x, x.clone(), divergence=divergence).item() == pytest.approx(0.0, abs=1e-6)


def test_topk_with_one_token_is_a_two_bucket_kl():
    indices, log_probs = topk_teacher(logits(P), k=1, temperature=1.0)
    assert indices.tolist() == [[0]] and log_probs.exp().item() == pytest.approx(0.7)
    got = topk_forward_kl(logits(Q), indices, log_probs, temperature=1.0)
    assert got.item() == pytest.approx(kl([0.7, 0.3], [0.2, 0.8]), rel=1e-5)


def test_topk_is_a_lower_bound_that_closes_as_k_grows():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 50), torch.randn(2, 6, 50) * 3
    full = token_divergence(student, teacher).item()
    values = []
    for k in (1, 5, 20, 49):
        indices, log_probs = topk_teacher(teacher, k)
        values.append(topk_forward_kl(student, indices, log_probs).item())
    assert all(v <= full + 1e-5 for v in values)
    assert values == sorted(values)  # finer buckets never lose information
    assert values[-1] == pytest.approx(full, rel=1e-4)  # k = vocab - 1: the rest bucket is one token


def plain_forward_kl(student, teacher, t, mask):
    """The loss written as tensor algebra, for autograd to differentiate."""
    log_q = torch.log_softmax(student / t, -1)
    log_p = torch.log_softmax(teacher / t, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return t**2 * per_token[mask].mean()


def plain_topk_kl(student, indices, log_p, t, mask):
    log_q = torch.log_softmax(student / t, -1).gather(-1, indices)
    p_rest, q_rest = 1 - log_p.exp().sum(-1), 1 - log_q.exp().sum(-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return t**2 * per_token[mask].mean()


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(kdlib.lm, "CHUNK_ELEMENTS", 3 * 50)  # 3 tokens a block: blocks end mid-row


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_blockwise_kl_and_its_gradient_equal_autograd_of_the_formula(small_blocks, t):
    torch.manual_seed(1)
    student = torch.randn(2, 5, 50, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 50, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).bool()
    indices, log_p = topk_teacher(teacher, k=7, temperature=t)
    indices, log_p = indices, log_p.double()  # topk_teacher works in float32
    cases = [
        (lambda x: token_divergence(x, teacher, t, mask), lambda x: plain_forward_kl(x, teacher, t, mask)),
        (
            lambda x: topk_forward_kl(x, indices, log_p, t, mask),
            lambda x: plain_topk_kl(x, indices, log_p, t, mask),
        ),
    ]
    for blockwise, plain in cases:
        got = blockwise(student)
        (3.0 * got).backward()  # the upstream gradient is applied
        grad, student.grad = student.grad.clone(), None
        expected = plain(student)
        (3.0 * expected).backward()
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        assert torch.allclose(grad, student.grad, atol=1e-7, rtol=1e-6)
        assert grad[~mask].abs().max() == 0  # padding gets no gradient
        student.grad = None


def test_kd_plus_clm_in_one_pass_equals_autograd_of_the_weighted_sum(small_blocks):
    torch.manual_seed(2)
    student = torch.randn(2, 5, 50, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 50, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    labels = torch.tensor([[3, 7, 1, 0, 9], [4, 4, 8, -100, -100]])
    total, values = lm_distillation_loss(
        student,
        labels=labels,
        teacher_logits=teacher,
        mask=mask,
        temperature=2.0,
        alpha_ce=0.3,
        alpha_task=0.7,
    )
    total.backward()
    grad, student.grad = student.grad.clone(), None
    kd = plain_forward_kl(student, teacher, 2.0, mask)
    # what a causal LM's own loss is: position t predicts label t + 1
    clm = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    (0.3 * kd + 0.7 * clm).backward()
    assert values["kd"].item() == pytest.approx(kd.item(), rel=1e-9)
    assert values["clm"].item() == pytest.approx(clm.item(), rel=1e-9)
    assert total.item() == pytest.approx(0.3 * kd.item() + 0.7 * clm.item(), rel=1e-9)
    assert torch.allclose(grad, student.grad, atol=1e-9, rtol=1e-7)


def test_a_teacher_head_gives_the_loss_and_gradient_of_its_whole_logits(small_blocks, monkeypatch):
    """The teacher's logits computed block by block from hidden states and its output layer,
    as an online teacher's are, give what the whole `[tokens x vocab]` tensor gives (passes of
    4 rows against blocks of 3: a block can straddle two passes)."""
    monkeypatch.setattr(TeacherHead, "ROWS_PER_PASS", 4)
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 50, bias=False).double()
    hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    student = torch.randn(2, 5, 50, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    labels = torch.tensor([[3, 7, 1, 0, 9], [4, 4, 8, -100, -100]])
    results = []
    for teacher in (head(hidden).detach(), TeacherHead(hidden, head)):
        total, values = lm_distillation_loss(
            student, labels=labels, teacher_logits=teacher, mask=mask, alpha_ce=0.3, alpha_task=0.7
        )
        total.backward()
        results.append((values["kd"].item(), student.grad.clone()))
        student.grad = None
    (whole_kd, whole_grad), (head_kd, head_grad) = results
    assert head_kd == pytest.approx(whole_kd, rel=1e-12) and whole_kd > 0
    assert torch.allclose(head_grad, whole_grad, rtol=1e-12, atol=1e-15)
    assert TeacherHead(hidden, head).shape == (2, 5, 50)


def test_a_zero_weight_drops_its_term():
    student, teacher = torch.randn(1, 4, 9), torch.randn(1, 4, 9)
    labels = torch.tensor([[1, 2, 3, 4]])
    total, values = lm_distillation_loss(
        student, labels=labels, teacher_logits=teacher, alpha_ce=0.0, alpha_task=1.0
    )
    assert set(values) == {"clm"} and total.item() == pytest.approx(values["clm"].item())
    with pytest.raises(ValueError, match="labels"):
        lm_distillation_loss(student, teacher_logits=teacher, alpha_task=0.5)
    with pytest.raises(ValueError, match="teacher"):
        lm_distillation_loss(student, labels=labels, alpha_ce=0.5)


def test_blockwise_kl_keeps_the_logits_dtype_and_needs_no_grad():
    student = torch.randn(4, 30).bfloat16().requires_grad_()
    teacher = torch.randn(4, 30).bfloat16()
    loss = token_divergence(student, teacher)
    loss.backward(retain_graph=True)
    assert student.grad.dtype == torch.bfloat16 and student.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="once"):  # the kept gradient was scaled in place
        loss.backward()
    with torch.no_grad():
        assert token_divergence(student, teacher).item() > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="share the vocabulary"):
        token_divergence(torch.zeros(1, 5), torch.zeros(1, 6))
    with pytest.raises(ConfigError, match="divergence"):
        token_divergence(torch.zeros(1, 5), torch.zeros(1, 5), divergence="tv")
    with pytest.raises(ConfigError, match="temperature"):
        token_divergence(torch.zeros(1, 5), torch.zeros(1, 5), temperature=0.0)
    with pytest.raises(ConfigError, match="topk"):
        topk_teacher(torch.zeros(1, 5), k=5)
    with pytest.raises(ConfigError, match="jsd_beta"):
        token_divergence(torch.zeros(1, 5), torch.zeros(1, 5), divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="mask"):
        token_divergence(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), mask=torch.ones(2, 4).bool())


def test_wikitext_is_split_at_top_level_titles_only():
    text = (
        "\n = Alpha = \n\n Alpha text .\n\n = = History = = \n\n More alpha .\n = Beta = \n\n Beta text .\n"
    )
    articles = wikitext_articles(text)
    assert len(articles) == 2
    assert articles[0].startswith("= Alpha =") and "= = History = =" in articles[0]
    assert articles[1] == "= Beta = \n\n Beta text ."


def test_padding_keeps_document_starts_and_packing_keeps_every_token():
    docs = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    assert pad_truncate(docs, max_length=3) == [[1, 2, 3], [7, 8, 9]]  # [6] is too short
    rows = pack(docs, block_size=4, eos_token_id=0)
    assert rows == [[1, 2, 3, 4], [5, 0, 6, 0], [7, 8, 9, 0]]
    assert pack(docs, block_size=5, eos_token_id=0) == [[1, 2, 3, 4, 5], [0, 6, 0, 7, 8]]  # remainder dropped


GUTENBERG_FILE = (
    "The Project Gutenberg EBook of Emma, by Jane Austen\r\n\r\nLicence words.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***\r\n\r\nProduced by A Volunteer\r\n\r\n"
    "EMMA\r\n\r\nEmma Woodhouse, handsome, clever,\r\nand rich.\r\n\r\n"
    "End of the Project Gutenberg EBook of Emma, by Jane Austen\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***\r\n\r\nMore licence.\r\n"
)


def test_a_gutenberg_book_is_its_text_between_the_markers_in_unwrapped_paragraphs(tmp_path):
    body = gutenberg_body(GUTENBERG_FILE)
    assert body == "EMMA\n\nEmma Woodhouse, handsome, clever,\nand rich."  # no header, credit, licence
    assert prose_paragraphs(body) == ["EMMA", "Emma Woodhouse, handsome, clever, and rich."]
    books = tmp_path / "lm" / "gutenberg"
    books.mkdir(parents=True)
    (books / "Austen__Emma.txt").write_bytes(GUTENBERG_FILE.encode())
    (books / "Austen__Emma2.txt").write_bytes(GUTENBERG_FILE.replace("rich", "poor").encode())
    assert load_lm_documents("gutenberg", tmp_path)[-1] == "Emma Woodhouse, handsome, clever, and poor."
    (books / "Broken.txt").write_text("no markers here")
    with pytest.raises(DataError, match="Broken.txt: no '\\*\\*\\* START OF'"):
        load_lm_documents("gutenberg", tmp_path)


def test_lm_data_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="block_size"):
        pack([[1, 2]], block_size=1, eos_token_id=0)
    with pytest.raises(DataError, match="no block of 8"):
        pack([[1, 2]], block_size=8, eos_token_id=0)
    with pytest.raises(DataError, match="nothing to train on"):
        pad_truncate([[1]], max_length=8)
    with pytest.raises(DataError, match="corpus"):
        load_lm_documents("pile", tmp_path)
    with pytest.raises(DataError, match="lacks lm/wiki.test.raw"):
        load_lm_documents("wikitext2-test", tmp_path)
    with pytest.raises(DataError, match="lacks lm/gutenberg/"):
        load_lm_documents("gutenberg", tmp_path)


def test_a_teacher_head_under_autocast_casts_its_weight_once_and_gives_autocast_s_logits():
    """Under bf16 autocast the head's logits are bit for bit what autocast's own linear gives;
    the weight is cast once for every step that shares the cast, and again once it changes."""
    torch.manual_seed(5)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 5, 8)
    rows = torch.arange(10)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with autocast():
        expected = head(hidden.reshape(-1, 8))
    casts = {}
    first = TeacherHead(hidden, head, autocast, casts)
    assert torch.equal(first.rows(rows), expected) and expected.dtype == torch.bfloat16
    (cast,) = casts.values()
    assert torch.equal(TeacherHead(hidden, head, autocast, casts).rows(rows[:4]), expected[:4])
    assert next(iter(casts.values())) is cast  # the next step reused it
    head.weight.mul_(2.0)  # changed in place: cast afresh
    with autocast():
        doubled = head(hidden.reshape(-1, 8))
    assert torch.equal(TeacherHead(hidden, head, autocast, casts).rows(rows), doubled)
    assert len(casts) == 1 and next(iter(casts.values())) is not cast
    assert torch.equal(TeacherHead(hidden, head).rows(rows), head(hidden.reshape(-1, 8)))  # no autocast
