"""Retrieval metrics on hand-built similarity matrices with known ranks."""
import math

import numpy as np
import pytest
import torch

from emcl_nb.model.metrics import (
    DSL,
    PLAIN,
    dsl,
    evaluate_qbnorm,
    evaluate_similarity,
    format_table,
    group_best_scores,
    metrics_from_counts,
    multi_sentence_metrics,
    qb_norm,
    query_ranks,
    query_recall,
    retrieval_metrics,
)

# Row i's true score (column i) is beaten by exactly i candidates: ranks 1, 2, 3, 4.
KNOWN_RANKS = torch.tensor([
    [0.9, 0.1, 0.2, 0.3],
    [0.5, 0.4, 0.1, 0.0],
    [0.8, 0.7, 0.6, 0.1],
    [0.9, 0.8, 0.7, 0.6],
])


def test_perfect_matrix_gives_rank_one_everywhere():
    sim = torch.eye(20) + 0.01 * torch.rand(20, 20)
    m = retrieval_metrics(sim)
    assert m == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "R50": 100.0, "MdR": 1.0, "MnR": 1.0}


def test_known_ranks():
    assert query_ranks(KNOWN_RANKS).tolist() == [1, 2, 3, 4]
    m = retrieval_metrics(KNOWN_RANKS)
    assert m["R1"] == 25.0 and m["R5"] == 100.0
    assert m["MdR"] == 2.5 and m["MnR"] == 2.5
    # video-to-text ranks the columns: column j's true score is row j (column 0's 0.9 is
    # tied with row 3's: expected rank 1.5).
    assert query_ranks(KNOWN_RANKS.t()).tolist() == [1.5, 3, 2, 1]


def test_true_score_lowest_gives_last_rank():
    n = 60
    m = retrieval_metrics(-torch.eye(n))                 # diagonal -1, all others 0
    assert m["R1"] == m["R5"] == m["R10"] == m["R50"] == 0.0
    assert m["MdR"] == n and m["MnR"] == n


def test_recall_at_50_counts_ranks_up_to_50():
    n = 100
    # query i: true score 0, i candidates (columns < i) at +1, the rest at -1 -> rank i + 1.
    sim = torch.tril(torch.ones(n, n), diagonal=-1) - torch.triu(torch.ones(n, n), diagonal=1)
    ranks = query_ranks(sim)
    assert ranks.tolist() == list(range(1, n + 1))
    m = retrieval_metrics(sim)
    assert m["R1"] == 1.0 and m["R5"] == 5.0 and m["R10"] == 10.0 and m["R50"] == 50.0
    assert m["MdR"] == 50.5 and m["MnR"] == 50.5


def test_constant_matrix_scores_chance_not_100():
    n = 8
    m = retrieval_metrics(torch.ones(n, n))
    # the true item is equally likely at each of n positions: R@K = K / n, expected rank (n+1)/2
    assert m["R1"] == pytest.approx(100 / n) and m["R5"] == pytest.approx(500 / n)
    assert m["R10"] == m["R50"] == 100.0
    assert m["MdR"] == m["MnR"] == pytest.approx((n + 1) / 2)
    assert query_ranks(torch.ones(n, n)).tolist() == [(n + 1) / 2] * n


def test_all_distinct_scores_give_integer_ranks():
    sim = torch.randperm(36).reshape(6, 6).double()        # no two scores equal
    higher = (sim > sim.diagonal()[:, None]).sum(1)
    assert query_ranks(sim).tolist() == (1 + higher).double().tolist()
    assert retrieval_metrics(sim)["R1"] == pytest.approx(100 * float((higher == 0).double().mean()))


def test_partly_tied_rows_use_the_expected_rank():
    sim = torch.tensor([[0.5, 0.5, 0.9],                  # beaten by 1, tied with 1 -> rank 2.5
                        [0.3, 0.3, 0.3],                  # tied with 2 -> rank 2
                        [0.9, 0.9, 0.1]])                 # beaten by 2 -> rank 3
    assert query_ranks(sim).tolist() == [2.5, 2.0, 3.0]
    m = retrieval_metrics(sim)
    # R@1 per query: clamp((1 - higher) / (ties + 1)) = 0, 1/3, 0; R@5: all 1
    assert m["R1"] == pytest.approx(100 / 9) and m["R5"] == 100.0
    assert m["MdR"] == pytest.approx(2.5) and m["MnR"] == pytest.approx(7.5 / 3)
    # R@2 of the first row: (2 - 1) / 2 = 0.5, from metrics_from_counts directly
    assert metrics_from_counts([1], [1])["R1"] == 0.0
    assert metrics_from_counts([0, 1], [1, 1])["R1"] == pytest.approx(25.0)


def test_per_query_recall_follows_the_tie_rule_and_averages_to_r_at_k():
    sim = torch.tensor([[0.5, 0.5, 0.9],                  # R@1 0, R@2 (2 - 1) / 2
                        [0.3, 0.3, 0.3],                  # R@1 1/3, R@2 2/3
                        [0.9, 0.9, 0.1]])                 # R@1 0, R@2 0
    assert query_recall(sim, 1).tolist() == pytest.approx([0.0, 1 / 3, 0.0])
    assert query_recall(sim, 2).tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert query_recall(KNOWN_RANKS, 1).mean() * 100 == pytest.approx(retrieval_metrics(KNOWN_RANKS)["R1"])
    # several captions per video: each text's target is its own video's column
    assert query_recall(torch.eye(3)[[0, 0, 2]], 1, torch.tensor([0, 1, 2])).tolist() == [1.0, 0.0, 1.0]


def test_multi_sentence_ties_never_help_either():
    # every caption scores the same against every video: chance both ways
    m = multi_sentence_metrics(torch.zeros(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert m["t2v"]["R1"] == pytest.approx(100 / 3) and m["v2t"]["R1"] == pytest.approx(100 / 3)


def test_numpy_and_torch_inputs_agree():
    sim = np.random.default_rng(0).normal(size=(30, 30))
    assert retrieval_metrics(sim) == retrieval_metrics(torch.from_numpy(sim))


def test_nan_true_score_raises_naming_the_query():
    sim = torch.rand(4, 4)
    sim[2, 2] = math.nan
    with pytest.raises(ValueError, match="query 2"):
        retrieval_metrics(sim)


def test_nan_elsewhere_raises_too():
    sim = torch.eye(4)
    sim[1, 3] = math.nan
    with pytest.raises(ValueError, match="query 1, candidate 3"):
        retrieval_metrics(sim)


def test_non_square_without_targets_is_refused():
    with pytest.raises(ValueError, match="multi_sentence_metrics"):
        retrieval_metrics(torch.rand(6, 3))


# ---- several captions per video (MSVD) ----

def test_multi_sentence_perfect_gives_100_both_ways_with_shuffled_captions():
    # Captions not stored video by video: a grouping off by one would not score 100.
    text_video = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 3])
    sim = torch.zeros(len(text_video), 4)
    sim[torch.arange(len(text_video)), text_video] = 1.0
    out = multi_sentence_metrics(sim, text_video)
    assert out["t2v"]["R1"] == 100.0 and out["v2t"]["R1"] == 100.0
    assert out["t2v"]["MdR"] == 1.0 and out["v2t"]["MnR"] == 1.0


def test_multi_sentence_known_ranks():
    text_video = [0, 0, 1, 1]
    sim = torch.tensor([[0.9, 0.1],                       # caption of video 0: rank 1
                        [0.2, 0.8],                       # caption of video 0: rank 2
                        [0.3, 0.4],                       # caption of video 1: rank 1
                        [0.7, 0.6]])                      # caption of video 1: rank 2
    # video 0 sees group maxima (0.9, 0.7) -> rank 1; video 1 sees (0.8, 0.6) -> rank 2.
    torch.testing.assert_close(group_best_scores(sim, text_video), torch.tensor([[0.9, 0.7], [0.8, 0.6]]))
    out = multi_sentence_metrics(sim, text_video)
    assert out["t2v"]["R1"] == 50.0 and out["t2v"]["MnR"] == 1.5
    assert out["v2t"]["R1"] == 50.0 and out["v2t"]["MdR"] == 1.5


def test_multi_sentence_rejects_video_without_caption():
    with pytest.raises(ValueError, match=r"videos \[1\]"):
        multi_sentence_metrics(torch.rand(3, 3), [0, 2, 2])


# ---- DSL ----

def test_dsl_matches_the_formula_in_float64():
    sim = torch.rand(7, 5, dtype=torch.float64)
    expected = sim * torch.softmax(sim / 0.05, dim=0) * 7
    torch.testing.assert_close(dsl(sim, 0.05, dim=0), expected)
    assert dsl(sim.float(), 0.01).dtype == torch.float64


def test_dsl_keeps_scores_that_float32_would_underflow():
    column = torch.tensor([[1.0], [-0.9], [-1.0]])        # exp(-190), exp(-200) vanish in float32
    out = dsl(column, 0.01, dim=0)
    assert (out != 0).all() and out[1, 0] != out[2, 0]


def test_dsl_demotes_a_hub_video_for_t2v_and_a_hub_text_for_v2t():
    # Video 2 scores high for every text: text 0 ranks it above its own video.
    hub_video = torch.tensor([[0.50, 0.10, 0.60],
                              [0.10, 0.50, 0.40],
                              [0.10, 0.10, 0.70]])
    out = evaluate_similarity(hub_video, dsl_temps=(0.01, 0.01))
    assert out[PLAIN]["t2v"]["R1"] == pytest.approx(200 / 3)
    assert out[DSL]["t2v"]["R1"] == 100.0
    # Transposed: text 2 is a hub; video 0 ranks it above its own text until v2t DSL.
    out = evaluate_similarity(hub_video.t(), dsl_temps=(0.01, 0.01))
    assert out[PLAIN]["v2t"]["R1"] == pytest.approx(200 / 3)
    assert out[DSL]["v2t"]["R1"] == 100.0
    assert "transductive" in DSL


# ---- QB-Norm ----

def hub_case():
    """Video 0 is a hub: it steals test queries 1-3 from their own videos (its column is high
    everywhere) and is the top-1 of every training query in the bank."""
    sim = torch.tensor([[0.90, 0.10, 0.10, 0.10],
                        [0.80, 0.70, 0.10, 0.10],
                        [0.80, 0.10, 0.70, 0.10],
                        [0.80, 0.10, 0.10, 0.70]])
    bank = torch.tensor([[0.85, 0.20, 0.10, 0.10],
                         [0.80, 0.10, 0.30, 0.10],
                         [0.90, 0.10, 0.10, 0.40]])
    return sim, bank


def test_qb_norm_gives_the_queries_a_hub_stole_back_to_their_videos():
    sim, bank = hub_case()
    assert evaluate_similarity(sim, dsl_temps=None)[PLAIN]["t2v"]["R1"] == 25.0      # the hub wins 3 of 4
    assert evaluate_qbnorm(sim, bank, beta=20.0)["t2v"]["R1"] == 100.0
    assert qb_norm(sim, bank).argmax(dim=1).tolist() == [0, 1, 2, 3]


def test_qb_norm_is_the_dynamic_inverted_softmax():
    """Rows whose top-1 is the top-1 of some bank query ("activated") become exp(beta s) /
    sum over the bank of exp(beta s_bank) (as logs); the others keep their scores."""
    g = torch.Generator().manual_seed(0)
    sim, bank, beta = torch.rand(9, 6, generator=g, dtype=torch.float64), torch.rand(5, 6, generator=g,
                                                                                        dtype=torch.float64), 7.0
    activated = set(bank.argmax(dim=1).tolist())
    out = qb_norm(sim, bank, beta)
    ratio = torch.exp(beta * sim) / torch.exp(beta * bank).sum(dim=0)                  # [Q, V]
    dynamic = [q for q in range(9) if int(sim[q].argmax()) in activated]
    assert 0 < len(dynamic) < 9                                                         # both kinds of rows
    for q in range(9):
        expected = torch.log(ratio[q]) if q in dynamic else sim[q]
        torch.testing.assert_close(out[q], expected)
        if q in dynamic:                                                                # same order as the ratio
            assert out[q].argsort().tolist() == ratio[q].argsort().tolist()


def test_qb_norm_keeps_a_row_whose_top_video_no_bank_query_retrieves():
    sim, bank = hub_case()
    bank = bank[:, [1, 0, 2, 3]]                      # now the bank's top-1 is video 1 for every query
    out = qb_norm(sim, bank)
    torch.testing.assert_close(out[[0, 2, 3]], sim[[0, 2, 3]].double())   # their top-1 (video 0) is not activated
    with pytest.raises(ValueError, match="same 4 videos"):
        qb_norm(sim, bank[:, :3])
    with pytest.raises(ValueError, match="non-empty"):
        qb_norm(sim, bank[:0])


def test_evaluate_similarity_multi_sentence_and_no_dsl():
    text_video = torch.tensor([1, 0, 1, 2, 0])
    sim = torch.rand(5, 3) * 0.1
    sim[torch.arange(5), text_video] = 0.9
    out = evaluate_similarity(sim, text_video)
    assert {out[key][d]["R1"] for key in (PLAIN, DSL) for d in ("t2v", "v2t")} == {100.0}
    assert list(evaluate_similarity(sim, text_video, dsl_temps=None)) == [PLAIN]


# ---- table ----

def test_format_table_rows_and_blank_published_values():
    results = {PLAIN: {"t2v": retrieval_metrics(KNOWN_RANKS), "v2t": retrieval_metrics(KNOWN_RANKS.t())}}
    published = {"paper": {"t2v": {"R1": 46.8}}}
    lines = format_table(results, published).splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["setting", "T2V R@1", "T2V R@5", "T2V R@10", "T2V MdR", "T2V MnR",
                      "V2T R@1", "V2T R@5", "V2T R@10", "V2T MdR", "V2T MnR"]
    ours = [c.strip() for c in lines[2].strip("|").split("|")]
    assert ours == [PLAIN, "25.0", "100.0", "100.0", "2.5", "2.5", "37.5", "100.0", "100.0", "1.8", "1.9"]
    paper = [c.strip() for c in lines[3].strip("|").split("|")]
    assert paper == ["paper (published)", "46.8"] + [""] * 9


def test_format_table_rejects_a_malformed_published_entry():
    with pytest.raises(ValueError, match="'paper'"):
        format_table({}, {"paper": {"T2V": {"R1": 46.8}}})
