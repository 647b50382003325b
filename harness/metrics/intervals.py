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
  draws its own indices (numpy's generator, seeded per task by its name: every cell of a run draws the same
  documents, so the leaderboard can rank methods on common resamples) and takes the same percentiles.
- Two runs of one cell (a regression check): the interval of the paired difference of their means.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib

import numpy as np

from .consistency import _kl_and_jsd

#: The figures that get an interval: `<metric>_ci_low`, `<metric>_ci_high` rows of summary.csv.
METRICS = ("accuracy", "relative_accuracy", "agreement", "flip_correct_to_wrong", "flip_wrong_to_correct",
           "first_token_kl")
#: summary.csv's task name for a cell's figures over all its tasks.
ALL_TASKS = "all_tasks"
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


def bounds(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
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


def draws(task: str, n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) document positions of one task's resamples: the same for every cell of a run, whatever
    its other tasks are."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())]).integers(0, n, size=(resamples, n))


def _over_tasks(per_task: list[dict]) -> dict[str, np.ndarray]:
    """The cell's figures from its tasks' (point or resampled) figures: means over tasks, relative accuracy as
    summed accuracies over summed unpruned ones."""
    out = {}
    for metric in METRICS:
        if metric == "relative_accuracy":
            ref = sum(f["_ref_accuracy"] for f in per_task)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[metric] = np.where(ref > 0, sum(f["accuracy"] for f in per_task) / np.where(ref > 0, ref, 1),
                                       np.nan)
        else:
            with _quiet_nan_means():
                out[metric] = np.nanmean(np.stack([f[metric] for f in per_task]), axis=0)
    return out


def cell_resamples(cols_by_task: dict[str, dict], resamples: int = RESAMPLES,
                   seed: int = SEED) -> dict[str, np.ndarray]:
    """Each figure over the cell's tasks, per stratified resample (documents drawn within each task)."""
    tasks = {task: cols for task, cols in cols_by_task.items() if len(cols["ref"])}
    if not tasks:
        return {}
    per_task = []
    for task, cols in tasks.items():
        draw = draws(task, len(cols["ref"]), resamples, seed)
        per_task.append(_task_figures(*(cols[k][draw] for k in ("ref", "new", "same", "kl"))))
    return _over_tasks(per_task)


def cell_points(cols_by_task: dict[str, dict]) -> dict[str, float]:
    """Each figure over the cell's tasks, on the documents as they are."""
    per_task = [_task_figures(cols["ref"], cols["new"], cols["same"], cols["kl"])
                for cols in cols_by_task.values() if len(cols["ref"])]
    if not per_task:
        return {}
    with _quiet_nan_means():
        return {metric: float(value) for metric, value in _over_tasks(per_task).items()}


def cell_intervals(cols_by_task: dict[str, dict], resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """Each figure's interval over the cell's tasks: documents resampled within each task (stratified), the task
    figures averaged (relative accuracy: summed accuracies over summed unpruned ones)."""
    values = cell_resamples(cols_by_task, resamples, seed)
    return {metric: bounds(v, level) for metric, v in values.items()
            if metric != "first_token_kl" or not np.isnan(v).all()}


def difference_interval(base: np.ndarray, current: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> tuple[float, float]:
    """The interval of mean(current) - mean(base) over documents both runs answered (position i: one document),
    resampled together (scipy's paired percentile bootstrap)."""
    from scipy import stats

    base, current = np.asarray(base, dtype=float), np.asarray(current, dtype=float)
    if len(base) < 2 or np.array_equal(base, current):
        diff = float(current.mean() - base.mean()) if len(base) else float("nan")
        return diff, diff
    res = stats.bootstrap((base, current), lambda b, c, axis=-1: c.mean(axis) - b.mean(axis), paired=True,
                          vectorized=True, n_resamples=resamples, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
