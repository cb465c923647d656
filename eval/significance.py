"""Paired significance tests over queries between two runs of the same task.

Both tests pair the runs query by query, as IR evaluation does (Smucker, Allan & Carterette,
CIKM 2007, compare the t-test, bootstrap and randomisation tests for exactly this use):
- paired t-test: Student's t on the per-query differences (scipy.stats.ttest_rel);
- paired bootstrap: resample queries with replacement; the two-sided p-value is the share of
  resampled mean differences, shifted to mean 0 (the null), at least as far from 0 as the
  observed one; the 95 % interval is the percentile interval of the unshifted means.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from scipy import stats

from ragkit.errors import RagkitError

BOOTSTRAP_SAMPLES = 10_000


@dataclass(frozen=True)
class Comparison:
    """A − B on one metric, paired over the queries both runs scored."""

    metric: str
    queries: int
    mean_a: float
    mean_b: float
    difference: float
    t_p: float
    bootstrap_p: float
    ci_low: float
    ci_high: float
    only_in_a: int = 0
    only_in_b: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def paired_t_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value; identical runs (no variance in the differences) give 1.0, not NaN."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) < 2:
        return 1.0
    if np.allclose(diff, diff[0]):
        return 1.0 if np.isclose(diff[0], 0.0) else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """(two-sided p-value, 95 % CI low, CI high) of mean(a − b), resampling queries."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) == 0:
        return 1.0, 0.0, 0.0
    observed = diff.mean()
    rng = np.random.default_rng(seed)
    # Resample in batches so that 50k-query tasks stay within a few MB.
    batch = max(1, (1 << 22) // len(diff))
    means = np.concatenate([
        diff[rng.integers(0, len(diff), size=(min(batch, samples - start), len(diff)))].mean(axis=1)
        for start in range(0, samples, batch)
    ])                                                               # (samples,)
    null_means = means - observed
    extreme = np.count_nonzero(np.abs(null_means) >= abs(observed) - 1e-12)
    p_value = min(1.0, (extreme + 1) / (samples + 1))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(p_value), float(low), float(high)


def compare_per_query(per_query_a: Mapping[str, Mapping[str, float]], per_query_b: Mapping[str, Mapping[str, float]],
                      metric: str, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Comparison:
    """Compare two runs' per-query values of `metric` over the queries both contain."""
    has_a = {q for q, values in per_query_a.items() if metric in values}
    has_b = {q for q, values in per_query_b.items() if metric in values}
    common = sorted(has_a & has_b)
    if not common:
        raise RagkitError(f"metric '{metric}': the two runs share no scored query "
                          f"({len(has_a)} in A, {len(has_b)} in B); were they run on the same task?")
    a = np.array([per_query_a[q][metric] for q in common], dtype=float)
    b = np.array([per_query_b[q][metric] for q in common], dtype=float)
    p_boot, low, high = paired_bootstrap(a, b, samples=samples, seed=seed)
    return Comparison(metric=metric, queries=len(common), mean_a=float(a.mean()), mean_b=float(b.mean()),
                      difference=float((a - b).mean()), t_p=paired_t_test(a, b), bootstrap_p=p_boot,
                      ci_low=low, ci_high=high, only_in_a=len(has_a - has_b), only_in_b=len(has_b - has_a))
