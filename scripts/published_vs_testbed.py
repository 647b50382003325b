"""The testbed's ranking of pruning methods next to rankings published for LLaVA-1.5-7B, and Kendall's tau.

    python scripts/published_vs_testbed.py                  # print the side-by-side table and tau
    python scripts/published_vs_testbed.py --check          # also fail if the CSV's testbed columns are stale
    python scripts/published_vs_testbed.py --write          # refill the CSV's testbed columns from the protocol

Reads the published figures (results/published_vs_testbed.csv: one row per method, budget and source table)
and the committed protocol (results/testbed_default_protocol.csv). The testbed figure is the accuracy kept:
the cell's accuracy summed over the tasks / the unpruned model's, with its 95% paired bootstrap interval
(summary.csv's `all_tasks` rows). Ranks and tau are computed within one
source table and budget only: papers average different benchmark sets, so their scores do not mix.
Tau is scipy's tau-b (ties allowed); with fewer than 4 methods it is printed but marked not informative.
"""
import argparse
import re
import sys
from pathlib import Path

import pandas as pd
from scipy.stats import kendalltau

from harness.reports.run_folder import over_tasks, per_task

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "results" / "published_vs_testbed.csv"
PROTOCOL = ROOT / "results" / "testbed_default_protocol.csv"
COLUMNS = ("method", "published_name", "budget", "source", "table", "benchmarks", "published_metric",
           "published_score", "published_rank", "testbed_accuracy_kept", "testbed_ci_low", "testbed_ci_high",
           "testbed_rank", "transcription", "note")
GROUP = ["source", "table", "budget"]
MIN_INFORMATIVE = 4  # below this many methods a rank correlation says next to nothing
TOLERANCE = 5e-4     # the CSV stores the accuracy kept to 4 decimals


def read_published(path=PUBLISHED) -> pd.DataFrame:
    d = pd.read_csv(path, dtype={"budget": str})
    missing = [c for c in COLUMNS if c not in d.columns]
    if missing:
        sys.exit(f"{path}: missing columns {missing}; expected {list(COLUMNS)}")
    return d


def testbed_kept(protocol: pd.DataFrame) -> dict:
    """(method, budget) -> accuracy summed over the tasks / the unpruned model's, on the same tasks."""
    acc = per_task(protocol)
    acc = acc[acc.metric == "accuracy"]
    none = acc[acc.method == "none"].set_index("task").value
    if none.empty:
        sys.exit("the protocol has no unpruned (`none`) accuracy rows")
    kept = {}
    for (method, budget), g in acc[acc.method != "none"].groupby(["method", "budget"]):
        g = g[g.task.isin(none.index)]
        kept[(method, str(budget))] = g.value.sum() / none[g.task].sum()
    return kept


def short(source: str) -> str:
    """'VisionZip (Yang et al., CVPR 2025), arXiv 2412.04467' -> 'VisionZip, arXiv 2412.04467'."""
    name = re.split(r" \(|, ", source, maxsplit=1)[0]
    arxiv = re.search(r"arXiv \d{4}\.\d{4,5}", source)
    return f"{name}, {arxiv.group(0)}" if arxiv else name


def kendall(published, testbed) -> tuple[float, int]:
    """Kendall's tau-b between two score lists (higher = better in both) and how many items it covers."""
    n = len(published)
    if n < 2:
        return float("nan"), n
    tau = kendalltau(list(published), list(testbed)).statistic
    return float(tau), n


def testbed_intervals(protocol: pd.DataFrame) -> dict:
    """(method, budget) -> the 95% paired bootstrap interval of the accuracy kept (summary.csv's `all_tasks`
    rows: the same ratio of summed accuracies); (nan, nan) for a protocol run before intervals existed."""
    over = over_tasks(protocol).set_index(["method", "budget", "metric"]).value
    return {(m, str(b)): (over.get((m, b, "relative_accuracy_ci_low"), float("nan")),
                          over.get((m, b, "relative_accuracy_ci_high"), float("nan")))
            for m, b in set(zip(protocol.method, protocol.budget))}


def side_by_side(published: pd.DataFrame, kept: dict, bounds: dict | None = None) -> pd.DataFrame:
    """The published rows with the testbed's accuracy kept (and its interval, from `bounds`) and both ranks
    within each source table and budget."""
    d = published.copy()
    missing = [(m, b) for m, b in zip(d.method, d.budget) if (m, b) not in kept]
    if missing:
        sys.exit(f"no testbed cell for {missing}; the protocol has {sorted(kept)}")
    d["testbed_accuracy_kept"] = [round(kept[(m, b)], 4) for m, b in zip(d.method, d.budget)]
    bounds = bounds or {}
    for i, side in enumerate(("low", "high")):
        d[f"testbed_ci_{side}"] = [round(bounds.get((m, b), (float("nan"),) * 2)[i], 4)
                                   for m, b in zip(d.method, d.budget)]
    by = d.groupby(GROUP, sort=False)
    d["published_rank"] = by.published_score.rank(ascending=False, method="average")
    d["testbed_rank"] = by.testbed_accuracy_kept.rank(ascending=False, method="average")
    return d


def taus(d: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (source, table, budget), g in d.groupby(GROUP, sort=False):
        tau, n = kendall(g.published_score, g.testbed_accuracy_kept)
        rows.append({"budget": budget, "source": short(source), "table": table, "n": n, "tau": tau,
                     "informative": n >= MIN_INFORMATIVE, "methods": ", ".join(g.method)})
    return pd.DataFrame(rows)


def stale(csv: pd.DataFrame, fresh: pd.DataFrame) -> list[str]:
    """Rows whose stored testbed figures or ranks differ from the ones recomputed from the protocol."""
    out = []
    for (_, a), (_, b) in zip(csv.iterrows(), fresh.iterrows()):
        intervals_moved = any(abs(a[c] - b[c]) > TOLERANCE or pd.isna(a[c]) != pd.isna(b[c])
                              for c in ("testbed_ci_low", "testbed_ci_high"))
        if (abs(a.testbed_accuracy_kept - b.testbed_accuracy_kept) > TOLERANCE or intervals_moved
                or a.testbed_rank != b.testbed_rank or a.published_rank != b.published_rank):
            out.append(f"{a.method}@{a.budget} ({a.source}): stored {a.testbed_accuracy_kept} / rank "
                       f"{a.testbed_rank} / published rank {a.published_rank}, recomputed "
                       f"{b.testbed_accuracy_kept} / {b.testbed_rank} / {b.published_rank}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--published", default=str(PUBLISHED))
    p.add_argument("--protocol", default=str(PROTOCOL))
    p.add_argument("--check", action="store_true", help="exit 1 if the CSV's testbed columns are stale")
    p.add_argument("--write", action="store_true", help="refill the CSV's testbed columns and ranks")
    args = p.parse_args(argv)
    csv = read_published(args.published)
    protocol = pd.read_csv(args.protocol, dtype={"budget": str})
    d = side_by_side(csv, testbed_kept(protocol), testbed_intervals(protocol))
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 40)
    for budget in sorted(d.budget.unique(), key=int, reverse=True):
        print(f"\n{budget} visual tokens of 576:")
        g = d[d.budget == budget]
        view = pd.DataFrame({"source": g.source.map(short), "table": g.table.str.split(" ").str[:2].str.join(" "),
                             "method": g.method, "published": g.published_score, "pub. rank": g.published_rank,
                             "testbed kept": g.testbed_accuracy_kept,
                             "95% interval": [f"{lo:.3f}-{hi:.3f}"
                                              for lo, hi in zip(g.testbed_ci_low, g.testbed_ci_high)],
                             "testbed rank": g.testbed_rank,
                             "transcription": g.transcription.str.split(":").str[0]})
        print(view.to_string(index=False))
    t = taus(d)
    print("\nKendall tau-b (published vs testbed), within each source table and budget:")
    for r in t.itertuples():
        verdict = "" if r.informative else f"  (n < {MIN_INFORMATIVE}: not informative)"
        print(f"  @{r.budget} {r.source}, {r.table}: tau = {r.tau:+.3f}, n = {r.n} [{r.methods}]{verdict}")
    if args.write:
        d[list(COLUMNS)].to_csv(args.published, index=False)
        print(f"\nwrote {args.published}")
    elif args.check:
        problems = stale(csv, d)
        if problems:
            print("\nstale testbed columns (run with --write):\n  " + "\n  ".join(problems))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
