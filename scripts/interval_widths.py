"""How wide the leaderboard's intervals are at fewer documents per task: the README's table for choosing the
default protocol's `limit`.

    python scripts/interval_widths.py RUN_DIR [--limits 30,50,70,100]

RUN_DIR is a `harness run --methods all` folder with at least the largest limit's documents per task. For each
limit, every cell is cut to its first documents per task (those `--limit` would evaluate) and the leaderboard's
bootstrap is redone: per method, the half-width of the 95% interval of its ranking figure (mean relative accuracy
over budgets), and the number of distinct ranks.
"""
import argparse

import pandas as pd

from harness.reports.leaderboard import RULES, bands, cell_table, rank, task_table
from harness.reports.leaderboard.loading import load_run, merge


def widths(run_dir, limits: list[int]) -> pd.DataFrame:
    summary, kept, _, views = merge([load_run(run_dir)])
    cells = cell_table(task_table(summary, kept))
    rule = RULES["relative_accuracy"]
    rows = []
    for limit in limits:
        cut = {key: {d: v for d, v in docs.items() if d < limit} for key, docs in views.items()}
        resamples = bands.cell_resamples(cells, cut)
        scores = bands.method_resamples(cells, resamples, rule.metric)
        ranked = rank(cells, rule, scores).drop_duplicates("entry").dropna(subset=["rank"])
        for entry, r, low, high in ranked[["entry", "rank", "score_low", "score_high"]].itertuples(index=False):
            rows.append(dict(limit=limit, method=entry, rank=int(r), half_width=(high - low) / 2))
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--limits", default="30,50,70,100")
    args = parser.parse_args()
    table = widths(args.run_dir, [int(x) for x in args.limits.split(",")])
    wide = table.pivot(index="method", columns="limit", values="half_width")
    ranks = table.pivot(index="method", columns="limit", values="rank")
    pd.set_option("display.width", 200)
    print("half-width of the 95% interval of mean relative accuracy over budgets, points:")
    print((100 * wide).round(1).sort_values(wide.columns[-1]).to_string())
    print("\nrank with ties:")
    print(ranks.loc[(100 * wide).sort_values(wide.columns[-1]).index].to_string())
    print("\ndistinct ranks:", {limit: int(ranks[limit].nunique()) for limit in ranks.columns})


if __name__ == "__main__":
    main()
