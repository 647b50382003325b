"""The leaderboard's plots (PNG): accuracy against kept tokens, consistency against FLOPs, prefill speedup
against relative accuracy with the Pareto front, relative accuracy per task; and the helpers the
kept-token pictures (`scenes`) share."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .ranking import REFERENCE, budget_order, many_models


def _palette(entries: list[str]) -> dict:
    import seaborn as sns

    return dict(zip(entries, sns.color_palette("tab10" if len(entries) <= 10 else "husl", len(entries))))


def plot_labels(ranked: pd.DataFrame) -> pd.Series:
    """Each row's method as the plots name it (the entry, prefixed by the model when there are several)."""
    many = many_models(ranked)
    return pd.Series([f"{m}/{e}" if many else e for m, e in zip(ranked["model"], ranked["entry"])], index=ranked.index)


def _plot_data(ranked: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(pruned cells, unpruned cells, colour per method), `method` holding the plots' label."""
    data = ranked.assign(method=plot_labels(ranked))
    reference = ranked["method"] == REFERENCE
    pruned = data[~reference]
    return pruned, data[reference], _palette(list(dict.fromkeys(pruned["method"])))


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_points(reference: pd.DataFrame, ax, x: str, y: str) -> None:
    many = many_models(reference)
    for _, row in reference.iterrows():
        ax.scatter([row[x]], [row[y]], marker="*", s=160, color="black", zorder=5,
                   label="unpruned" + (f" ({row['model']})" if many else ""))


def _error_bars(ax, data: pd.DataFrame, x: str, y: str, palette: dict, axis: str = "y") -> None:
    """Each point's 95% interval of `y` (axis "y") or of `x` (axis "x"), from its `<metric>_ci_low/high`."""
    metric = y if axis == "y" else x
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low not in data:
        return
    for method, group in data.dropna(subset=[low, high]).groupby("method", sort=False):
        spread = [(group[metric] - group[low]).clip(lower=0), (group[high] - group[metric]).clip(lower=0)]
        ax.errorbar(group[x], group[y], **{f"{axis}err": spread}, fmt="none", capsize=2, lw=0.8,
                    color=palette.get(method, "black"), alpha=0.7)


def plot_ranking(ranked: pd.DataFrame, rule, path: Path) -> None:
    """Each method's score (its mean of the ranking figure over budgets) with its 95% interval, best first,
    coloured by rank: methods sharing a colour share a rank."""
    import seaborn as sns

    plt = pyplot()
    methods = ranked[ranked["method"] != REFERENCE].assign(label=plot_labels(ranked))
    methods = methods.drop_duplicates(["model", "entry"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1.2))
    ranks = list(dict.fromkeys(methods["rank"]))
    colours = dict(zip(ranks, sns.color_palette("tab10" if len(ranks) <= 10 else "husl", len(ranks))))
    for i, (_, row) in enumerate(methods.iterrows()):
        colour = colours[row["rank"]]
        if pd.notna(row["score_low"]):
            ax.plot([row["score_low"], row["score_high"]], [i, i], color=colour, lw=2.5, alpha=0.6)
        ax.scatter([row["score"]], [i], color=colour, zorder=3)
    ax.set_yticks(range(len(methods)),
                  [f"{r}. {label}" for r, label in zip(methods["rank"], methods["label"])], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean {rule.metric.replace('_', ' ')} over budgets (95% interval)")
    save_figure(fig, path)


def plot_accuracy_vs_kept(ranked: pd.DataFrame, path: Path) -> None:
    import seaborn as sns

    plt = pyplot()
    pruned, reference, palette = _plot_data(ranked)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=pruned, x="kept_per_image", y="accuracy", hue="method", marker="o", ax=ax, palette=palette)
    _error_bars(ax, pruned, "kept_per_image", "accuracy", palette)
    for accuracy in reference["accuracy"]:
        ax.axhline(accuracy, color="black", ls="--", lw=1)
    _reference_points(reference, ax, "kept_per_image", "accuracy")
    ax.set_xlabel("visual tokens kept per image")
    ax.set_ylabel("accuracy (mean over tasks)")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    save_figure(fig, path)


def plot_consistency_vs_flops(ranked: pd.DataFrame, path: Path) -> None:
    import seaborn as sns

    plt = pyplot()
    pruned, reference, palette = _plot_data(ranked)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, ylabel in ((axes[0], "agreement", "agreement with the unpruned answers"),
                               (axes[1], "first_token_kl", "first-token KL(unpruned ‖ pruned), nats")):
        sns.lineplot(data=pruned, x="flops_ratio", y=metric, hue="method", marker="o", ax=ax, palette=palette,
                     legend=ax is axes[1])
        _error_bars(ax, pruned, "flops_ratio", metric, palette)
        _reference_points(reference, ax, "flops_ratio", metric)
        ax.set_xlabel("FLOPs ratio (prefill + vision, pruned / unpruned)")
        ax.set_ylabel(ylabel)
    if (pruned["first_token_kl"] > 0).any():
        axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    save_figure(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any(a >= x and b >= y and (a > x or b > y) for a, b in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_speedup_vs_accuracy(ranked: pd.DataFrame, path: Path, device: str) -> None:
    import seaborn as sns

    plt = pyplot()
    pruned, reference, palette = _plot_data(ranked.dropna(subset=["prefill_speedup", "relative_accuracy"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if pruned.empty:
        ax.text(0.5, 0.5, "no timing pass in these runs (timing repeats 0)", ha="center", va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    sns.scatterplot(data=pruned, x="prefill_speedup", y="relative_accuracy", hue="method", style="budget", s=60,
                    ax=ax, palette=palette)
    _error_bars(ax, pruned, "prefill_speedup", "relative_accuracy", palette)
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
    save_figure(fig, path)


def plot_task_heatmap(ranked: pd.DataFrame, tasks: pd.DataFrame, path: Path) -> None:
    """Relative accuracy per method and task, one panel per budget."""
    import seaborn as sns

    plt = pyplot()
    labels = dict(zip(zip(ranked["model"], ranked["method"], ranked["budget"]), plot_labels(ranked)))
    data = tasks[tasks["method"] != REFERENCE].copy()
    data["label"] = [labels.get(k) for k in zip(data["model"], data["method"], data["budget"])]
    data["task"] = data["task"].str.removeprefix("testbed_")
    order = list(dict.fromkeys(plot_labels(ranked[ranked["method"] != REFERENCE])))
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
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)

