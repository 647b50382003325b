"""`harness` command line: run evaluations, benchmark, build codebooks, train the testbed and LVPruning's modules.

One module per subcommand, each with `add_parser(subparsers)`; its handler raises an
`harness.errors.InputError` for bad input, which `main` reports once: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys

from harness.errors import InputError

from . import analyze, bench, codebook, leaderboard, lvpruning, merge, regress, run, testbed

SUBCOMMANDS = (run, merge, bench, codebook, analyze, leaderboard, regress, testbed, lvpruning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"{getattr(args, 'prog_name', 'harness ' + args.command)}: error: {e}", file=sys.stderr)
        return 2
