"""`harness testbed train`: train the testbed model (harness.testbed.train)."""

from __future__ import annotations

import argparse
import sys

from harness.errors import InputError

# `harness testbed train` flags that set the Recipe field of the same name (harness/testbed/train.py,
# where each is explained): (flag, type, or bool for a switch, or a tuple of choices; help).
RECIPE_FLAGS = [
    ("--vision-steps", int, None),
    ("--align-steps", int, None),
    ("--instruct-steps", int, None),
    ("--instruct-lr", float, None),
    ("--curriculum-steps", int, None),
    ("--attention-weight", float, "weight of the evidence-attention loss (0 turns it off)"),
    ("--readout-weight", float, "weight of the retrieval heads' read-out loss (0 turns it off)"),
    ("--readout-answers", ("attributes", "all"),
     "answers the read-out loss covers: colours and letters, or also yes/no and relations"),
    ("--sink-for-absent", bool, "for a 'no', teach the retrieval heads to look at <s> rather than partial matches"),
    ("--count-centres", bool, "for a count, teach the retrieval heads to spread evenly over <s> and each counted "
                              "object's centre patch, and read the count out of them"),
    ("--count-objects", bool, "with --count-centres: <s> and each counted object (all its patches together) "
                              "take an equal share of the retrieval heads' mass, not each object's centre patch"),
    ("--value-position-weight", float, "weight of a loss keeping each image token's grid position readable from "
                                       "the retrieval heads' value vectors (0 turns it off)"),
    ("--spread-words", bool, "teach layer 0's heads 2-3 to spread evenly over the words naming a referent "
                             "(its colour and its shape), not only to look at them"),
    ("--key-attribute-weight", float, "weight of a loss keeping each colour and kind retrievable from the "
                                      "retrieval heads' keys by a free query (0 turns it off)"),
    ("--position-weight", float, "weight of a loss keeping each image token's grid position readable from the "
                                 "projector output during instruction tuning (0 turns it off)"),
    ("--init-from", str, "take every weight from this llava-hf checkpoint and continue instruction tuning"),
    ("--tower-steps", int, "with --init-from: first continue its vision tower for this many stage-1 steps"),
    ("--tower-lr", float, "peak learning rate of that continuation"),
    ("--letter-scenes", float, "share of each stage-1 batch drawn as reading scenes (4-8 letters, small shapes)"),
    ("--letter-weight", float, "weight of a stage-1 kind loss over letter patches among the letters only"),
    ("--anchor-weight", float, "weight of a loss keeping the continued tower's non-letter features near the "
                               "donor's (0 turns it off)"),
    ("--balance-counts", bool, "thin the derived count questions towards uniform answers (one answering n is "
                               "kept with probability (n/4)^2)"),
    ("--reading-share", float, "share of each single-image instruction batch drawn as reading scenes (4-8 "
                                "letters) with every question they allow"),
    ("--count-share", float, "share of each single-image instruction batch drawn from the count family on top "
                              "of its round-robin slot"),
    ("--count-attention-weight", float, "weight of the count questions' rows in the retrieval heads' attention "
                                        "loss, relative to the other questions' (1 = the same)"),
    ("--count-heads-weight", float, "weight of a loss teaching counts to heads 2-3 of the retrieval layer as well "
                                    "(attention on <s> and the counted centres, count read out); needs "
                                    "--count-centres (0 turns it off)"),
    ("--kind-count-weight", float, "weight of a stage-1 loss teaching every patch of a shape how many shapes of "
                                   "its kind the scene holds (0 turns it off)"),
    ("--cls-count-weight", float, "weight of a stage-1 loss teaching [CLS] each shape kind's count in the image "
                                  "(0 turns it off)"),
    ("--small-shape-weight", float, "weight of a stage-1 kind loss over small shapes' patches (6 or fewer), each "
                                    "shape weighted equally; frees them from the anchor (0 turns it off)"),
    ("--count-readout", bool, "read counts out of the retrieval heads also with the default count target "
                              "(every patch of every counted object)"),
    ("--turns", int, "questions per training conversation"),
    ("--single-batch", int, "images per single-image instruction step"),
    ("--eval-every", int, "instruction steps between validation evaluations"),
    ("--vision-from", str, "take the vision tower from this llava-hf checkpoint and skip stage 1"),
]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _testbed_train(args) -> int:
    from harness.testbed import train as T

    recipe = T.Recipe(seed=args.seed)
    for flag, _, _ in RECIPE_FLAGS:
        key = flag[2:].replace("-", "_")
        if getattr(args, key) is not None:
            setattr(recipe, key, getattr(args, key))
    try:  # a donor checkpoint that is missing or does not fit: one clear line, nothing trained yet
        if args.rope_theta is None and recipe.init_from:
            args.rope_theta = T.rope_theta_of(recipe.init_from)  # continue under the donor's rotation
        if args.rope_theta is not None:
            recipe.dims = {**recipe.dims, "rope_theta": args.rope_theta}
        trainer = T.Trainer(args.workdir, recipe, device=args.device)
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
    train.add_argument("--workdir", default="runs/testbed-train", help="checkpoints and training log")
    train.add_argument("--output", default="runs/testbed-model", help="where the trained model is saved")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    for flag, kind, help_text in RECIPE_FLAGS:
        if kind is bool:
            train.add_argument(flag, action="store_const", const=True, help=help_text)
        elif isinstance(kind, tuple):
            train.add_argument(flag, choices=kind, help=help_text)
        else:
            train.add_argument(flag, type=kind, help=help_text)
    train.add_argument("--rope-theta", dest="rope_theta", type=_positive_float,
                       help="RoPE base of the decoder (default 10000; with --init-from, the donor's): the "
                            "weights are kept and only the rotation changes")
    train.set_defaults(func=_testbed_train, prog_name="harness testbed train")
