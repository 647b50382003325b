"""`harness analyze consistency RUN_DIR`: does the change in IPR predict consistency? (METHODS.md §3)

The LoFi paper claims that the change in the Inverse Participation Ratio of the visual tokens'
singular-value spectrum (ΔIPR = IPR(kept) − IPR(all), recorded per sample for every method)
correlates with how consistent the pruned model stays with the unpruned one. Tested on a run's
summary: one point per pruned (method, budget, task) cell, ΔIPR against each consistency metric,
Spearman and Pearson correlations over all points and within each task (so that differences
between tasks do not pass for an effect).

Written to RUN_DIR/analysis/: ipr_consistency.csv (the correlations), ipr_consistency.png (the
scatter plots, one colour per method).
"""

from __future__ import annotations

from pathlib import Path

from harness.reports import run_folder

CONSISTENCY = ("agreement", "flip_correct_to_wrong", "first_token_kl", "first_token_jsd", "top1_agreement",
               "teacher_forced_nll", "relative_accuracy")


def cell_table(summary_csv: Path):
    """Pruned cells as rows (model, method, budget, task) with delta_ipr and the consistency metrics."""
    long = run_folder.per_task(run_folder.read_summary(summary_csv))
    wanted = long[long["metric"].isin(("delta_ipr",) + CONSISTENCY) & (long["method"] != "none")]
    wide = wanted.pivot_table(index=["model", "method", "budget", "task"], columns="metric", values="value")
    if "delta_ipr" not in wide or wide["delta_ipr"].notna().sum() < 3:
        raise ValueError(f"{summary_csv} has fewer than 3 pruned cells with delta_ipr: run more methods or budgets")
    return wide.reset_index()


def correlations(table) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd
    from scipy import stats

    rows = []
    groups = [("all tasks", table)] + [(task, part) for task, part in table.groupby("task")]
    for metric in CONSISTENCY:
        if metric not in table:
            continue
        for scope, part in groups:
            pair = part[["delta_ipr", metric]].dropna()
            if len(pair) < 3 or pair[metric].nunique() < 2 or pair["delta_ipr"].nunique() < 2:
                continue
            rho, p_rho = stats.spearmanr(pair["delta_ipr"], pair[metric])
            r, p_r = stats.pearsonr(pair["delta_ipr"], pair[metric])
            rows.append({"metric": metric, "scope": scope, "cells": len(pair), "spearman": rho,
                         "spearman_p": p_rho, "pearson": r, "pearson_p": p_r})
    return pd.DataFrame(rows)


def analyze_consistency(run_dir: str | Path, say=print):
    run_dir = run_folder.folder(run_dir)  # a RunFolderError (a ValueError) names what is missing
    table = cell_table(run_dir / run_folder.SUMMARY)
    result = correlations(table)
    out = run_dir / "analysis"
    out.mkdir(exist_ok=True)
    result.to_csv(out / "ipr_consistency.csv", index=False)
    _plot(table, out / "ipr_consistency.png")
    pooled = result[result["scope"] == "all tasks"]
    say(pooled.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    say(f"{len(table)} pruned cells; per-task correlations in {out / 'ipr_consistency.csv'}; plot ipr_consistency.png")
    return result


def _plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = [m for m in CONSISTENCY if m in table]
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for i, (ax, metric) in enumerate(zip(flat, metrics)):
        sns.scatterplot(data=table, x="delta_ipr", y=metric, hue="method", style="budget", ax=ax, s=30,
                        legend=i == len(metrics) - 1)
        ax.set_xlabel("ΔIPR (kept − all)")
    for ax in flat[len(metrics):]:
        ax.axis("off")
    if metrics:
        flat[len(metrics) - 1].legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
