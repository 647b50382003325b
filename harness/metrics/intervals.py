"""95% intervals on a cell's accuracy and consistency figures: a paired bootstrap over documents.

A pruned cell and the unpruned reference answer the same documents, so each resample draws documents (with
replacement) and takes the pruned and the unpruned view of every drawn document together: the interval of a
paired figure (relative accuracy, agreement, flips, first-token KL) reflects only how the two runs differ on
documents, not how hard the documents drawn are. Identical runs give zero-width intervals of every paired
difference (tested).

- Per task: `scipy.stats.bootstrap` (paired, percentile method, seeded). Percentile rather than BCa: BCa is
  undefined when every resample gives one value (a method that keeps every answer), which pruning at generous
  budgets often does.
- The cell over its tasks: stratified by task, each task's documents resampled on their own, then the
  statistic over tasks (the mean of the task figures; for relative accuracy the leaderboard's "accuracy
  kept": the accuracies summed over tasks over the unpruned ones). scipy's bootstrap has no strata, so this one
  draws its own indices (numpy's seeded generator) and takes the same percentiles.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from .consistency import _kl_and_jsd

#: The figures that get an interval: `<metric>_ci_low`, `<metric>_ci_high` rows of summary.csv.
METRICS = ("accuracy", "relative_accuracy", "agreement", "flip_correct_to_wrong", "flip_wrong_to_correct",
           "first_token_kl")
LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


def columns(reference: dict, pruned: dict) -> dict[str, np.ndarray]:
    """Per document both runs hold (sorted keys), the paired columns the statistics read: unpruned and pruned
    correctness, the same answer, the first-token KL (NaN where a run stored no distribution)."""
    keys = sorted(set(reference) & set(pruned))
    ref, new = [reference[k] for k in keys], [pruned[k] for k in keys]
    return {"ref": np.array([r.correct for r in ref], dtype=float),
            "new": np.array([n.correct for n in new], dtype=float),
            "same": np.array([r.answer == n.answer for r, n in zip(ref, new)], dtype=float),
            "kl": np.array([_kl_and_jsd(r.dist, n.dist)[0] if r.dist and n.dist else np.nan
                            for r, n in zip(ref, new)], dtype=float)}


def _task_figures(ref, new, same, kl, axis=-1) -> dict[str, np.ndarray]:
    """The figures of (resampled) columns, along `axis`; also the unpruned accuracy (for sums over tasks)."""
    ref_acc, new_acc = ref.mean(axis), new.mean(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(ref_acc > 0, new_acc / np.where(ref_acc > 0, ref_acc, 1), np.nan)
    with np.errstate(invalid="ignore"), _quiet_nan_means():
        kl_mean = np.nanmean(kl, axis)
    return {"accuracy": new_acc, "relative_accuracy": relative, "agreement": same.mean(axis),
            "flip_correct_to_wrong": (ref * (1 - new)).mean(axis),
            "flip_wrong_to_correct": ((1 - ref) * new).mean(axis),
            "first_token_kl": kl_mean, "_ref_accuracy": ref_acc}


@contextlib.contextmanager
def _quiet_nan_means():
    """A resample of documents without distributions gives NaN, not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def task_intervals(cols: dict, resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Each figure's interval on one task (scipy's paired percentile bootstrap)."""
    from scipy import stats

    n = len(cols["ref"])
    if n == 0:
        return {}
    data = (cols["ref"], cols["new"], cols["same"], cols["kl"])
    metrics = [m for m in METRICS if m != "first_token_kl" or not np.isnan(cols["kl"]).all()]

    def statistic(ref, new, same, kl, axis=-1):  # every figure from one set of resamples
        figures = _task_figures(ref, new, same, kl, axis)
        return np.stack([figures[m] for m in metrics])

    points = statistic(*data)
    if n == 1:
        return {m: (float(p), float(p)) for m, p in zip(metrics, points)}
    with _quiet_nan_means():
        res = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                              confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return {m: (float(p), float(p)) if np.isnan(p) else (float(low), float(high))
            for m, p, low, high in zip(metrics, points, res.confidence_interval.low, res.confidence_interval.high)}


def cell_intervals(cols_by_task: dict[str, dict], resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Each figure's interval over the cell's tasks: documents resampled within each task (stratified), the task
    figures averaged (relative accuracy: summed accuracies over summed unpruned ones)."""
    rng = np.random.default_rng(seed)
    tasks = [cols for cols in cols_by_task.values() if len(cols["ref"])]
    if not tasks:
        return {}
    per_task = []
    for cols in tasks:
        draw = rng.integers(0, len(cols["ref"]), size=(resamples, len(cols["ref"])))
        per_task.append(_task_figures(*(cols[k][draw] for k in ("ref", "new", "same", "kl"))))
    out = {}
    for metric in METRICS:
        if metric == "relative_accuracy":
            ref = sum(f["_ref_accuracy"] for f in per_task)
            with np.errstate(invalid="ignore", divide="ignore"):
                values = np.where(ref > 0, sum(f["accuracy"] for f in per_task) / np.where(ref > 0, ref, 1), np.nan)
        else:
            with _quiet_nan_means():
                values = np.nanmean(np.stack([f[metric] for f in per_task]), axis=0)
        if metric == "first_token_kl" and np.isnan(values).all():
            continue
        out[metric] = _bounds(values, level)
    return out
