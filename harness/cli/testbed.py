"""`harness testbed train`: train the testbed model (harness.testbed.training) from a recipe file."""

from __future__ import annotations

import sys

from harness.errors import InputError


def _testbed_train(args) -> int:
    from harness.testbed.training import recipe as R
    from harness.testbed.training.trainer import Trainer

    recipe = R.load(args.recipe) if args.recipe else R.Recipe()
    if args.seed is not None:
        recipe.seed = args.seed
    try:  # a donor that does not fit, switches that need each other: one clear line, nothing trained yet
        trainer = Trainer(args.workdir, recipe, device=args.device)
    except ValueError as err:
        raise InputError(str(err)) from None
    trainer.run()
    trainer.export(args.output, command=" ".join(["harness"] + sys.argv[1:]))
    print(f"saved the trained testbed model to {args.output}")
    return 0


def add_parser(sub) -> None:
    testbed = sub.add_parser("testbed", help="the synthetic world and its model").add_subparsers(
        dest="testbed_command", required=True)
    train = testbed.add_parser("train", help="train the testbed model (resumable)")
    train.add_argument("--recipe", metavar="FILE",
                       help="the training recipe: a YAML file of Recipe fields (harness/testbed/training/recipe.py; "
                            "the shipped model's is harness/testbed/checkpoint/recipe.yaml); default: Recipe's "
                            "defaults, the three stages from scratch")
    train.add_argument("--workdir", default="runs/testbed-train", help="checkpoints and training log")
    train.add_argument("--output", default="runs/testbed-model", help="where the trained model is saved")
    train.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    train.set_defaults(func=_testbed_train, prog_name="harness testbed train")
