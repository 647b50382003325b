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

        return (f"Methods are ranked by their mean {name(self.metric)} over the budgets they were run at, "
                f"ties broken by their mean {name(self.tie)}. Each budget's value is the mean over the tasks "
                f"(rel. accuracy: the ratio of the mean accuracies). "
                f"A method with budget `{ADAPTIVE}` decides per image how many tokens to keep: it is its own "
                f"row, ranked by its one cell, at the mean number of tokens it kept.")


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


def rank(cells: pd.DataFrame, rule: Rule) -> pd.DataFrame:
    """The cell table with each method's `rank` and `score` (per model; the unpruned reference has neither),
    sorted by model, rank and budget. Equal scores and tie-breakers share a rank."""
    pruned = cells[cells["method"] != REFERENCE]
    means = pruned.groupby(["model", "entry"], sort=False)[[rule.metric, rule.tie]].mean().reset_index()
    keys = [(_sort_key(s, rule.metric), _sort_key(t, rule.tie)) for s, t in zip(means[rule.metric], means[rule.tie])]
    ranks = []
    for model, key in zip(means["model"], keys):
        ranks.append(1 + sum(k < key for m, k in zip(means["model"], keys) if m == model))
    means = means.assign(rank=ranks).rename(columns={rule.metric: "score", rule.tie: "tie"})
    out = cells.merge(means, on=["model", "entry"], how="left")
    order = sorted(range(len(out)), key=lambda i: (out["model"].iloc[i],
                                                   0 if pd.isna(out["rank"].iloc[i]) else out["rank"].iloc[i],
                                                   out["entry"].iloc[i], budget_order(out["budget"].iloc[i])))
    out = out.iloc[order].reset_index(drop=True)
    out["rank"] = out["rank"].astype("Int64")
    return out
