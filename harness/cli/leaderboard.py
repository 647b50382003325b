"""`harness leaderboard`: run the leaderboard protocol and rank the methods, or render stored runs
(harness.reports.leaderboard)."""

from __future__ import annotations

from pathlib import Path

from harness.evaluation.runner import REPO_ROOT
from harness.reports.leaderboard import (DEFAULT_CONFIG, DEFAULT_OUTPUT, DEFAULT_RUN_DIR, RULES, LeaderboardError,
                                         markdown_table, ranking_view, render, run_leaderboard)


def _leaderboard(args) -> int:
    if args.runs and args.run_dir:
        raise LeaderboardError("--run-dir goes with --config (it is where the protocol runs); "
                               "--from renders existing run folders")
    if args.runs:
        ranked = render(args.runs, args.output, rule=args.rule)
    else:
        ranked = run_leaderboard(args.config or DEFAULT_CONFIG, args.output, args.run_dir or DEFAULT_RUN_DIR,
                                 rule=args.rule)
    text, _ = ranking_view(ranked, RULES[args.rule])
    print(markdown_table(text))
    print(f"\nwrote {Path(args.output) / 'leaderboard.md'}, leaderboard.csv, index.html and the plots")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
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
    parser.set_defaults(func=_leaderboard, prog_name="harness leaderboard")
