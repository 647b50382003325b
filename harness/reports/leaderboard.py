"""`harness leaderboard`: rank pruning methods from stored results, for a README and a static web page.

Reads only what `harness run` stored in its output folders (`summary.csv`, `results.sqlite`,
`samples/*.jsonl`), so a leaderboard can be rebuilt at any time without a model. Writes, into the
output folder:

* ``leaderboard.md``: the ranking rule, a ranking table (one row per method) and a table of every
  (method, budget) cell: accuracy, relative accuracy, agreement, correct→wrong flips, first-token KL,
  FLOPs ratio, prefill speedup and kept tokens per image;
* ``leaderboard.csv``: the cell table's numbers, one row per (model, method, budget);
* the plots (PNG): accuracy against kept tokens, consistency against FLOPs, prefill speedup
  against relative accuracy with the Pareto front, relative accuracy per task, and the tokens each
  method keeps on a few test images;
* ``index.html``: all of it in one self-contained page (inline CSS and script, plots as base64
  PNGs: it opens offline), with tables sorted by clicking a header.

A cell's metrics are means over its tasks, each task counting equally, except its relative accuracy:
its accuracy summed over the tasks / the unpruned cell's (a mean of per-task ratios lets a task the
model answers near 0 dominate: 0.13 / 0.03 = 4). Its costs are ratios to the unpruned cell (`none`) of
the same model on the same task, averaged over the tasks. Several run folders merge: a
later folder's (method, budget, task) replaces an earlier one's.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.budget import ADAPTIVE, FULL
from harness.errors import InputError
from harness.evaluation.runner import REPO_ROOT

from . import run_folder

DEFAULT_CONFIG = REPO_ROOT / "configs" / "leaderboard.yaml"
DEFAULT_OUTPUT = "results/leaderboard"
DEFAULT_RUN_DIR = "runs/leaderboard"
REFERENCE = "none"  # the unpruned method every cell is compared with
OVERLAY_TASK = "testbed_color"  # whose first documents show the kept tokens
OVERLAY_DOCS = 3
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


class LeaderboardError(InputError):
    """Bad input (a run folder, a config file), reported in one line without a traceback."""


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


# ----------------------------------------------------------------------------- reading runs

@dataclass
class Run:
    """One finished `harness run` folder, as stored."""

    path: Path
    summary: pd.DataFrame  # summary.csv (long format; budget as text: a number, `full` or `adaptive`)
    provenance: dict = field(default_factory=dict)  # the last invocation's: configuration, versions, device
    started: str = ""
    timing: list[str] = field(default_factory=list)  # the timing pass's devices, with attention backend
    kept: dict = field(default_factory=dict)  # (method, budget, task, doc_id) -> kept indices, one array per image
    docs: dict = field(default_factory=dict)  # (task, doc_id) -> the document (testbed: scene specs, evidence)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.summary["model"]))


def load_run(run_dir) -> Run:
    """Read a run folder: its summary, the store's provenance and timing devices, and per document the
    kept token indices of every cell in the summary."""
    path = run_folder.folder(run_dir)
    summary = run_folder.read_summary(path / run_folder.SUMMARY)
    run = Run(path, summary)
    if (path / run_folder.STORE).is_file():  # optional here: without it the leaderboard says "no provenance"
        run.started, run.provenance, run.timing = _read_store(path / run_folder.STORE, summary)
    run.kept, run.docs = _read_samples(path / "samples", summary)
    return run


def _read_store(path: Path, summary: pd.DataFrame) -> tuple[str, dict, list[str]]:
    """The last invocation's start time and provenance, and where the timing pass of the summary's
    cells ran (a cell reused from an earlier invocation was timed then, possibly elsewhere)."""
    db = run_folder.open_store(path)
    try:
        started, provenance = run_folder.invocation(db)
        cells = db.execute("SELECT rows, details FROM cells").fetchall()
    finally:
        db.close()
    wanted = set(zip(summary["method"], summary["budget"]))
    devices = []
    for rows, details in cells:
        rows = json.loads(rows)
        if not rows or (rows[0]["method"], rows[0]["budget"]) not in wanted:
            continue
        for timed in (json.loads(details or "{}").get("timing") or {}).values():
            devices.append(f"{timed.get('device', '?')} ({timed.get('attention', '?')} attention)")
    return started, provenance, list(dict.fromkeys(devices))


def _read_samples(folder: Path, summary: pd.DataFrame) -> tuple[dict, dict]:
    """Kept indices per document and image (the first request's: every request of a document sees the
    same images) of the summary's cells, and the documents themselves."""
    kept, docs = {}, {}
    for method, budget, task in dict.fromkeys(zip(summary["method"], summary["budget"], summary["task"])):
        path = folder / f"{method}_{budget}_{task}.jsonl"
        if not path.is_file():
            continue
        with path.open() as f:
            for line in f:
                sample = json.loads(line)
                records = sample.get("records") or [{}]
                indices = records[0].get("kept_indices")
                if indices is not None:
                    kept[(method, budget, task, sample["doc_id"])] = [np.asarray(i, np.int32) for i in indices]
                docs.setdefault((task, sample["doc_id"]), sample.get("doc") or {})
    return kept, docs


def merge(runs: list[Run]) -> tuple[pd.DataFrame, dict, dict]:
    """The runs' summaries, kept indices and documents as one: a later run's (model, method, budget, task)
    replaces an earlier one's."""
    key = ["model", "method", "budget", "task"]
    frames, kept, docs = [], {}, {}
    for run in runs:
        newer = set(run.summary[key].itertuples(index=False, name=None))
        frames = [f[np.array([k not in newer for k in f[key].itertuples(index=False, name=None)], bool)]
                  for f in frames]
        frames.append(run.summary)
        model = run.models[0]  # a summary holds one invocation of `harness run`: one model
        kept = {k: v for k, v in kept.items() if k[:4] not in newer}
        kept.update({(model, *k): v for k, v in run.kept.items()})
        docs.update(run.docs)
    summary = pd.concat(frames, ignore_index=True).drop_duplicates(subset=key + ["metric"], keep="last")
    return summary, kept, docs


# ----------------------------------------------------------------------------- the tables

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
    wide = wide.merge(ref.rename(columns={"accuracy": "ref_accuracy", "cost": "ref_cost", "prefill_ms": "ref_prefill_ms"}),
                      on=["model", "task"], how="left")
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


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def _many_models(ranked: pd.DataFrame) -> bool:
    return ranked["model"].nunique() > 1


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
                  f"mean {tie_header}": first["tie"], "budgets": ran_at,
                  **{f"{header} @{b}": by_budget.get(b, math.nan) for b in budgets}}
        raw.append(values)
        text.append({k: (_fmt(v, tie_spec if k == f"mean {tie_header}" else spec)
                         if isinstance(v, float) else str(v)) for k, v in values.items()})
    text, raw = pd.DataFrame(text), pd.DataFrame(raw)
    if not _many_models(ranked):
        text, raw = text.drop(columns="model"), raw.drop(columns="model")
    return text, raw


def _budget_number(budget: str) -> float:
    """A budget as a number to sort by (`full` and `adaptive`: missing, sorted last)."""
    try:
        return float(budget)
    except ValueError:
        return math.nan


def cell_view(ranked: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cell table (one row per method and budget, the unpruned reference first) as (text, raw)."""
    text, raw = [], []
    for _, row in ranked.iterrows():
        reference = row["method"] == REFERENCE
        values = {"rank": "ref" if reference else row["rank"], "model": row["model"], "method": row["method"],
                  "budget": row["budget"], **{header: row[m] for m, (header, _) in METRICS.items()}}
        raw.append({**values, "rank": 0 if reference else row["rank"], "budget": _budget_number(row["budget"])})
        shown = {k: str(v) for k, v in values.items() if k in ("rank", "model", "method", "budget")}
        for metric, (header, spec) in METRICS.items():
            adaptive_kept = metric == "kept_per_image" and row["budget"] == ADAPTIVE
            shown[header] = _fmt(row[metric], "{:.1f}" if adaptive_kept else spec)
        text.append(shown)
    text, raw = pd.DataFrame(text), pd.DataFrame(raw)
    if not _many_models(ranked):
        text, raw = text.drop(columns="model"), raw.drop(columns="model")
    return text, raw


CSV_COLUMNS = ["model", "method", "budget", "rank", "score", *METRICS, "tasks"]


def write_csv(ranked: pd.DataFrame, path: Path) -> None:
    frame = ranked[CSV_COLUMNS].rename(columns={"kept_per_image": "visual_tokens_kept_per_image"})
    frame.to_csv(path, index=False)


# ----------------------------------------------------------------------------- Markdown

def markdown_table(text: pd.DataFrame) -> str:
    numeric = [c not in ("model", "method", "budget", "budgets") for c in text.columns]
    lines = ["| " + " | ".join(text.columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in text.itertuples(index=False)]
    return "\n".join(lines)


def protocol_lines(runs: list[Run], summary: pd.DataFrame) -> list[str]:
    """What was measured and where, one line per source run."""
    tasks = list(dict.fromkeys(summary["task"]))
    n = summary[summary["metric"] == "n_samples"]["value"]
    if not len(n):
        docs = "?"
    else:
        docs = f"{int(n.min())}" if n.min() == n.max() else f"{int(n.min())}–{int(n.max())}"
    lines = [f"Models: {', '.join(f'`{m}`' for m in dict.fromkeys(summary['model']))}; "
             f"{len(tasks)} tasks ({', '.join(tasks)}); {docs} documents per task."]
    for run in runs:
        p = run.provenance
        if not p:
            lines.append(f"Source `{run.path}`: no results store (results.sqlite), so no provenance.")
            continue
        cfg = p.get("config") or {}
        lines.append(f"Source `{run.path}`: `harness run` of {run.started[:10] or '?'}, weights {p.get('model', '?')}, "
                     f"code {str(p.get('code', '?'))[:12]}, limit {cfg.get('limit', '?')}, "
                     f"timing repeats {cfg.get('timing_repeats', '?')}, "
                     f"timing device: {', '.join(run.timing) or p.get('device', 'unknown')}.")
    return lines


def caveats(runs: list[Run], ranked: pd.DataFrame) -> list[str]:
    """What makes rows less comparable than the table suggests: merged runs measured differently, methods
    averaged over different budgets."""
    out = []
    limits = {str((run.provenance.get("config") or {}).get("limit")) for run in runs if run.provenance}
    if len(limits) > 1:
        out.append(f"The merged runs used different document limits ({', '.join(sorted(limits))}): relative "
                   f"accuracy and consistency compare each cell with the unpruned cell of its own run, FLOPs ratio "
                   f"and speedup with the unpruned cell of the last run that has one.")
    fixed = ranked[(ranked["method"] != REFERENCE) & (ranked["budget"] != ADAPTIVE)]
    budget_sets = fixed.groupby(["model", "entry"])["budget"].apply(frozenset)
    if budget_sets.nunique() > 1:
        out.append("Not every method was run at the same budgets (see `budgets`): their means are over different "
                   "budgets.")
    return out


def column_notes(runs: list[Run]) -> list[str]:
    devices = list(dict.fromkeys(d for run in runs for d in (run.timing or [run.provenance.get("device", "unknown")])))
    return [
        "accuracy: the tasks' own metric, mean over tasks.",
        "rel. accuracy: pruned accuracy summed over the tasks / the unpruned model's on the same documents "
        "(a ratio of means: a per-task ratio on a task the unpruned model hardly answers would dominate a mean).",
        "agreement: share of documents answered as the unpruned model answers them.",
        "flips c→w: share of documents right unpruned and wrong pruned.",
        "first-token KL: KL(unpruned ‖ pruned) of the first answer token's distribution (of the options, "
        "for multiple choice), nats.",
        "FLOPs ratio: (prefill + vision encoder) multiply-accumulates of the cell over the unpruned cell's, "
        "counted on the real forward of each task's first prompt; mean over tasks.",
        f"prefill speedup: unpruned prefill time (to the first token) / the cell's, medians of the timing pass on "
        f"each task's first prompt, mean over tasks; measured on {', '.join(devices)}: a time, it holds for that "
        f"device only.",
        "kept tokens: visual tokens per image after pruning (for in-LLM methods such as FastV: from their "
        "layer on; the FLOPs ratio counts the layers before it).",
    ]


def write_markdown(path: Path, runs: list[Run], summary: pd.DataFrame, ranked: pd.DataFrame, rule: Rule) -> None:
    ranking, _ = ranking_view(ranked, rule)
    cells, _ = cell_view(ranked)
    parts = ["# Visual-token pruning leaderboard", "", *[f"- {line}" for line in protocol_lines(runs, summary)], "",
             f"**Ranking rule.** {rule.describe()}", "", *[f"> {c}\n" for c in caveats(runs, ranked)],
             markdown_table(ranking), "",
             "## Every cell", "", "The unpruned reference (`none`, rank `ref`) first, then each method's budgets.",
             "", markdown_table(cells), "", "Columns:", "", *[f"- {n}" for n in column_notes(runs)], ""]
    path.write_text("\n".join(parts))


# ----------------------------------------------------------------------------- plots

def _palette(entries: list[str]) -> dict:
    import seaborn as sns

    return dict(zip(entries, sns.color_palette("tab10" if len(entries) <= 10 else "husl", len(entries))))


def _label(ranked: pd.DataFrame) -> pd.Series:
    """Each row's method as the plots name it (the entry, prefixed by the model when there are several)."""
    many = _many_models(ranked)
    return pd.Series([f"{m}/{e}" if many else e for m, e in zip(ranked["model"], ranked["entry"])], index=ranked.index)


def _plot_data(ranked: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(pruned cells, unpruned cells, colour per method), `method` holding the plots' label."""
    data = ranked.assign(method=_label(ranked))
    reference = ranked["method"] == REFERENCE
    pruned = data[~reference]
    return pruned, data[reference], _palette(list(dict.fromkeys(pruned["method"])))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_points(reference: pd.DataFrame, ax, x: str, y: str) -> None:
    many = reference["model"].nunique() > 1
    for _, row in reference.iterrows():
        ax.scatter([row[x]], [row[y]], marker="*", s=160, color="black", zorder=5,
                   label="unpruned" + (f" ({row['model']})" if many else ""))


def plot_accuracy_vs_kept(ranked: pd.DataFrame, path: Path) -> None:
    import seaborn as sns

    plt = _pyplot()
    pruned, reference, palette = _plot_data(ranked)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=pruned, x="kept_per_image", y="accuracy", hue="method", marker="o", ax=ax, palette=palette)
    for accuracy in reference["accuracy"]:
        ax.axhline(accuracy, color="black", ls="--", lw=1)
    _reference_points(reference, ax, "kept_per_image", "accuracy")
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel("accuracy (mean over tasks)")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    _save(fig, path)


def plot_consistency_vs_flops(ranked: pd.DataFrame, path: Path) -> None:
    import seaborn as sns

    plt = _pyplot()
    pruned, reference, palette = _plot_data(ranked)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, ylabel in ((axes[0], "agreement", "agreement with the unpruned answers"),
                               (axes[1], "first_token_kl", "first-token KL(unpruned ‖ pruned), nats")):
        sns.lineplot(data=pruned, x="flops_ratio", y=metric, hue="method", marker="o", ax=ax, palette=palette,
                     legend=ax is axes[1])
        _reference_points(reference, ax, "flops_ratio", metric)
        ax.set_xlabel("FLOPs ratio (prefill + vision, pruned / unpruned)")
        ax.set_ylabel(ylabel)
    if (pruned["first_token_kl"] > 0).any():
        axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any(a >= x and b >= y and (a > x or b > y) for a, b in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_speedup_vs_accuracy(ranked: pd.DataFrame, path: Path, device: str) -> None:
    import seaborn as sns

    plt = _pyplot()
    pruned, reference, palette = _plot_data(ranked.dropna(subset=["prefill_speedup", "relative_accuracy"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if pruned.empty:
        ax.text(0.5, 0.5, "no timing pass in these runs (timing repeats 0)", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, path)
        return
    sns.scatterplot(data=pruned, x="prefill_speedup", y="relative_accuracy", hue="method", style="budget", s=60,
                    ax=ax, palette=palette)
    _reference_points(reference, ax, "prefill_speedup", "relative_accuracy")
    points = list(zip(pd.concat([reference, pruned])["prefill_speedup"],
                      pd.concat([reference, pruned])["relative_accuracy"]))
    front = [points[i] for i in pareto_front(points)]
    ax.plot([x for x, _ in front], [y for _, y in front], color="black", lw=1, ls=":", drawstyle="steps-post",
            label="Pareto front")
    ax.scatter([x for x, _ in front], [y for _, y in front], s=160, facecolors="none", edgecolors="black", zorder=4)
    ax.set_xlabel(f"prefill speedup (unpruned / pruned time, {device})")
    ax.set_ylabel("relative accuracy (mean over tasks)")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    _save(fig, path)


def plot_task_heatmap(ranked: pd.DataFrame, tasks: pd.DataFrame, path: Path) -> None:
    """Relative accuracy per method and task, one panel per budget."""
    import seaborn as sns

    plt = _pyplot()
    labels = dict(zip(zip(ranked["model"], ranked["method"], ranked["budget"]), _label(ranked)))
    data = tasks[tasks["method"] != REFERENCE].copy()
    data["label"] = [labels.get(k) for k in zip(data["model"], data["method"], data["budget"])]
    data["task"] = data["task"].str.removeprefix("testbed_")
    order = list(dict.fromkeys(_label(ranked[ranked["method"] != REFERENCE])))
    budgets = sorted(set(data["budget"]), key=budget_order)
    fig, axes = plt.subplots(len(budgets), 1, figsize=(3 + 0.8 * data["task"].nunique(),
                                                       len(budgets) * (1.2 + 0.35 * len(order))), squeeze=False)
    for ax, budget in zip(axes[:, 0], budgets):
        table = data[data["budget"] == budget].pivot_table(index="label", columns="task", values="relative_accuracy",
                                                           aggfunc="mean", dropna=False)
        table = table.reindex([o for o in order if o in table.index])
        sns.heatmap(table, annot=True, fmt=".2f", cmap="RdYlGn", vmin=0.5, vmax=1.0, ax=ax, annot_kws={"fontsize": 8})
        ax.set_title(f"budget {budget}", fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.suptitle("relative accuracy per task (blank: the unpruned model scores 0 there)", fontsize=9)
    _save(fig, path)


def _overlay(image: np.ndarray, kept: np.ndarray, evidence: list[int]) -> np.ndarray:
    """The image with its dropped patches dimmed and the outline of its evidence patches drawn."""
    from harness.testbed.world import GRID, PATCH

    keep = np.zeros(GRID * GRID, bool)
    keep[kept] = True
    mask = np.kron(keep.reshape(GRID, GRID), np.ones((PATCH, PATCH), bool))
    out = image.astype(np.float32)
    out[~mask] *= 0.25
    inside = set(evidence)
    for p in inside:
        r, c = divmod(p, GRID)
        y, x = r * PATCH, c * PATCH
        if r == 0 or p - GRID not in inside:
            out[y, x:x + PATCH] = (255, 220, 0)
        if r == GRID - 1 or p + GRID not in inside:
            out[y + PATCH - 1, x:x + PATCH] = (255, 220, 0)
        if c == 0 or p - 1 not in inside:
            out[y:y + PATCH, x] = (255, 220, 0)
        if c == GRID - 1 or p + 1 not in inside:
            out[y:y + PATCH, x + PATCH - 1] = (255, 220, 0)
    return out.astype(np.uint8)


def overlay_docs(kept: dict, docs: dict, task: str, n: int) -> list[int]:
    """The first `n` documents of `task` that have testbed scenes and kept indices."""
    ids = sorted({k[4] for k in kept if k[3] == task})
    return [d for d in ids if "scenes" in docs.get((task, d), {})][:n]


def plot_kept_tokens(ranked: pd.DataFrame, kept: dict, doc: dict, task: str, doc_id: int, path: Path) -> None:
    """Rows: methods; columns: budgets; each the document's (first) image with the dropped tokens dimmed."""
    from harness.testbed.world import GRID, render

    plt = _pyplot()
    scenes = json.loads(doc["scenes"]) if isinstance(doc["scenes"], str) else doc["scenes"]
    image = render(scenes[0])
    evidence = [p for p in doc.get("evidence") or [] if p < GRID * GRID]
    pruned = ranked[ranked["method"] != REFERENCE]
    labels = list(dict.fromkeys(_label(pruned)))
    budgets = sorted(set(pruned["budget"]), key=budget_order)
    cell_of = {(label, b): (m, mo) for label, m, mo, b in zip(_label(pruned), pruned["method"], pruned["model"],
                                                              pruned["budget"])}
    fig, axes = plt.subplots(len(labels), len(budgets), figsize=(2.1 * len(budgets), 2.3 * len(labels)),
                             squeeze=False)
    headed = set()  # columns whose budget is written above their first image
    for r, label in enumerate(labels):
        labelled = False
        for c, budget in enumerate(budgets):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            method, model = cell_of.get((label, budget), (None, None))
            images = kept.get((model, method, budget, task, doc_id))
            if not images or (len(images[0]) and images[0].max() >= GRID * GRID):
                ax.set_axis_off()
                continue
            ax.imshow(_overlay(image, images[0], evidence))
            hit = len(set(evidence) & set(images[0].tolist()))
            title = f"{len(images[0])} kept · evidence {hit}/{len(evidence)}"
            ax.set_title(title if c in headed else f"budget {budget}\n{title}", fontsize=7)
            headed.add(c)
            if not labelled:
                ax.set_ylabel(label, fontsize=8)
                labelled = True
    fig.suptitle(f"{task} #{doc_id}: {doc.get('question', '')} (answer: {doc.get('answer', '?')})\n"
                 "dimmed: dropped tokens; yellow outline: the question's evidence patches", fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-order="asc"]::after { content: " ▲"; } th[data-order="desc"]::after { content: " ▼"; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
"""

# Clicking a header sorts its table's rows by that column (numbers by value, missing values last);
# clicking again reverses the order.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.getAttribute("data-order") !== "asc";
    function key(row) {
      var cell = row.cells[col], v = cell.getAttribute("data-sort");
      if (v === null) return cell.textContent;
      return v === "" ? null : parseFloat(v);
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      var d = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return asc ? d : -d;
    });
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", asc ? "asc" : "desc");
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def html_table(text: pd.DataFrame, raw: pd.DataFrame, table_id: str) -> str:
    """A sortable table: the shown text, and numeric cells' raw values in `data-sort`."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in text.columns)
    body = []
    for i in range(len(text)):
        cells = []
        for column in text.columns:
            shown, value = text[column].iloc[i], raw[column].iloc[i]
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                number = "" if pd.isna(value) else repr(float(value))
                cells.append(f'<td class="num" data-sort="{number}">{html.escape(str(shown))}</td>')
            else:
                cells.append(f"<td>{html.escape(str(shown))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _inline_markdown(text: str) -> str:
    """`code` and **bold** of our own sentences, escaped."""
    import re

    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def write_html(path: Path, runs: list[Run], summary: pd.DataFrame, ranked: pd.DataFrame, rule: Rule,
               plots: list[tuple[Path, str]]) -> None:
    ranking = html_table(*ranking_view(ranked, rule), "ranking")
    cells = html_table(*cell_view(ranked), "cells")
    figures = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(png.read_bytes()).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for png, caption in plots)
    notes = "".join(f"<li>{_inline_markdown(n)}</li>" for n in column_notes(runs))
    protocol = "".join(f"<p>{_inline_markdown(line)}</p>" for line in protocol_lines(runs, summary))
    warnings = "".join(f"<p><em>{_inline_markdown(c)}</em></p>" for c in caveats(runs, ranked))
    path.write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Visual-token pruning leaderboard</title><style>{STYLE}</style></head><body>"
        f"<h1>Visual-token pruning leaderboard</h1>{protocol}"
        f"<p><strong>Ranking rule.</strong> {_inline_markdown(rule.describe())} Click a header to sort.</p>"
        f"{warnings}{ranking}<h2>Every cell</h2>"
        f"<p>The unpruned reference (<code>none</code>) first, then each method's budgets.</p>"
        f"{cells}<ul>{notes}</ul><h2>Plots</h2>{figures}"
        f"<script>{SORT_SCRIPT}</script></body></html>\n")


# ----------------------------------------------------------------------------- render / run

def render(run_dirs, output_dir, rule: str = "relative_accuracy", overlay_task: str = OVERLAY_TASK,
           overlay_count: int = OVERLAY_DOCS) -> pd.DataFrame:
    """Write the leaderboard of the given run folders (merged, later ones win) into `output_dir`;
    returns the ranked cell table."""
    if rule not in RULES:
        raise LeaderboardError(f"unknown ranking rule {rule!r}; known: {', '.join(RULES)}")
    if not run_dirs:
        raise LeaderboardError("no run folder given")
    rule_ = RULES[rule]
    runs = [load_run(d) for d in run_dirs]
    summary, kept, docs = merge(runs)
    tasks = task_table(summary, kept)
    ranked = rank(cell_table(tasks), rule_)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(ranked, out / "leaderboard.csv")
    write_markdown(out / "leaderboard.md", runs, summary, ranked, rule_)
    plots = write_plots(ranked, tasks, kept, docs, runs, out, overlay_task, overlay_count)
    write_html(out / "index.html", runs, summary, ranked, rule_, plots)
    return ranked


def write_plots(ranked, tasks, kept, docs, runs, out: Path, overlay_task: str, overlay_count: int):
    """Every plot, as (path, caption) in page order."""
    devices = ", ".join(dict.fromkeys(d.split(" (")[0] for r in runs for d in r.timing)) or "device unknown"
    plots = [
        (out / "accuracy_vs_kept_tokens.png", plot_accuracy_vs_kept,
         "Accuracy against the visual tokens kept per image; the star and dashed line: unpruned."),
        (out / "consistency_vs_flops.png", plot_consistency_vs_flops,
         "Consistency with the unpruned model (agreement, first-token KL) against the FLOPs ratio."),
        (out / "speedup_vs_relative_accuracy.png", lambda r, p: plot_speedup_vs_accuracy(r, p, devices),
         f"Prefill speedup ({devices}) against relative accuracy; ringed and joined: the Pareto front."),
        (out / "relative_accuracy_by_task.png", lambda r, p: plot_task_heatmap(r, tasks, p),
         "Relative accuracy per method and task, at each budget."),
    ]
    written = []
    for path, plot, caption in plots:
        plot(ranked, path)
        written.append((path, caption))
    for doc_id in overlay_docs(kept, docs, overlay_task, overlay_count):
        path = out / f"kept_tokens_{overlay_task}_{doc_id}.png"
        plot_kept_tokens(ranked, kept, docs[(overlay_task, doc_id)], overlay_task, doc_id, path)
        written.append((path, f"Tokens each method keeps on {overlay_task} document {doc_id}, at each budget."))
    return written


def load_config(path):
    """The protocol in a leaderboard YAML file, as a `harness run` configuration (output not set)."""
    from harness import protocol

    try:
        return protocol.load(path)[0]
    except protocol.ProtocolError as e:
        raise LeaderboardError(str(e)) from None


def run_leaderboard(config_path, output_dir, run_dir=DEFAULT_RUN_DIR, rule: str = "relative_accuracy") -> pd.DataFrame:
    """Run the protocol into `run_dir` (finished cells there are reused, not recomputed), then render."""
    from harness.evaluation.runner import run

    config = load_config(config_path)
    if rule not in RULES:
        raise LeaderboardError(f"unknown ranking rule {rule!r}; known: {', '.join(RULES)}")
    config.output = str(run_dir)
    run(config)
    return render([run_dir], output_dir, rule=rule)


def _leaderboard(args) -> int:
    from harness.evaluation.runner import RunError

    try:
        if args.runs and args.run_dir:
            raise LeaderboardError("--run-dir goes with --config (it is where the protocol runs); "
                                   "--from renders existing run folders")
        if args.runs:
            ranked = render(args.runs, args.output, rule=args.rule)
        else:
            ranked = run_leaderboard(args.config or DEFAULT_CONFIG, args.output, args.run_dir or DEFAULT_RUN_DIR,
                                     rule=args.rule)
    except (LeaderboardError, run_folder.RunFolderError, RunError) as e:
        print(f"harness leaderboard: error: {e}", file=sys.stderr)
        return 2
    text, _ = ranking_view(ranked, RULES[args.rule])
    print(markdown_table(text))
    print(f"\nwrote {Path(args.output) / 'leaderboard.md'}, leaderboard.csv, index.html and the plots")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `harness leaderboard` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "leaderboard", help="run the leaderboard protocol and rank the methods (or render stored runs)",
        description="Rank pruning methods: run the protocol of a config file (reusing finished cells), or "
                    "render existing run folders with --from; writes leaderboard.md, leaderboard.csv, index.html "
                    "and plots into --output.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", default=None,
                        help=f"protocol YAML (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)} of the repository)")
    source.add_argument("--from", dest="runs", nargs="+", metavar="RUN_DIR", default=None,
                        help="render these `harness run` folders without running (later ones win on duplicates)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output folder (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--run-dir", dest="run_dir", default=None,
                        help=f"with --config: the run folder (default: {DEFAULT_RUN_DIR}; finished cells are reused)")
    parser.add_argument("--rule", default="relative_accuracy", choices=list(RULES),
                        help="ranking metric (mean over budgets); ties by the rule's second metric")
    parser.set_defaults(func=_leaderboard)
    return parser
