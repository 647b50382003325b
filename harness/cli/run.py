"""`harness run`: evaluate methods x budgets x tasks through lmms-eval (harness.evaluation.runner)."""

from __future__ import annotations

import argparse
import dataclasses

from harness import protocol
from harness.budget import BUDGET_SCOPES


def limit(text: str):
    """`--limit`: documents per task (harness.protocol.parse_limit), as argparse wants its errors."""
    try:
        return protocol.parse_limit(text)
    except protocol.ProtocolError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("limit: ")) from None


#: RunConfig fields that flags set. Their argparse default is SUPPRESS: a flag not given is absent and
#: leaves the protocol's value (the file's, or the default); `--limit all` is present, as None.
FLAGS = ("methods", "budgets", "tasks", "model", "model_name", "limit", "output", "batch_size", "device", "dtype",
         "log_level", "timing_repeats", "shard")


def config_from(args) -> protocol.RunConfig:
    """The run the flags ask for: a protocol file (`--config`) or the default protocol, with every flag
    given on the command line taking precedence over it."""
    base = protocol.load(args.config)[0] if args.config else protocol.RunConfig()
    return dataclasses.replace(base, **{key: getattr(args, key) for key in FLAGS if hasattr(args, key)})


def _run(args) -> int:
    from harness.evaluation.runner import parse_params, run

    config = config_from(args)
    config.params = parse_params(args.params)
    run(config)
    return 0


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="evaluate methods x budgets x tasks through lmms-eval",
                         description="Evaluate pruning methods at token budgets on lmms-eval tasks, in-process; "
                                     "writes OUTPUT/summary.csv (long format) and OUTPUT/samples/.")
    run.add_argument("--config", default=None,
                     help="a protocol YAML file (configs/leaderboard.yaml's keys); flags given here override it")
    run.add_argument("--methods", default=argparse.SUPPRESS,
                     help="none | all | comma list of registered methods (default: none)")
    run.add_argument("--budgets", default=argparse.SUPPRESS,
                     help="comma list of visual-token budgets (ints: tokens kept; floats: fraction); ignored for none")
    run.add_argument("--tasks", default=argparse.SUPPRESS,
                     help="comma list of tasks or groups: the testbed's (tasks/), or lmms-eval's by name, e.g. "
                          "gqa, pope, textvqa_val, mme, scienceqa_img, mmbench_en_dev, videomme (default: the "
                          "testbed group)")
    run.add_argument("--model", default=argparse.SUPPRESS,
                     help="checkpoint folder, or Hugging Face model id in the local cache (e.g. "
                          "llava-hf/llava-1.5-7b-hf); the family comes from its config (default: the shipped testbed "
                          "model, harness/testbed/checkpoint)")
    run.add_argument("--model-name", dest="model_name", default=argparse.SUPPRESS,
                     help="label in summary.csv (default: testbed, or the folder name)")
    run.add_argument("--limit", type=limit, default=argparse.SUPPRESS,
                     help=f"docs per task, a fraction below 1, or all (default {protocol.DEFAULT_LIMIT})")
    run.add_argument("--output", default=argparse.SUPPRESS, help="output folder (default: runs/<timestamp>)")
    run.add_argument("--batch-size", dest="batch_size", type=int, default=argparse.SUPPRESS,
                     help=f"documents per forward (default {protocol.DEFAULT_BATCH_SIZE})")
    run.add_argument("--device", default=argparse.SUPPRESS, help="cpu (default), cuda or cuda:N")
    run.add_argument("--dtype", default=argparse.SUPPRESS,
                     help="float32 (CPU default), bfloat16 (CUDA default), float16, auto")
    run.add_argument("--log-level", dest="log_level", default=argparse.SUPPRESS,
                     help="lmms-eval log level (default WARNING; INFO shows request counts)")
    run.add_argument("--timing-repeats", dest="timing_repeats", type=int, default=argparse.SUPPRESS,
                     help=f"timed repeats per cell and task in the timing pass (0 skips it; default "
                          f"{protocol.DEFAULT_TIMING_REPEATS})")
    run.add_argument("--budget-scope", dest="budget_scope", choices=BUDGET_SCOPES, default=argparse.SUPPRESS,
                     help="an image of several parts (LLaVA-NeXT / OneVision: base view and crops): split the budget "
                          "over them in proportion (image, the default) or give it to each part (part)")
    run.add_argument("--shard", default=argparse.SUPPRESS, metavar="I/N",
                     help="job I of N (I from 1 to N, e.g. a job array's index) sharing one sweep: the unpruned "
                          "reference and every N-th other cell of the grid from the I-th; cells keep their keys, "
                          "so `harness merge` joins the N output folders into the sweep's (default: every cell)")
    run.add_argument("--params", action="append", metavar="METHOD:KEY=VALUE[;KEY=VALUE]",
                     help="a method's parameters, e.g. --params 'lofi:center=true' (repeatable)")
    run.set_defaults(func=_run, prog_name="harness run")

