"""The README's default-protocol figures from a run's summary.csv.

    python scripts/protocol_figures.py results/testbed_default_protocol.csv

Prints the unpruned accuracy per task, then per budget and method: mean accuracy, accuracy kept
(pruned / unpruned, summed over tasks), agreement, first-token KL, evidence recall, visual tokens
kept and ΔIPR; and the loss of random pruning at 64 tokens in points.
"""
import sys

import pandas as pd

from harness.reports.run_folder import per_task

METRICS = ("agreement", "first_token_kl", "evidence_recall", "visual_tokens_kept", "delta_ipr")
BUDGETS = ("192", "128", "64")


def main(csv: str) -> None:
    d = pd.read_csv(csv, dtype={"budget": str})
    d = per_task(d)  # the means below are taken here
    acc = d[d.metric == "accuracy"]
    none = acc[acc.method == "none"].set_index("task").value
    print("unpruned, mean over tasks:", round(none.mean(), 3))
    print(none.to_string())
    rows = []
    for method, g in d[d.method != "none"].groupby("method"):
        row = {"method": method}
        for budget, gb in g.groupby("budget"):
            a = gb[gb.metric == "accuracy"]
            row[f"acc_{budget}"] = round(a.value.mean(), 3)
            row[f"kept_{budget}"] = round(a.value.sum() / none.sum(), 3)
            for k in METRICS:
                row[f"{k}_{budget}"] = round(gb[gb.metric == k].value.mean(), 3)
        rows.append(row)
    t = pd.DataFrame(rows).set_index("method")
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 60)
    for b in BUDGETS:
        cols = [c for c in t.columns if c.endswith("_" + b)]
        print(f"\nbudget {b}:")
        print(t[cols].dropna(how="all").sort_values(f"kept_{b}", ascending=False).to_string())
    other = [c for c in t.columns if not any(c.endswith("_" + b) for b in BUDGETS)]
    if other:
        print("\nother budgets (adaptive):")
        print(t[other].dropna(how="all").to_string())
    random64 = acc[(acc.method == "random") & (acc.budget == "64")].set_index("task").value
    if len(random64):
        print("\nrandom pruning at 64 tokens loses", round(100 * (none.mean() - random64.mean()), 1), "points")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
