"""`harness` command line: run evaluations, build and train the testbed."""

from __future__ import annotations

import argparse
import sys


def _testbed_train(args) -> int:
    from .testbed import train as T

    recipe = T.Recipe(seed=args.seed)
    for key in ("vision_steps", "align_steps", "instruct_steps"):
        if getattr(args, key) is not None:
            setattr(recipe, key, getattr(args, key))
    trainer = T.Trainer(args.workdir, recipe, device=args.device)
    trainer.run()
    trainer.export(args.output)
    print(f"saved the trained testbed model to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    testbed = sub.add_parser("testbed", help="the synthetic world and its model").add_subparsers(
        dest="testbed_command", required=True)
    train = testbed.add_parser("train", help="train the testbed model (resumable)")
    train.add_argument("--workdir", default="runs/testbed-train", help="checkpoints and training log")
    train.add_argument("--output", default="runs/testbed-model", help="where the trained model is saved")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    train.add_argument("--vision-steps", dest="vision_steps", type=int)
    train.add_argument("--align-steps", dest="align_steps", type=int)
    train.add_argument("--instruct-steps", dest="instruct_steps", type=int)
    train.set_defaults(func=_testbed_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
