"""`harness regress`: compare a run with a baseline run of the same protocol, record and plot the history,
run the CI protocol (harness.reports.regress). Its functions print their verdicts and unusable input
themselves and return the exit code: 0 pass, 1 regression, 2 unusable input."""

from __future__ import annotations

from harness.errors import InputError
from harness.reports.regress import (ALPHA, CI_CONFIG, HISTORY_FILE, LATENCY_TOL, RECALL_TOL, TOKEN_TOL, Thresholds, ci,
                                     plot_history, record, regress)


def _regress(args) -> int:
    th = Thresholds(alpha=args.alpha, token_tol=args.token_tol, recall_tol=args.recall_tol,
                    latency_tol=args.latency_tol, strict_latency=args.strict_latency)
    if args.ci:
        return ci(args.ci_config, current=args.current, write_baseline=args.write_baseline, th=th)
    if args.record:
        return record(args.record, args.history_file)
    if args.history:
        return plot_history(args.history_file, args.output)
    if not (args.baseline and args.current):
        raise InputError("give --baseline DIR and --current DIR (or --ci, --record RUN_DIR, --history)")
    return regress(args.baseline, args.current, args.output, th)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "regress", help="compare a run with a baseline run of the same protocol (exit 1 on regression)",
        description="Cell-by-cell comparison with paired statistics; exit 0 pass, 1 regression, 2 unusable input.")
    p.add_argument("--baseline", help="baseline run folder (summary.csv + results.sqlite)")
    p.add_argument("--current", help="current run folder; with --ci: the (fresh) folder to run into")
    p.add_argument("--output", default=None,
                   help="folder for regress.md/regress.csv (default: the current run's); with --history: the PNG")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"McNemar significance per cell (default {ALPHA})")
    p.add_argument("--token-tol", dest="token_tol", type=float, default=TOKEN_TOL,
                   help=f"allowed change of mean kept tokens (default {TOKEN_TOL})")
    p.add_argument("--recall-tol", dest="recall_tol", type=float, default=RECALL_TOL,
                   help=f"mean evidence-recall fall tolerated even when systematic (default {RECALL_TOL})")
    p.add_argument("--latency-tol", dest="latency_tol", type=float, default=LATENCY_TOL,
                   help=f"allowed relative worsening of the in-run prefill ratio (default {LATENCY_TOL})")
    p.add_argument("--strict-latency", dest="strict_latency", action="store_true",
                   help="a latency warning is a regression")
    p.add_argument("--record", metavar="RUN_DIR", help="append RUN_DIR's headline figures to the history file")
    p.add_argument("--history", action="store_true", help="plot the history file's trend")
    p.add_argument("--history-file", dest="history_file", default=str(HISTORY_FILE))
    p.add_argument("--ci", action="store_true", help="run the CI protocol and compare with the committed baseline")
    p.add_argument("--ci-config", dest="ci_config", default=str(CI_CONFIG))
    p.add_argument("--write-baseline", dest="write_baseline", action="store_true",
                   help="with --ci: remake the committed baseline from a fresh run instead of comparing")
    p.set_defaults(func=_regress, prog_name="harness regress")
