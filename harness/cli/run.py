"""`harness run`: evaluate methods x budgets x tasks through lmms-eval (harness.evaluation.runner)."""

from __future__ import annotations

import argparse

from harness import protocol


def limit(text: str):
    """`--limit`: documents per task (harness.protocol.parse_limit), as argparse wants its errors."""
    try:
        return protocol.parse_limit(text)
    except protocol.ProtocolError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("limit: ")) from None


def _run(args) -> int:
    from harness.evaluation.runner import parse_params, run

    config = protocol.RunConfig(methods=args.methods, budgets=args.budgets, tasks=args.tasks, model=args.model,
                                model_name=args.model_name, limit=args.limit, output=args.output,
                                batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                log_level=args.log_level, timing_repeats=args.timing_repeats)
    config.params = parse_params(args.params)
    run(config)
    return 0


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="evaluate methods x budgets x tasks through lmms-eval",
                         description="Evaluate pruning methods at token budgets on lmms-eval tasks, in-process; "
                                     "writes OUTPUT/summary.csv (long format) and OUTPUT/samples/.")
    run.add_argument("--methods", default="none", help="none | all | comma list of registered methods (default: none)")
    run.add_argument("--budgets", default=None,
                     help="comma list of visual-token budgets (ints: tokens kept; floats: fraction); ignored for none")
    run.add_argument("--tasks", default=None, help="comma list of tasks or groups (default: the testbed group)")
    run.add_argument("--model", default=None,
                     help="LLaVA checkpoint folder (default: the shipped testbed model, harness/testbed/checkpoint)")
    run.add_argument("--model-name", dest="model_name", default=None,
                     help="label in summary.csv (default: testbed, or the folder name)")
    run.add_argument("--limit", type=limit, default=protocol.DEFAULT_LIMIT,
                     help=f"docs per task, a fraction below 1, or all (default {protocol.DEFAULT_LIMIT})")
    run.add_argument("--output", default=None, help="output folder (default: runs/<timestamp>)")
    run.add_argument("--batch-size", dest="batch_size", type=int, default=protocol.DEFAULT_BATCH_SIZE)
    run.add_argument("--device", default=protocol.DEFAULT_DEVICE, help="cpu (default), cuda or cuda:N")
    run.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16, auto")
    run.add_argument("--log-level", dest="log_level", default=None,
                     help="lmms-eval log level (default WARNING; INFO shows request counts)")
    run.add_argument("--timing-repeats", dest="timing_repeats", type=int, default=protocol.DEFAULT_TIMING_REPEATS,
                     help="timed repeats per cell and task in the timing pass (0 skips it)")
    run.add_argument("--params", action="append", metavar="METHOD:KEY=VALUE[;KEY=VALUE]",
                     help="a method's parameters, e.g. --params 'lofi:center=true' (repeatable)")
    run.set_defaults(func=_run, prog_name="harness run")

