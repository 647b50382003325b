"""`harness leaderboard`: rank pruning methods from stored results, for a README and a static web page.

Reads only what `harness run` stored in its output folders (`summary.csv`, `results.sqlite`,
`samples/*.jsonl`), so a leaderboard can be rebuilt at any time without a model. Writes, into the
output folder:

* ``leaderboard.md``: the ranking rule, a ranking table (one row per method, its score's 95% interval,
  ranks that admit ties) and a table of every (method, budget) cell: accuracy, relative accuracy,
  agreement, correct→wrong flips, first-token KL, FLOPs ratio, prefill speedup and kept tokens per image;
* ``leaderboard.csv``: the cell table's numbers and their intervals, one row per (model, method, budget);
* the plots (PNG): the ranking with intervals, accuracy against kept tokens, consistency against FLOPs, prefill speedup
  against relative accuracy with the Pareto front, relative accuracy per task, and the tokens each
  method keeps on a few test images;
* ``index.html``: all of it in one self-contained page (inline CSS and script, plots as base64
  PNGs: it opens offline), with tables sorted by clicking a header.

How a cell's numbers are made is in `ranking`. Several run folders merge: a later folder's
(method, budget, task) replaces an earlier one's. This module runs the steps; one module per step:
`loading` (run folders), `ranking`, `tables` (display and CSV), `markdown`, `page` (HTML), `plots`,
`scenes` (the testbed's kept-token pictures), `bands` (bootstrap resamples: intervals, ranks with ties).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness import protocol
from harness.errors import InputError
from harness.evaluation.runner import REPO_ROOT, run

from . import bands
from .loading import load_run, merge
from .markdown import markdown_table, write_markdown
from .page import write_html
from .plots import (plot_accuracy_vs_kept, plot_consistency_vs_flops, plot_ranking, plot_speedup_vs_accuracy,
                    plot_task_heatmap)
from .ranking import METRICS, RULES, Rule, cell_table, rank, task_table
from .scenes import overlay_docs, plot_kept_tokens
from .tables import ranking_view, write_csv

# What the command line and callers use; the steps are in their modules.
__all__ = ["DEFAULT_CONFIG", "DEFAULT_OUTPUT", "DEFAULT_RUN_DIR", "RULES", "LeaderboardError", "cell_table",
           "load_config", "markdown_table", "ranking_view", "render", "run_leaderboard", "task_table"]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "leaderboard.yaml"
DEFAULT_OUTPUT = "results/leaderboard"
DEFAULT_RUN_DIR = "runs/leaderboard"
OVERLAY_TASK = "testbed_color"  # whose first documents show the kept tokens
OVERLAY_DOCS = 3


class LeaderboardError(InputError):
    """Bad input (a run folder, a config file), reported in one line without a traceback."""


def _rule(name: str) -> Rule:
    if name not in RULES:
        raise LeaderboardError(f"unknown ranking rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


def render(run_dirs, output_dir, rule: str = "relative_accuracy", overlay_task: str = OVERLAY_TASK,
           overlay_count: int = OVERLAY_DOCS) -> pd.DataFrame:
    """Write the leaderboard of the given run folders (merged, later ones win) into `output_dir`;
    returns the ranked cell table."""
    rule_ = _rule(rule)
    if not run_dirs:
        raise LeaderboardError("no run folder given")
    runs = [load_run(d) for d in run_dirs]
    summary, kept, docs, views = merge(runs)
    tasks = task_table(summary, kept)
    cells = cell_table(tasks)
    resamples = bands.cell_resamples(cells, views)
    ranked = rank(bands.with_intervals(cells, resamples), rule_, bands.method_resamples(cells, resamples, rule_.metric))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(ranked, out / "leaderboard.csv")
    write_markdown(out / "leaderboard.md", runs, summary, ranked, rule_)
    plots = write_plots(ranked, tasks, kept, docs, runs, out, overlay_task, overlay_count, rule_)
    write_html(out / "index.html", runs, summary, ranked, rule_, plots)
    return ranked


def write_plots(ranked, tasks, kept, docs, runs, out: Path, overlay_task: str, overlay_count: int, rule: Rule):
    """Every plot, as (path, caption) in page order."""
    devices = ", ".join(dict.fromkeys(d.split(" (")[0] for r in runs for d in r.timing)) or "device unknown"
    plots = [
        (out / "ranking.png", lambda r, p: plot_ranking(r, rule, p),
         f"Each method's mean {METRICS[rule.metric][0]} with its 95% interval; one colour per rank (ranks admit "
         "ties)."),
        (out / "accuracy_vs_kept_tokens.png", plot_accuracy_vs_kept,
         "Accuracy against the visual tokens kept per image, with 95% intervals; the star and dashed line: "
         "unpruned."),
        (out / "consistency_vs_flops.png", plot_consistency_vs_flops,
         "Consistency with the unpruned model (agreement, first-token KL) against the FLOPs ratio, with "
         "95% intervals."),
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
    try:
        return protocol.load(path)[0]
    except protocol.ProtocolError as e:
        raise LeaderboardError(str(e)) from None


def run_leaderboard(config_path, output_dir, run_dir=DEFAULT_RUN_DIR, rule: str = "relative_accuracy") -> pd.DataFrame:
    """Run the protocol into `run_dir` (finished cells there are reused, not recomputed), then render."""
    config = load_config(config_path)
    _rule(rule)  # refused before the run, not after it
    config.output = str(run_dir)
    run(config)
    return render([run_dir], output_dir, rule=rule)
