"""The ranked cells as tables: display text with the raw values beside it (the page sorts by those), and
leaderboard.csv."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.budget import ADAPTIVE
from harness.metrics import intervals

from .ranking import METRICS, REFERENCE, Rule, budget_order, many_models


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def ranking_view(ranked: pd.DataFrame, rule: Rule) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ranking table (one row per method) as (display text, raw values for sorting)."""
    header, spec = METRICS[rule.metric]
    tie_header, tie_spec = METRICS[rule.tie]
    budgets = sorted(set(ranked.loc[ranked["method"] != REFERENCE, "budget"]), key=budget_order)
    text, raw = [], []
    for (model, entry), group in ranked[ranked["method"] != REFERENCE].groupby(["model", "entry"], sort=False):
        first = group.iloc[0]
        by_budget = dict(zip(group["budget"], group[rule.metric]))
        ran_at = ", ".join(b if b != ADAPTIVE else f"{ADAPTIVE} ({_fmt(first['kept_per_image'], '{:.1f}')} kept)"
                           for b in group["budget"])
        values = {"rank": first["rank"], "model": model, "method": entry, f"mean {header}": first["score"],
                  "95% interval": first["score_low"], f"mean {tie_header}": first["tie"], "budgets": ran_at,
                  **{f"{header} @{b}": by_budget.get(b, math.nan) for b in budgets}}
        raw.append(values)
        shown = {k: (_fmt(v, tie_spec if k == f"mean {tie_header}" else spec)
                     if isinstance(v, float) else str(v)) for k, v in values.items()}
        shown["95% interval"] = _interval(first["score_low"], first["score_high"], spec)
        text.append(shown)
    text, raw = pd.DataFrame(text), pd.DataFrame(raw)
    if not many_models(ranked):
        text, raw = text.drop(columns="model"), raw.drop(columns="model")
    return text, raw


def _interval(low, high, spec: str) -> str:
    """`low–high`, each formatted by the figure's `spec`; a dash when unknown (no samples found)."""
    if pd.isna(low) or pd.isna(high):
        return "—"
    return f"{spec.format(low)}–{spec.format(high)}"


def _budget_number(budget: str) -> float:
    """A budget as a number to sort by (`full` and `adaptive`: missing, sorted last)."""
    try:
        return float(budget)
    except ValueError:
        return math.nan


def cell_view(ranked: pd.DataFrame, rule: Rule) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cell table (one row per method and budget, the unpruned reference first) as (text, raw), with the
    95% interval of the ranking figure beside it."""
    text, raw = [], []
    interval = f"{METRICS[rule.metric][0]} 95%"
    for _, row in ranked.iterrows():
        reference = row["method"] == REFERENCE
        values = {"rank": "ref" if reference else row["rank"], "model": row["model"], "method": row["method"],
                  "budget": row["budget"]}
        for metric, (header, _) in METRICS.items():
            values[header] = row[metric]
            if metric == rule.metric:
                values[interval] = row.get(f"{metric}_ci_low", math.nan)
        raw.append({**values, "rank": 0 if reference else row["rank"], "budget": _budget_number(row["budget"])})
        shown = {k: str(v) for k, v in values.items() if k in ("rank", "model", "method", "budget")}
        for metric, (header, spec) in METRICS.items():
            adaptive_kept = metric == "kept_per_image" and row["budget"] == ADAPTIVE
            shown[header] = _fmt(row[metric], "{:.1f}" if adaptive_kept else spec)
            if metric == rule.metric:
                shown[interval] = _interval(row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"), spec)
        text.append(shown)
    text, raw = pd.DataFrame(text), pd.DataFrame(raw)
    if not many_models(ranked):
        text, raw = text.drop(columns="model"), raw.drop(columns="model")
    return text, raw


CSV_COLUMNS = ["model", "method", "budget", "rank", "position", "score", "score_low", "score_high", *METRICS,
               *(f"{m}_ci_{side}" for m in intervals.METRICS for side in ("low", "high")), "tasks"]


def write_csv(ranked: pd.DataFrame, path: Path) -> None:
    frame = ranked.reindex(columns=CSV_COLUMNS).rename(columns={"kept_per_image": "visual_tokens_kept_per_image"})
    frame.to_csv(path, index=False)
