"""Every chapter's verdict rules, on hand-made metrics that reach each of their outcomes.

The chapters' smoke runs exercise these functions on tiny slices, where the outcomes mean
nothing; here each branch is reached on purpose, so a rule that changes shows up.
"""

import math

import numpy as np
import pytest
import torch

from bookrun.chapters import CHAPTERS
from bookrun.params import chapter_config
from experiments import ch1_distilbert_squad as ch1
from experiments import ch2_layer_distillation as ch2
from experiments import ch3_distilpythia as ch3
from experiments import ch4_theseus as ch4

# --- chapter 1: the second distillation step ------------------------------------------


def scored(em, f1):
    per_question = (np.asarray(em, dtype=float), np.asarray(f1, dtype=float))
    scores = {"exact_match": 100 * per_question[0].mean(), "f1": 100 * per_question[1].mean()}
    return ch1.Scored(scores, {}, per_question, {}, 0.0)


def test_ch1_gain_is_paired_per_seed_and_per_question():
    cfg = chapter_config(CHAPTERS["ch1"], train_seeds=[0, 1])
    runs = {
        "student_alone/seed0": scored([0, 0, 1, 1], [0.0, 0.5, 1.0, 1.0]),
        "student_distilled/seed0": scored([1, 0, 1, 1], [1.0, 0.5, 1.0, 1.0]),
        "student_alone/seed1": scored([0, 1, 1, 1], [0.0, 1.0, 1.0, 1.0]),
        "student_distilled/seed1": scored([0, 1, 1, 1], [0.5, 1.0, 1.0, 1.0]),
    }
    gain = ch1.kd_gain(cfg, runs)
    assert gain["f1"]["per_seed"] == pytest.approx([25.0, 12.5])
    assert gain["f1"]["seeds_improved"] == 2
    # seed-averaged per question: alone (0, .75, 1, 1), distilled (.75, .75, 1, 1) -> gain (75, 0, 0, 0)
    assert gain["f1"]["mean"] == pytest.approx(18.75)
    assert gain["f1"]["se"] == pytest.approx(np.std([75, 0, 0, 0], ddof=1) / 2)
    assert gain["exact_match"]["per_seed"] == pytest.approx([25.0, 0.0])
    assert gain["exact_match"]["seeds_improved"] == 1  # a tie is not an improvement
    means = ch1.seed_means(cfg, runs)
    assert means["student_alone"]["f1"] == pytest.approx((62.5 + 75.0) / 2)
    assert means["student_alone"]["f1_std"] == pytest.approx(np.std([62.5, 75.0], ddof=1))


@pytest.mark.parametrize(
    "mean, se, improved, verdict",
    [
        (2.0, 0.5, 3, "reproduced"),
        (0.8, 0.5, 3, "inconclusive"),
        (2.0, 0.5, 2, "inconclusive"),
        (-0.3, 0.5, 1, "not reproduced"),
    ],
)
def test_ch1_claim_follows_the_f1_gain(mean, se, improved, verdict):
    gain = {
        "f1": {"mean": mean, "se": se, "seeds_improved": improved},
        "exact_match": {"mean": mean, "se": se, "seeds_improved": improved},
    }
    (claim,) = ch1.claims(gain, seeds=3)
    assert claim["verdict"] == verdict
    assert f"better in {improved} of 3 seeds" in claim["measured"]


# --- chapter 2: random against fixed teacher layers ------------------------------------


@pytest.mark.parametrize(
    "low, high, relation",
    [(0.2, 2.0, "beats"), (-2.0, -0.1, "trails"), (-0.8, 0.9, "matches"), (-1.5, 0.5, "undecided")],
)
def test_ch2_relation_reads_the_interval(low, high, relation):
    assert ch2.relation(low, high) == relation


def test_ch2_compare_gives_welchs_and_the_paired_interval():
    from scipy import stats

    a, b = [80.0, 82.0, 84.0], [79.0, 80.0, 81.0]
    c = ch2.compare(a, b, paired=True)
    # mean 82 - 80; variances 4 and 1 over 3 seeds; Welch's df = (5/3)^2 / ((4/3)^2/2 + (1/3)^2/2)
    assert c["difference"] == pytest.approx(2.0)
    assert c["se"] == pytest.approx((5 / 3) ** 0.5)
    half = stats.t.ppf(0.975, 50 / 17) * (5 / 3) ** 0.5
    assert (c["low"], c["high"]) == pytest.approx((2.0 - half, 2.0 + half))
    assert c["seeds"] == [3, 3] and ch2.relation(c["low"], c["high"]) == "undecided"
    # per-seed differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t with 2 df
    half = stats.t.ppf(0.975, 2) / 3**0.5
    assert c["paired"]["se"] == pytest.approx(1 / 3**0.5)
    assert (c["paired"]["low"], c["paired"]["high"]) == pytest.approx((2.0 - half, 2.0 + half))
    assert c["paired"]["p"] < c["p"]  # the seed's luck cancels in the pairs
    assert c["decided_by"] == "paired"
    assert ch2.deciding_interval(c) == (c["paired"]["low"], c["paired"]["high"])
    welch = ch2.compare(a, b)  # not paired: Welch decides, undecided
    assert "paired" not in welch and welch["decided_by"] == "Welch" and welch["relation"] == "undecided"


def test_ch2_seeds_that_move_every_strategy_alike_are_read_in_pairs():
    """As in the ten-seed reference run: seeds spread over 4 points, the strategies within 0.5
    of each other per seed. Welch cannot tell them apart within 1 point; the pairs can."""
    fixed = [82.5, 81.4, 82.8, 82.2, 81.9, 81.9, 80.4, 78.9, 83.7, 82.5]
    shifts = [0.1, -0.5, -0.1, 0.5, -0.1, -0.2, 0.0, 0.2, -0.1, -0.3]
    random_ = [f + d for f, d in zip(fixed, shifts)]
    c = ch2.compare(random_, fixed, paired=True)
    assert ch2.relation(c["low"], c["high"]) == "undecided"  # Welch: about +-1.2
    assert c["relation"] == "matches" and -0.3 < c["paired"]["low"] < c["paired"]["high"] < 0.3


def test_ch2_compare_without_spread_is_certain_and_needs_two_seeds():
    same = ch2.compare([80.0, 80.0], [78.0, 78.0])
    assert (same["low"], same["high"], same["p"], same["relation"]) == (2.0, 2.0, 0.0, "beats")
    assert "paired" not in ch2.compare([80.0, 81.0, 82.0], [80.0, 81.0])  # different seed counts
    with pytest.raises(ValueError, match="one seed on each side"):
        ch2.compare([80.0, 81.0, 82.0], [80.0, 81.0], paired=True)
    with pytest.raises(ValueError, match="two seeds"):
        ch2.compare([80.0], [79.0, 81.0])


def comparison(relation):
    return {"difference": 0.5, "se": 0.4, "low": -0.5, "high": 1.5, "p": 0.3, "relation": relation,
            "seeds": [5, 5], "decided_by": "Welch"}


@pytest.mark.parametrize(
    "relation, verdict",
    [("beats", "reproduced"), ("matches", "reproduced"), ("trails", "not reproduced"),
     ("undecided", "inconclusive")],
)
def test_ch2_claims_read_their_comparison(relation, verdict):
    comparisons = {
        "random-ordered vs fixed-ordered": comparison(relation),
        "fixed-ordered/cofi-weights vs kd-only": comparison("trails"),
        "fixed-ordered/cofi-warmup vs kd-only": comparison(relation),
    }
    rail, cofi, warm = ch2.claims(comparisons, warmup=0.5)
    assert rail["verdict"] == verdict and "RAIL-KD" in rail["claim"]
    assert "`random-ordered` - `fixed-ordered`: +0.5 points, 95% interval [-0.5, +1.5]" in rail["measured"]
    assert cofi["verdict"] == "not reproduced" and "as published" in cofi["claim"]
    assert warm["verdict"] == verdict and "first 50% of the steps" in warm["claim"]
    assert ch2.claims({}, warmup=0.5) == []  # nothing compared, nothing claimed


def test_ch2_tail_gain_is_what_the_last_fifth_of_the_steps_added():
    curve = ((32, 70.0), (64, 80.0), (96, 84.0), (128, 85.0), (160, 85.4))
    points = [{"step": s, "accuracy": a} for s, a in curve]
    assert ch2.tail_gain(points) == pytest.approx(0.4)  # step 160 minus step 128 (= 80% of 160)
    assert ch2.tail_gain(points[3:4]) is None  # one point: nothing before the last fifth
    assert ch2.tail_gain([]) is None


def ch2_record():
    """A consistent record of two strategies and CoFi's weights over three seeds."""
    params = {"strategies": ["kd-only", "random-ordered", "fixed-ordered"], "train_seeds": [0, 1, 2],
              "cofi_weight_seeds": [0, 1], "cofi_warmup_seeds": [], "cofi_warmup": 0.5, "curve_every": 0}
    accuracy = {"kd-only": [85.0, 86.0, 85.5], "random-ordered": [85.2, 85.9, 86.1],
                "fixed-ordered": [84.0, 85.0, 84.4]}
    runs = {f"{s}/seed{i}": {"accuracy": a} for s, values in accuracy.items() for i, a in enumerate(values)}
    runs |= {f"fixed-ordered/seed{i}/cofi-weights": {"accuracy": a} for i, a in enumerate((50.9, 51.2))}
    per_seed, seeds_of = ch2.seed_accuracies(params, runs)
    table = {n: {"mean": float(np.mean(v)), "seeds": seeds_of[n]} for n, v in per_seed.items()}
    comparisons = ch2.comparisons(per_seed, seeds_of)
    results = {"runs": runs, "strategies": {k: v for k, v in table.items() if "/" not in k},
               "variants": {k: v for k, v in table.items() if "/" in k}, "comparisons": comparisons}
    return {"parameters": params, "results": results, "claims": ch2.claims(comparisons, 0.5)}


def test_ch2_record_check_accepts_a_consistent_record_and_names_what_moved():
    record = ch2_record()
    assert set(record["results"]["comparisons"]) == {
        "random-ordered vs kd-only", "fixed-ordered vs kd-only", "random-ordered vs fixed-ordered",
        "fixed-ordered/cofi-weights vs kd-only"}
    assert ch2.check_record(record) == []
    record["results"]["runs"]["kd-only/seed1"]["accuracy"] = 90.0
    problems = ch2.check_record(record)
    assert "the summary of kd-only is not the mean of its runs" in problems
    assert "the comparisons are not what the runs give" in problems
    del record["results"]["runs"]["random-ordered/seed2"]
    assert ch2.check_record(record) == ["run 'random-ordered/seed2' is missing"]


def test_ch2_alignment_summary_counts_pairs_and_averages_the_last_matrices():
    log = [
        {"step": 1, "teacher_layers": [0, 2], "alignment": [0, 1], "loss_matrix": [[1.0, 2.0], [3.0, 4.0]]},
        {"step": 2, "teacher_layers": [1, 2], "alignment": [0, 1], "loss_matrix": [[9.0, 9.0], [9.0, 9.0]]},
        {"step": 3, "teacher_layers": [0, 2], "alignment": [1, 1], "loss_matrix": [[3.0, 4.0], [5.0, 6.0]]},
    ]
    summary = ch2.summarise_alignment(log, teacher_depth=3, student_depth=2)
    assert summary["pairs"] == [[1, 1], [1, 0], [0, 3]]
    assert summary["last_teacher_layers"] == [0, 2] and summary["last_alignment"] == [1, 1]
    # steps 1 and 3 chose the final step's layers: their mean; step 2's layers differ
    assert summary["last_matrix"] == [[2.0, 3.0], [4.0, 5.0]]
    assert [s["step"] for s in summary["per_step"]] == [1, 2, 3]
    assert ch2.summarise_alignment([], 3, 2) == {"pairs": [[0, 0], [0, 0], [0, 0]]}


# --- chapter 3: distilpythia's claims and the lambada rise ------------------------------

BASE = np.array([-5.0, -6.0, -5.5, -6.5, -4.0, -7.0])
NOISE = np.array([0.1, -0.1, 0.05, -0.05, 0.02, -0.02])


def lm_model(shift, accuracy=60.0, entropy=3.5, nll=3.9, perplexity=50.0):
    """A model whose lambada log-likelihoods are the base's + `shift` (+ a little noise)."""
    loglikelihoods = (BASE + shift + (NOISE if shift else 0)).tolist()
    return {
        "heldout": {"perplexity": perplexity, "entropy": entropy, "nll": nll},
        "zero_shot": {
            "piqa": {"acc": accuracy, "acc_stderr": 1.0},
            "lambada": {"doc_ids": list(range(len(BASE))), "loglikelihoods": loglikelihoods},
        },
    }


def ch3_verdicts(models):
    return {v["claim"].split(" ")[1]: v["verdict"] for v in ch3.claim_verdicts({"models": models})}


def test_ch3_lambada_ratio_is_the_paired_perplexity_ratio():
    models = {"a": lm_model(-1.0), "b": lm_model(0.0)}
    ratio = ch3.lambada_ratio(models, "a", "b")  # a's last words are e^-1 as likely: perplexity e x
    assert ratio["ratio"] == pytest.approx(math.e ** (1 - NOISE.mean()))
    assert ratio["low"] > 1 and ratio["worse_share"] == 1.0
    assert ch3.lambada_ratio(models, "a", "missing") is None


def test_ch3_claims_reproduced_when_distillation_hurts_lambada():
    models = {"student-base": lm_model(0.0), "kd-padded": lm_model(-1.0), "kd-packed": lm_model(-1.0)}
    assert ch3_verdicts(models) == {
        "distilled": "reproduced",  # nothing clearly better than the base
        "raises": "reproduced",  # both perplexities clearly above the base's
        "constant-length": "reproduced",  # packed no better than padded
    }


def test_ch3_claims_not_reproduced_when_distillation_helps():
    models = {"student-base": lm_model(0.0), "kd-padded": lm_model(1.0), "kd-packed": lm_model(2.0)}
    assert ch3_verdicts(models) == {
        "distilled": "not reproduced",
        "raises": "not reproduced",  # both clearly below
        "constant-length": "not reproduced",  # packed clearly better
    }


def test_ch3_claims_inconclusive_or_decided_by_accuracy():
    mixed = {"student-base": lm_model(0.0), "kd-padded": lm_model(-1.0), "kd-packed": lm_model(1.0)}
    assert ch3_verdicts(mixed)["raises"] == "inconclusive"
    # lambada no different, but piqa 10 points above the base (stderr 1 each): clearly better
    better = {"student-base": lm_model(0.0), "kd-padded": lm_model(0.0, accuracy=70.0)}
    (claim,) = ch3.claim_verdicts({"models": better})[:1]
    assert claim["verdict"] == "not reproduced" and "kd-padded/piqa" in claim["evidence"]
    within = {"student-base": lm_model(0.0), "kd-padded": lm_model(0.0, accuracy=62.0)}
    assert ch3.claim_verdicts({"models": within})[0]["verdict"] == "reproduced"  # 2 < 2 x 1.41


def test_ch3_lambada_findings_reach_every_outcome():
    models = {
        "kd-padded": lm_model(-2.0),  # worse than packed: padding supported
        "kd-packed": lm_model(-1.0, entropy=3.9, nll=3.7),  # flatter: entropy - NLL 0.2
        "clm-packed": lm_model(-1.0, entropy=3.5, nll=3.5),  # same lambada as kd-packed
    }
    findings = {f["cause"].split(" ")[0]: f["verdict"] for f in ch3.lambada_findings({"models": models})}
    assert findings == {
        "padding": "supported",
        "distillation": "not supported",
        "the": "not tested",  # no T = 1 run
        "a": "supported",  # 0.2 - 0.0 > 0.05 nats flatter
    }


# --- chapter 4: module replacement ----------------------------------------------------


def theseus_results(per_method, predecessor=70.5):
    runs = {
        f"{m}/L3/seed{s}": {"method": m, "layers": 3, "accuracy": a}
        for m, accs in per_method.items()
        for s, a in enumerate(accs)
    }
    return {"runs": runs, "predecessor": {"accuracy": predecessor, "layers": 6}}


def ch4_verdicts(per_method, predecessor=70.5):
    seeds = list(range(len(next(iter(per_method.values())))))
    found = ch4.claim_verdicts(theseus_results(per_method, predecessor), 3, seeds)
    return {v["claim"].split(" ")[0]: v["verdict"] for v in found}


def test_ch4_verdicts_when_every_claim_holds():
    verdicts = ch4_verdicts(
        {
            "finetune-first": [60.0, 61.0, 59.0, 60.5, 59.5],
            "extract-finetune": [60.2, 60.8, 59.4, 60.0, 59.6],  # no better than direct
            "theseus-constant": [50.0, 60.0, 70.0, 55.0, 65.0],  # binary: seeds far apart
            "theseus-linear": [52.0, 68.0, 60.0, 58.0, 64.0],
            "proportional-0.5": [69.8, 70.3, 69.6, 70.1, 69.7],  # tight, 0.6 below, above extraction
        }
    )
    assert verdicts == {"binary": "reproduced", "proportional": "reproduced", "fine-tuning": "reproduced",
                        "module": "reproduced"}
    found = ch4.claim_verdicts(theseus_results({
        "extract-finetune": [60.2, 60.8, 59.4, 60.0, 59.6],
        "proportional-0.5": [69.8, 70.3, 69.6, 70.1, 69.7]}), 3, list(range(5)))
    near, needed = found
    # gap 70.5 - 69.9 = 0.6; sd 0.29 over 5 seeds, se 0.130, t(0.975; 4) = 2.776: 0.6 +- 0.36
    assert "(95% interval 0.2 to 1.0 over 5 seeds)" in near["evidence"]
    # 69.9 - 60.0 = 9.9; se sqrt(0.085 / 5 + 0.3 / 5) = 0.278 on Welch's 6.1 df, t = 2.44: +- 0.68
    assert "95% interval [+9.2, +10.6]" in needed["evidence"]


def test_ch4_verdicts_when_no_claim_holds():
    verdicts = ch4_verdicts(
        {
            "finetune-first": [50.0, 51.0, 49.0],
            "extract-finetune": [60.0, 61.0, 59.0],  # extraction clearly beats direct fine-tuning
            "theseus-constant": [60.0, 60.5, 59.5],  # binary tighter than proportional
            "proportional-0.5": [50.0, 58.0, 54.0],  # and below extraction
        }
    )
    assert verdicts == {
        "binary": "not reproduced",
        "proportional": "not reproduced",  # 16.5 points below the predecessor
        "fine-tuning": "not reproduced",
        "module": "not reproduced",
    }


def test_ch4_record_check_accepts_a_consistent_record_and_names_what_moved():
    per_method = {"extract-finetune": [60.0, 62.0, 58.0], "theseus-constant": [59.0, 62.0, 56.0],
                  "proportional-0.5": [61.0, 63.0, 59.0]}
    results = theseus_results(per_method)
    results["methods"] = {f"{m}/L3": {"mean": float(np.mean(v))} for m, v in per_method.items()}
    params = {"successor_layers": [3], "methods": ["extract-finetune", "theseus-constant", "proportional"],
              "proportional_k": [0.5], "train_seeds": [0, 1, 2]}
    claims = [{"verdict": v["verdict"]} for v in ch4.claim_verdicts(results, 3, [0, 1, 2])]
    record = {"parameters": params, "results": results, "claims": claims}
    assert ch4.check_record(record) == []
    results["runs"]["proportional-0.5/L3/seed2"]["accuracy"] = 90.0  # now it beats extraction
    assert ch4.check_record(record) == [
        "the summary of proportional-0.5/L3 is not the mean of its runs",
        "the claims are not what the runs give",
    ]
    del results["runs"]["theseus-constant/L3/seed1"]
    assert ch4.check_record(record) == ["run theseus-constant/L3/seed1 is missing"]


def test_ch4_verdicts_inconclusive_within_the_noise():
    verdicts = ch4_verdicts(
        {
            "extract-finetune": [60.0, 62.0, 58.0],
            "theseus-constant": [59.0, 62.0, 56.0],  # a little wider: ratio > 1, p well above 0.05
            "proportional-0.5": [61.0, 63.0, 59.0],  # above extraction, not significantly
        }
    )
    assert verdicts["binary"] == "inconclusive" and verdicts["module"] == "inconclusive"
    flat = ch4_verdicts({"theseus-constant": [50.0, 60.0, 55.0], "proportional-0.5": [60.0, 60.0, 60.0]})
    assert flat["binary"] == "inconclusive"  # proportional add has no spread: no ratio to test


# CoFi's published ordered matching, on hand-made 4 x 6 layer-loss matrices (rows: teacher
# layers bottom to top; columns: student layers).
AGREES = [
    [0.9, 0.1, 0.8, 0.8, 0.8, 0.8],
    [0.9, 0.8, 0.1, 0.8, 0.8, 0.8],
    [0.9, 0.8, 0.8, 0.1, 0.8, 0.8],
    [0.9, 0.8, 0.8, 0.8, 0.8, 0.1],
]
TOP_PREFERS_THE_BOTTOM = [
    [0.5, 0.4, 0.3, 0.2, 0.2, 0.2],
    [0.5, 0.4, 0.3, 0.2, 0.2, 0.2],
    [0.5, 0.4, 0.3, 0.2, 0.2, 0.2],
    [0.1, 0.4, 0.3, 0.2, 0.9, 0.9],
]


def test_cofi_ordered_matching_worked_examples():
    assert ch2.cofi_ordered_alignment(AGREES) == [1, 2, 3, 5]
    # the top teacher layer takes student 0; nothing is left below it, so it is repeated
    assert ch2.cofi_ordered_alignment(TOP_PREFERS_THE_BOTTOM) == [0, 0, 0, 0]
    # every student layer pruned: the first row falls back to the hard-coded 12, past the last
    assert ch2.cofi_ordered_alignment(AGREES, existing=[False] * 6) == [12, 12, 12, 12]
    # student 5 pruned: the top row's best left is 1 (ties go to the lower index), then 0 only
    assert ch2.cofi_ordered_alignment(AGREES, existing=[True] * 5 + [False]) == [0, 0, 0, 1]


def test_matching_fallbacks_counts_each_defect_against_the_runs_matching():
    log = [
        {"loss_matrix": AGREES, "alignment": [1, 2, 3, 5]},
        {"loss_matrix": TOP_PREFERS_THE_BOTTOM, "alignment": [0, 1, 2, 3]},
        {"loss_matrix": AGREES, "alignment": [1, 2, 3, 4]},
    ]
    counts = ch2.matching_fallbacks(log)
    assert (counts["steps"], counts["repeats"], counts["past_last"], counts["differs"]) == (3, 1, 0, 2)
    assert counts["differs_share"] == pytest.approx(2 / 3)
    pruned = ch2.matching_fallbacks(log[:1], existing=[False] * 6)
    assert (pruned["repeats"], pruned["past_last"]) == (1, 1)


def test_ch2_term_sizes_split_shared_and_own_parameters():
    terms = {"kd": torch.tensor(0.5), "layer": torch.tensor(4.0)}
    grads = {
        "kd": {"encoder": torch.tensor([3.0, 0.0]), "classifier": torch.tensor([2.0]), "projection": None},
        "layer": {"encoder": torch.tensor([3.0, 4.0]), "classifier": None, "projection": torch.tensor([6.0])},
    }
    row = ch2._term_sizes(terms, grads)
    assert (row["kd"], row["layer"]) == (0.5, 4.0)
    assert (row["kd_grad_shared"], row["kd_grad_own"]) == (3.0, 2.0)
    assert (row["layer_grad_shared"], row["layer_grad_own"]) == (5.0, 6.0)
    assert row["cosine_shared"] == pytest.approx(9.0 / 15.0)


def test_ch2_layer_scales_find_an_outlier_dimension():
    states = torch.tensor([[[3.0, 0.0, 1.0]], [[-3.0, 0.0, 1.0]]])  # [tokens, layers, width]
    (layer,) = ch2._layer_scales(states, top=2)
    assert layer["rms"] == pytest.approx(math.sqrt(20.0 / 6.0))
    assert layer["top_dims"] == [0, 2]
    assert layer["top_over_rms"] == pytest.approx([3.0 / math.sqrt(20 / 6), 1.0 / math.sqrt(20 / 6)])
