"""The leaderboard's uncertainty: every cell's figures over common bootstrap resamples of the documents.

Each task's documents are resampled with `intervals.draws`, which depend only on the task and its number of
documents: every cell of a model draws the same documents in each resample, the unpruned reference included.
So a cell's intervals here equal those its run wrote into summary.csv (`all_tasks` rows), and two methods are
compared on the same resamples: a paired comparison, which is what ranks with ties (`ranking.rank`) rest on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.metrics import intervals

from .ranking import REFERENCE


def _common_docs(views: dict, model: str) -> dict[str, set]:
    """Per task, the documents every cell of the model holds (a merged leaderboard may mix runs)."""
    common: dict[str, set] = {}
    for (m, _, _, task), docs in views.items():
        if m == model:
            common[task] = common[task] & set(docs) if task in common else set(docs)
    return common


def cell_resamples(cells: pd.DataFrame, views: dict) -> dict[tuple, dict[str, np.ndarray]]:
    """(model, method, budget) -> each figure over the cell's tasks, per resample; cells whose samples (or whose
    model's unpruned samples) were not found are left out."""
    out = {}
    for model in dict.fromkeys(cells["model"]):
        reference = {task: docs for (m, method, _, task), docs in views.items() if m == model and method == REFERENCE}
        common = _common_docs(views, model)
        for method, budget in cells.loc[cells["model"] == model, ["method", "budget"]].itertuples(index=False):
            cols = {}
            for task, ref in reference.items():
                mine = views.get((model, method, budget, task))
                if mine is not None:
                    docs = common[task]
                    cols[task] = intervals.columns({d: ref[d] for d in docs}, {d: mine[d] for d in docs})
            if cols:
                out[(model, method, budget)] = intervals.cell_resamples(cols)
    return out


def with_intervals(cells: pd.DataFrame, resamples: dict) -> pd.DataFrame:
    """The cell table with `<metric>_ci_low` / `_ci_high` (95%) of every figure that has one (NaN where the
    cell's samples were not found)."""
    rows = []
    for model, method, budget in cells[["model", "method", "budget"]].itertuples(index=False):
        figures = resamples.get((model, method, budget), {})
        row = {}
        for metric in intervals.METRICS:
            low, high = intervals.bounds(figures[metric]) if metric in figures else (np.nan, np.nan)
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = low, high
        rows.append(row)
    return pd.concat([cells.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def method_resamples(cells: pd.DataFrame, resamples: dict, metric: str) -> dict[tuple, np.ndarray]:
    """(model, entry) -> its score per resample: the mean of `metric` over its budgets, as the ranking takes it.
    An entry with a cell whose samples were not found has none."""
    out = {}
    pruned = cells[cells["method"] != REFERENCE]
    for (model, entry), group in pruned.groupby(["model", "entry"], sort=False):
        keys = [(model, m, b) for m, b in zip(group["method"], group["budget"])]
        if all(k in resamples and metric in resamples[k] for k in keys):
            with np.errstate(invalid="ignore"):
                out[(model, entry)] = np.mean([resamples[k][metric] for k in keys], axis=0)
    return out
