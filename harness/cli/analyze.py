"""`harness analyze consistency`: analyses of a finished run (harness.reports.ipr_analysis)."""

from __future__ import annotations

from harness.errors import InputError


def _analyze_consistency(args) -> int:
    from harness.reports.ipr_analysis import analyze_consistency

    try:
        analyze_consistency(args.run_dir)
    except ValueError as e:  # not a finished run folder, or no pruned cell with the metrics
        raise InputError(str(e)) from None
    return 0


def add_parser(sub) -> None:
    analyze = sub.add_parser("analyze", help="analyses of a finished run").add_subparsers(
        dest="analyze_command", required=True)
    consistency = analyze.add_parser("consistency", help="does ΔIPR predict consistency? (LoFi's claim)")
    consistency.add_argument("run_dir", help="output folder of a `harness run`")
    consistency.set_defaults(func=_analyze_consistency, prog_name="harness analyze consistency")

