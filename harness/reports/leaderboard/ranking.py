"""The leaderboard's numbers: per-task rows, per-cell means, and the ranking rule.

A cell's metrics are means over its tasks, each task counting equally, except its relative accuracy:
its accuracy summed over the tasks / the unpruned cell's (a mean of per-task ratios lets a task the
model answers near 0 dominate: 0.13 / 0.03 = 4). Its costs are ratios to the unpruned cell (`none`) of
the same model on the same task, averaged over the tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.budget import ADAPTIVE, FULL
from harness.metrics import intervals

REFERENCE = "none"  # the unpruned method every cell is compared with
LOWER_IS_BETTER = {"first_token_kl", "flip_correct_to_wrong"}

# leaderboard.csv column -> (table header, number format): the cell table, in this order
METRICS = {
    "accuracy": ("accuracy", "{:.3f}"),
    "relative_accuracy": ("rel. accuracy", "{:.3f}"),
    "agreement": ("agreement", "{:.3f}"),
    "flip_correct_to_wrong": ("flips c→w", "{:.3f}"),
    "first_token_kl": ("first-token KL", "{:.4f}"),
    "flops_ratio": ("FLOPs ratio", "{:.3f}"),
    "prefill_speedup": ("prefill speedup", "{:.2f}×"),
    "kept_per_image": ("kept tokens", "{:.0f}"),
}


@dataclass(frozen=True)
class Rule:
    """How methods are ranked: by the mean of `metric` over their budgets, ties by the mean of `tie`."""

    metric: str
    tie: str

    def describe(self) -> str:
        def name(metric):
            return METRICS[metric][0] + (" (lower is better)" if metric in LOWER_IS_BETTER else "")

        return (f"Methods are ranked by their mean {name(self.metric)} over the budgets they were run at "
                f"(listed in its order; equal means in the order of their mean {name(self.tie)}). "
                f"Each budget's value is the mean over the tasks "
                f"(rel. accuracy: the ratio of the mean accuracies). "
                f"A method with budget `{ADAPTIVE}` decides per image how many tokens to keep: it is its own "
                f"row, ranked by its one cell, at the mean number of tokens it kept.")

    @staticmethod
    def ties() -> str:
        return (f"Ranks admit ties: a method's rank is 1 + the number of methods that beat it in at least "
                f"{1 - (1 - intervals.LEVEL) / 2:.1%} of {intervals.RESAMPLES:,} bootstrap resamples of the documents "
                f"(drawn within each task, the same draws for every method and the unpruned model: a paired "
                f"comparison), so methods that share a rank have as many methods ahead of them with "
                f"{intervals.LEVEL:.0%} confidence. The interval beside a score is its {intervals.LEVEL:.0%} "
                f"percentile interval over the same resamples.")


RULES = {
    "relative_accuracy": Rule("relative_accuracy", "agreement"),
    "agreement": Rule("agreement", "relative_accuracy"),
    "first_token_kl": Rule("first_token_kl", "relative_accuracy"),
}


def budget_order(budget: str) -> tuple:
    """full first, then numbers from largest to smallest, adaptive last."""
    if budget == FULL:
        return (0, 0.0)
    if budget == ADAPTIVE:
        return (2, 0.0)
    try:
        return (1, -float(budget))
    except ValueError:
        return (3, 0.0)


def many_models(ranked: pd.DataFrame) -> bool:
    """Whether the tables and plots must name each row's model."""
    return ranked["model"].nunique() > 1


def _kept_per_image(kept: dict) -> pd.DataFrame:
    """Mean kept tokens per image, per (model, method, budget, task)."""
    rows = [dict(model=k[0], method=k[1], budget=k[2], task=k[3], kept=float(np.mean([len(i) for i in images])))
            for k, images in kept.items() if images]
    frame = pd.DataFrame(rows, columns=["model", "method", "budget", "task", "kept"])
    return frame.groupby(["model", "method", "budget", "task"], as_index=False)["kept"].mean()


def task_table(summary: pd.DataFrame, kept: dict) -> pd.DataFrame:
    """One row per (model, method, budget, task): the summary's metrics as columns, the unpruned cell's
    cost beside them (`ref_*`), and the kept tokens per image."""
    index = ["model", "method", "budget", "task"]
    wide = summary.set_index(index + ["metric"])["value"].unstack("metric").reset_index()
    wide.columns.name = None
    for metric in ("accuracy", "relative_accuracy", "agreement", "flip_correct_to_wrong", "first_token_kl",
                   "flops_prefill", "flops_vision", "prefill_ms"):
        if metric not in wide:
            wide[metric] = np.nan
    wide["cost"] = wide["flops_prefill"] + wide["flops_vision"]
    ref = wide[wide["method"] == REFERENCE][["model", "task", "accuracy", "cost", "prefill_ms"]]
    ref = ref.rename(columns={"accuracy": "ref_accuracy", "cost": "ref_cost", "prefill_ms": "ref_prefill_ms"})
    wide = wide.merge(ref, on=["model", "task"], how="left")
    return wide.merge(_kept_per_image(kept), on=index, how="left")


def cell_table(tasks: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, budget): every metric is the mean over its tasks, each task counting
    equally, except relative accuracy, the ratio of the summed accuracies to the unpruned cell's on the
    same tasks; costs are per-task ratios to the unpruned cell, averaged over the tasks."""
    tasks = tasks.assign(flops_ratio=tasks["cost"] / tasks["ref_cost"],
                         prefill_speedup=tasks["ref_prefill_ms"] / tasks["prefill_ms"], kept_per_image=tasks["kept"])
    both = tasks["accuracy"].notna() & tasks["ref_accuracy"].notna()  # tasks counted on both sides of the ratio
    tasks = tasks.assign(paired=tasks["accuracy"].where(both), paired_ref=tasks["ref_accuracy"].where(both))
    columns = ["accuracy", "agreement", "flip_correct_to_wrong", "first_token_kl", "flops_ratio",
               "prefill_speedup", "kept_per_image"]
    grouped = tasks.groupby(["model", "method", "budget"], sort=False)
    cells = grouped[columns].mean().reset_index()  # NaN-skipping
    sums = grouped[["paired", "paired_ref"]].sum()  # same groups, same order as `cells`
    cells.insert(4, "relative_accuracy", (sums["paired"] / sums["paired_ref"].where(sums["paired_ref"] > 0)).to_numpy())
    cells["tasks"] = grouped.size().to_numpy()
    cells["entry"] = [m if b != ADAPTIVE else f"{m} ({ADAPTIVE})" for m, b in zip(cells["method"], cells["budget"])]
    return cells


def _sort_key(value: float, metric: str) -> float:
    """Smaller is better; a missing value is worst."""
    if math.isnan(value):
        return math.inf
    return value if metric in LOWER_IS_BETTER else -value


def _beaten_by(scores: dict, entry: tuple, metric: str) -> int:
    """How many methods of the same model beat `entry` with 95% confidence: in at least 97.5% of the common
    resamples (the paired difference's 95% interval lies wholly on their side)."""
    mine, better = scores[entry], 0
    for other, theirs in scores.items():
        if other != entry and other[0] == entry[0]:
            wins = theirs < mine if metric in LOWER_IS_BETTER else theirs > mine  # NaN: no win
            better += np.mean(wins) >= 1 - (1 - intervals.LEVEL) / 2
    return better


def rank(cells: pd.DataFrame, rule: Rule, resampled: dict | None = None) -> pd.DataFrame:
    """The cell table with each method's `rank`, `score` and `position` (per model; the unpruned reference has
    none of them), sorted by model, rank, position and budget.

    `position` orders by the point figures (score, then the tie-breaker). `rank` admits ties when `resampled`
    gives each method's score per bootstrap resample ((model, entry) -> array, the same resamples for all, see
    `bands`): 1 + the number of methods that beat it with 95% confidence, and `score_low` / `score_high` its
    95% interval. A model with a method lacking resamples is ranked by position alone (`banded` false)."""
    pruned = cells[cells["method"] != REFERENCE]
    means = pruned.groupby(["model", "entry"], sort=False)[[rule.metric, rule.tie]].mean().reset_index()
    keys = [(_sort_key(s, rule.metric), _sort_key(t, rule.tie)) for s, t in zip(means[rule.metric], means[rule.tie])]
    positions = []
    for model, key in zip(means["model"], keys):
        positions.append(1 + sum(k < key for m, k in zip(means["model"], keys) if m == model))
    resampled = resampled or {}
    entries = list(zip(means["model"], means["entry"]))
    banded = {m for m in means["model"] if all(e in resampled for e in entries if e[0] == m)}
    ranks = [1 + _beaten_by(resampled, e, rule.metric) if e[0] in banded else p for e, p in zip(entries, positions)]
    ci = [intervals.bounds(resampled[e]) if e in resampled else (np.nan, np.nan) for e in entries]
    means = means.assign(rank=ranks, position=positions, score_low=[c[0] for c in ci], score_high=[c[1] for c in ci],
                         banded=[e[0] in banded for e in entries])
    means = means.rename(columns={rule.metric: "score", rule.tie: "tie"})
    out = cells.merge(means, on=["model", "entry"], how="left")

    def row_order(i):
        row = out.iloc[i]
        return (row["model"], 0 if pd.isna(row["rank"]) else row["rank"], 0 if pd.isna(row["position"]) else
                row["position"], row["entry"], budget_order(row["budget"]))

    out = out.iloc[sorted(range(len(out)), key=row_order)].reset_index(drop=True)
    out["rank"] = out["rank"].astype("Int64")
    out["position"] = out["position"].astype("Int64")
    return out
