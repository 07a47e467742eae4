"""Retrieval metrics (R@K, median / mean rank), multi-sentence (MSVD) metrics and DSL.

Conventions (docs/evaluation.md, docs/reference-differences.md #8, #9):
- ties never help: a query whose true candidate is tied with `ties` others and beaten by
  `higher` is ranked as under random tie-breaking, where the true candidate is equally
  likely at each of the ties + 1 positions. R@K = clamp((K - higher) / (ties + 1), 0, 1)
  (the probability that it lands in the top K) and the rank used by MdR / MnR is the
  expected one, 1 + higher + ties / 2. A constant similarity matrix scores chance;
- a NaN anywhere in the similarity matrix is an error (a NaN true score would make the query
  unrankable, a NaN elsewhere would silently count as "not higher"), reported with its
  query index so the broken row can be found;
- DSL ("inverted softmax") is reported beside the plain numbers, never instead of them, and
  labelled as transductive because it normalises over the whole test query bank.
- QB-Norm (querybank normalisation with the dynamic inverted softmax, Bogolin et al., CVPR
  2022) normalises over a bank of training queries instead: not transductive; text-to-video
  only (its bank holds queries, i.e. texts). Reported beside the plain numbers, labelled
  with its bank.
"""
from __future__ import annotations

import math

import numpy as np
import torch

RECALL_AT = (1, 5, 10, 50)
PLAIN = "plain"
DSL = "dsl (uses the whole test query bank, transductive)"
QBNORM = "QB-Norm (dynamic inverted softmax over a bank of training queries)"
DIRECTIONS = ("t2v", "v2t")
TABLE_COLUMNS = (("R1", "R@1"), ("R5", "R@5"), ("R10", "R@10"), ("MdR", "MdR"), ("MnR", "MnR"))


def _as_matrix(sim, name: str = "sim") -> torch.Tensor:
    """A 2-D floating torch tensor (numpy arrays are wrapped without a copy) with no NaN."""
    sim = torch.as_tensor(sim)
    if sim.ndim != 2:
        raise ValueError(f"{name} must be a 2-D queries x candidates matrix, got shape {tuple(sim.shape)}")
    if not sim.is_floating_point():
        sim = sim.double()
    nan = torch.isnan(sim)
    if nan.any():
        query, candidate = (int(i) for i in nan.nonzero()[0])
        raise ValueError(
            f"{name} holds {int(nan.sum())} NaN score(s), the first at query {query}, candidate "
            f"{candidate}; NaN scores cannot be ranked. Check the model outputs for this query "
            f"(e.g. a zero-norm feature or an overflow in half precision).")
    return sim


TIE_RULE = ("ties never help: the true candidate is placed at random among the candidates tied "
            "with it, so R@K = clamp((K - higher) / (ties + 1), 0, 1) per query and MdR / MnR use "
            "the expected rank 1 + higher + ties / 2 (higher: candidates scored strictly above it)")


def query_ranks(sim, target=None) -> torch.Tensor:
    """One expected rank per query (float64): 1 + higher + ties / 2 (see `TIE_RULE`).

    sim:    [Q, C] scores, queries x candidates (torch or numpy).
    target: [Q] index of each query's true candidate; None means the diagonal (Q == C).
    A query tied with every one of C candidates gets (C + 1) / 2, not 1. Any NaN (true
    score or not) raises ValueError naming the query.
    """
    higher, ties = _rank_counts(_as_matrix(sim), target)
    return expected_rank(higher, ties)


def _rank_counts(sim: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor]:
    """(higher, ties) per query of a matrix already checked by `_as_matrix`: the number of
    candidates scored strictly above the true one, and the number scored equal to it."""
    n_queries, n_candidates = sim.shape
    if target is None:
        if n_queries != n_candidates:
            raise ValueError(
                f"sim has shape {tuple(sim.shape)}: without `target` the true pairs are the "
                f"diagonal, which needs a square matrix. For several captions per video use "
                f"multi_sentence_metrics(sim, text_video).")
        target = torch.arange(n_queries, device=sim.device)
    target = torch.as_tensor(target, device=sim.device).long()
    if target.shape != (n_queries,):
        raise ValueError(f"target must have one entry per query ({n_queries}), got shape {tuple(target.shape)}")
    if n_queries and (target.min() < 0 or target.max() >= n_candidates):
        raise ValueError(f"target indices must lie in [0, {n_candidates}), got "
                         f"[{int(target.min())}, {int(target.max())}]")
    true_score = sim.gather(1, target[:, None])                        # [Q, 1]
    higher = (sim > true_score).sum(dim=1)                             # [Q]
    ties = (sim == true_score).sum(dim=1) - 1                          # [Q], the true one left out
    return higher, ties


def expected_rank(higher, ties) -> torch.Tensor:
    """Expected rank under random tie-breaking: 1 + higher + ties / 2 (float64)."""
    return 1 + torch.as_tensor(higher).double() + torch.as_tensor(ties).double() / 2


def _recall(higher: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """Per query, the probability that the true candidate lands in the top k: clamp((k -
    higher) / (ties + 1), 0, 1) (float64)."""
    return ((k - higher.double()) / (ties.double() + 1)).clamp(0, 1)


def query_recall(sim, k: int = 1, target=None) -> torch.Tensor:
    """[Q] per-query R@k hits (float64 in [0, 1], fractional only for ties, `TIE_RULE`): their
    mean times 100 is R@k. What a paired comparison of two scorings resamples.

    sim, target: as in `query_ranks` (target None means the diagonal)."""
    return _recall(*_rank_counts(_as_matrix(sim), target), k)


def metrics_from_counts(higher, ties) -> dict:
    """R@1/5/10/50 (percent; each query counts clamp((K - higher) / (ties + 1), 0, 1)),
    MdR (median expected rank) and MnR (mean expected rank), by `TIE_RULE`."""
    higher, ties = torch.as_tensor(higher).double(), torch.as_tensor(ties).double()
    if higher.numel() == 0:
        raise ValueError("no queries to score: the similarity matrix has no rows")
    out = {f"R{k}": float(_recall(higher, ties, k).mean() * 100) for k in RECALL_AT}
    ranks = expected_rank(higher, ties).cpu().numpy()
    out["MdR"] = float(np.median(ranks))                              # mean of the middle two when even
    out["MnR"] = float(ranks.mean())
    return out


def _metrics(sim: torch.Tensor, target) -> dict:
    """Metrics of the rows of a checked `sim` against their `target` columns."""
    return metrics_from_counts(*_rank_counts(sim, target))


def retrieval_metrics(sim) -> dict:
    """Metrics of a square [queries, candidates] matrix whose true pairs are on the diagonal.

    Ties are broken at random in expectation (`TIE_RULE`): they never help a query. Any NaN
    in `sim` raises ValueError naming the query. Returns {"R1", "R5", "R10", "R50"
    (percent), "MdR", "MnR"}.
    """
    return _metrics(_as_matrix(sim), None)


def _check_text_video(text_video, n_texts: int, n_videos: int, device) -> torch.Tensor:
    text_video = torch.as_tensor(text_video, device=device).long()
    if text_video.shape != (n_texts,):
        raise ValueError(f"text_video must give the video index of each of the {n_texts} texts "
                         f"(rows of sim), got shape {tuple(text_video.shape)}")
    if n_texts and (text_video.min() < 0 or text_video.max() >= n_videos):
        raise ValueError(f"text_video entries must lie in [0, {n_videos}) (columns of sim), got "
                         f"[{int(text_video.min())}, {int(text_video.max())}]")
    captions_per_video = torch.bincount(text_video, minlength=n_videos)
    if (captions_per_video == 0).any():
        missing = captions_per_video.eq(0).nonzero()[:5, 0].tolist()
        raise ValueError(f"videos {missing} (columns of sim) have no caption in text_video; every "
                         f"test video needs at least one caption to be ranked video-to-text")
    return text_video


def group_best_scores(sim, text_video) -> torch.Tensor:
    """[videos, groups]: for each video (query) the best score over each caption group.

    Group g holds the captions of video g, so the true group of video v is g = v
    (a segment max over the text axis, no loop over queries).
    """
    return _group_best_scores(_as_matrix(sim), text_video)


def _group_best_scores(sim: torch.Tensor, text_video) -> torch.Tensor:
    """`group_best_scores` of a matrix already checked by `_as_matrix`."""
    n_texts, n_videos = sim.shape
    text_video = _check_text_video(text_video, n_texts, n_videos, sim.device)
    best = sim.new_full((n_videos, n_videos), -math.inf)               # [groups, videos]
    best.scatter_reduce_(0, text_video[:, None].expand(n_texts, n_videos), sim,
                         reduce="amax", include_self=True)
    return best.t()                                                    # [videos, groups]


def _t2v_metrics(sim: torch.Tensor, text_video) -> dict:
    """Text-to-video: rank the rows of a checked `sim` [texts, videos]."""
    return _metrics(sim, text_video)


def _v2t_metrics(sim: torch.Tensor, text_video) -> dict:
    """Video-to-text: rank the rows of a checked `sim`ᵀ, or of the caption-group maxima (MSVD)."""
    if text_video is None:
        return _metrics(sim.t(), None)
    return _metrics(_group_best_scores(sim, text_video), None)


def multi_sentence_metrics(sim, text_video) -> dict:
    """Metrics when a video has several captions (MSVD), as docs/evaluation.md defines them.

    sim:        [texts, videos] scores, each video encoded once.
    text_video: [texts] index of each caption's video (column of `sim`).
    t2v: each caption ranked against all videos, target its own video.
    v2t: each video ranked against caption groups (best caption score per group), target
    its own group. Same tie and NaN rules as `retrieval_metrics`.
    """
    sim = _as_matrix(sim)
    return {"t2v": _t2v_metrics(sim, text_video), "v2t": _v2t_metrics(sim, text_video)}


def dsl(sim, temp: float = 0.01, dim: int = 0) -> torch.Tensor:
    """Dual softmax ("inverted softmax"): S * softmax(S / temp, dim) * n_texts, in float64.

    dim=0 (text-to-video) normalises each video's column over all test queries; dim=1
    (video-to-text) normalises each text's row over all videos, and is ranked through its
    transpose. It uses the whole test query bank, so results are transductive.
    float64 because S / 0.01 spreads cosines over [-100, 100]: in float32 the softmax of a
    column underflows to exactly 0 for every score ~1 below the column's best (exp(-104)),
    which would turn distinct scores into ties.
    """
    return _dsl(_as_matrix(sim), temp, dim)


def _dsl(sim: torch.Tensor, temp: float, dim: int) -> torch.Tensor:
    """`dsl` of a matrix already checked by `_as_matrix`."""
    if temp <= 0:
        raise ValueError(f"DSL temperature must be > 0, got {temp}")
    sim = sim.double()
    return sim * torch.softmax(sim / temp, dim=dim) * sim.shape[0]


def qb_norm(sim, bank_sim, beta: float = 20.0) -> torch.Tensor:
    """Querybank normalisation with the dynamic inverted softmax (QB-Norm), float64 [Q, V].

    sim:      [Q, V] test queries x gallery videos.
    bank_sim: [B, V] a bank of training queries x the same videos, scored the same way.
    A video is "activated" when it is the top-1 of at least one bank query (a hub that
    many queries retrieve). A test query whose own top-1 is activated has its whole row
    replaced by the inverted softmax over the bank, exp(beta s_qv) / sum_b exp(beta s_bv),
    which lowers the videos the bank retrieves everywhere; the other rows keep their scores.
    Normalised rows are returned as the logarithm of that ratio, beta s_qv -
    logsumexp_b(beta s_bv): the same order within the row, and no overflow or underflow
    (rows are ranked on their own, so plain and normalised rows never meet).
    """
    sim, bank_sim = _as_matrix(sim).double(), _as_matrix(bank_sim, "bank_sim").double()
    if bank_sim.shape[1] != sim.shape[1]:
        raise ValueError(f"bank_sim must score the same {sim.shape[1]} videos as sim, got shape "
                         f"{tuple(bank_sim.shape)}")
    if bank_sim.shape[0] == 0:
        raise ValueError("QB-Norm needs a non-empty query bank (bank_sim has no rows)")
    activated = torch.zeros(sim.shape[1], dtype=torch.bool, device=sim.device)
    activated[bank_sim.argmax(dim=1)] = True                              # [V]
    normalised = beta * sim - torch.logsumexp(beta * bank_sim, dim=0)     # [Q, V]
    dynamic = activated[sim.argmax(dim=1)]                                # [Q] rows whose top-1 is a hub
    return torch.where(dynamic[:, None], normalised, sim)


def evaluate_qbnorm(sim, bank_sim, text_video=None, beta: float = 20.0) -> dict:
    """Text-to-video metrics of `qb_norm(sim, bank_sim, beta)` ({"t2v": {...}}); the true
    pairs as in `evaluate_similarity` (text_video None: the diagonal)."""
    return {"t2v": _t2v_metrics(_as_matrix(qb_norm(sim, bank_sim, beta)), text_video)}


def evaluate_similarity(sim, text_video=None, dsl_temps=(0.01, 0.01)) -> dict:
    """Plain and DSL metrics for both directions of a [texts, videos] matrix.

    text_video: None when the true pairs are the diagonal (one caption per video), else the
    video index of every text (MSVD). dsl_temps: (t2v, v2t) temperatures, or None to skip DSL.
    Returns {PLAIN: {"t2v": {...}, "v2t": {...}}, DSL: {...}} with DSL the labelled key.
    """
    sim = _as_matrix(sim)
    results = {PLAIN: {"t2v": _t2v_metrics(sim, text_video), "v2t": _v2t_metrics(sim, text_video)}}
    if dsl_temps is not None:
        t2v_temp, v2t_temp = dsl_temps
        # checked again: infinite scores turn into NaN under the softmax
        t2v, v2t = _as_matrix(_dsl(sim, t2v_temp, 0)), _as_matrix(_dsl(sim, v2t_temp, 1))
        results[DSL] = {"t2v": _t2v_metrics(t2v, text_video), "v2t": _v2t_metrics(v2t, text_video)}
    return results


def _cell(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    return f"{float(value):.1f}"


def _row(name: str, directions, source: str, suffix: str = "") -> str:
    if not isinstance(directions, dict):
        raise ValueError(f"{source} entry {name!r} must map 't2v'/'v2t' to metric dicts, got {directions!r}")
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"{source} entry {name!r} has unknown keys {sorted(unknown)}; use 't2v' and 'v2t'")
    cells = [_cell((directions.get(d) or {}).get(key)) for d in DIRECTIONS for key, _ in TABLE_COLUMNS]
    return "| " + " | ".join([name + suffix, *cells]) + " |"


def format_table(results: dict, published: dict | None = None) -> str:
    """Markdown table: one row per setting, T2V then V2T R@1 R@5 R@10 MdR MnR.

    results / published: {"setting name": {"t2v": {"R1": .., ...}, "v2t": {...}}}, e.g. the
    output of `evaluate_similarity` or the `published` block of the params file. Published
    rows follow ours, marked "(published)"; missing values are left blank.
    """
    header = ["setting"] + [f"{d.upper()} {label}" for d in DIRECTIONS for _, label in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(name, value, "results") for name, value in results.items()]
    lines += [_row(name, value, "published", " (published)") for name, value in (published or {}).items()]
    return "\n".join(lines)
