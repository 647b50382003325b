"""leaderboard.md, and the sentences around its tables (the protocol, caveats, column notes), written in
Markdown; the web page shows the same sentences."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.budget import ADAPTIVE

from .loading import Run
from .ranking import REFERENCE, Rule
from .tables import cell_view, ranking_view


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


def rank_note(ranked: pd.DataFrame, rule: Rule) -> str:
    """How ranks were made: with ties from the bootstrap, or (no per-document samples found) by points alone."""
    if ranked["banded"].fillna(False).astype(bool).any():
        return rule.ties()
    return ("No per-document samples (samples/*.jsonl) were found, so there are no intervals: ranks follow the "
            "point figures alone and may separate methods that noise cannot.")


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
    cells, _ = cell_view(ranked, rule)
    parts = ["# Visual-token pruning leaderboard", "", *[f"- {line}" for line in protocol_lines(runs, summary)], "",
             f"**Ranking rule.** {rule.describe()} {rank_note(ranked, rule)}", "",
             *[f"> {c}\n" for c in caveats(runs, ranked)],
             markdown_table(ranking), "",
             "## Every cell", "", "The unpruned reference (`none`, rank `ref`) first, then each method's budgets.",
             "", markdown_table(cells), "", "Columns:", "", *[f"- {n}" for n in column_notes(runs)], ""]
    path.write_text("\n".join(parts))
