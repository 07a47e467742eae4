"""Statistics of the ablation grid: spread over training seeds and paired bootstrap intervals.

A variant is compared with its baseline on the same test queries. Two sources of noise:
- the training seed: reported as mean ± std over seeds of each arm's score (`spread`);
- the finite set of test queries: a paired bootstrap over queries (`paired_bootstrap`).

Per-query scores are what a retrieval metric averages: for R@1 each query's probability of
ranking its true candidate first under the project's tie rule (metrics.TIE_RULE), so the
mean over queries times 100 is the reported R@1.
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of per-seed values."""
    mean: float
    std: float
    values: tuple[float, ...]


def spread(values) -> Spread:
    """Mean ± sample std over seeds (an empty list is an error: there is nothing to report)."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("spread needs at least one value (one per seed)")
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)


@dataclass(frozen=True)
class PairedDifference:
    """Variant minus baseline, in the units of the per-query scores times `scale`.

    diff:        mean over seeds of the per-seed differences on all queries;
    per_seed:    each seed's difference (variant and baseline trained with that seed);
    std:         sample std of `per_seed` (the seed-to-seed spread of the difference);
    low, high:   the `confidence` paired bootstrap interval of `diff` over test queries;
    significant: the interval excludes 0.
    """
    diff: float
    per_seed: tuple[float, ...]
    std: float
    low: float
    high: float
    significant: bool
    n_queries: int
    samples: int
    confidence: float


def paired_bootstrap(variant, baseline, *, samples: int = BOOTSTRAP_SAMPLES,
                     confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED,
                     scale: float = 100.0) -> PairedDifference:
    """Paired bootstrap interval of variant - baseline over test queries, seeds pooled.

    variant, baseline: [seeds, queries] per-query scores (a 1-D array is one seed); row s
    of both comes from the same training seed, column q from the same test query.
    Each bootstrap sample draws Q query indices with replacement (one draw shared by both
    arms and by every seed), computes each seed's difference of means on those queries and
    averages the differences over seeds. The interval is the percentile interval
    ((1 - confidence) / 2 and (1 + confidence) / 2 quantiles) of these averages; it
    reflects the choice of test queries for the given trained models, not the seed-to-seed
    spread, which `std` reports. Averaging over seeds under shared indices equals
    resampling the per-query difference averaged over seeds, which is how it is computed.
    `scale` turns the mean of per-query scores into the reported unit (100: percent).
    """
    variant, baseline = _as_seeds_by_queries(variant, "variant"), _as_seeds_by_queries(baseline, "baseline")
    if variant.shape != baseline.shape:
        raise ValueError(f"variant and baseline must score the same seeds and queries, got shapes "
                         f"{variant.shape} and {baseline.shape}; pair each variant run with the "
                         f"baseline trained with the same seed")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    per_query = (variant - baseline).mean(axis=0) * scale                     # [Q]
    per_seed = (variant - baseline).mean(axis=1) * scale                      # [S]
    n_queries = per_query.shape[0]
    resampled = per_query[_bootstrap_draws(seed, samples, n_queries)].mean(axis=1)   # [samples]
    tail = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(resampled, (tail, 1 - tail)))
    return PairedDifference(float(per_query.mean()), tuple(float(v) for v in per_seed),
                            spread(per_seed).std, low, high, bool(low > 0 or high < 0),
                            n_queries, samples, confidence)


@functools.lru_cache(maxsize=2)
def _bootstrap_draws(seed: int, samples: int, n_queries: int) -> np.ndarray:
    """[samples, n_queries] query indices drawn with replacement from `seed`: the same for
    every question of a grid (same seed, samples and queries), so drawn once (read-only)."""
    draws = np.random.default_rng(seed).integers(0, n_queries, size=(samples, n_queries))
    draws.flags.writeable = False
    return draws


def _as_seeds_by_queries(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None]
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"{name} must be [seeds, queries] per-query scores with at least one of "
                         f"each, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} holds non-finite per-query scores; a query score must be a number")
    return scores


def format_spread(mean: float, std: float, n: int, digits: int = 1, *, signed: bool = False) -> str:
    """"mean ± std" over `n` seeds at `digits` decimals; the mean alone for one seed (no
    spread to report: no "± 0.0" that reads as one). `signed`: "+" before a positive mean
    (a difference)."""
    shown = f"{mean:{'+' if signed else ''}.{digits}f}"
    return shown if n < 2 else f"{shown} ± {std:.{digits}f}"


def verdict(difference: PairedDifference) -> str:
    return "significant" if difference.significant else "not significant"


def sentence(question: str, difference: PairedDifference, unit: str = "points") -> str:
    """'<question>: +x ± y points (95 % CI a to b), significant / not significant', where x is
    the mean difference over seeds and y the std of the per-seed differences (left out with
    one seed, where there is no spread to report)."""
    shown = format_spread(difference.diff, difference.std, len(difference.per_seed), signed=True)
    return (f"{question}: {shown} {unit} "
            f"({difference.confidence * 100:.0f} % CI {difference.low:+.1f} to {difference.high:+.1f}), "
            f"{verdict(difference)}")
