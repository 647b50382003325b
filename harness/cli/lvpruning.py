"""`harness lvpruning train`: train LVPruning's decision modules on a frozen testbed-class model (harness.lvpruning)."""

from __future__ import annotations

import sys

from harness.errors import InputError
from methods.lvpruning_modules import TESTBED_MODULES


def _layers(text: str | None):
    if text is None:
        return None
    try:
        return tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise InputError(f"--layers {text!r}: expected decoder layer indices separated by commas, e.g. 0,1,2") from None


def _lvpruning_train(args) -> int:
    from pathlib import Path

    from harness.lvpruning.train import Settings, Trainer, TrainingInputError

    overrides = {k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("lr", args.lr),
                                   ("seed", args.seed)) if v is not None}
    settings = Settings(layers=_layers(args.layers), **overrides)
    output = Path(args.output)
    if output.is_dir():
        raise TrainingInputError(f"--output {output} is a folder; expected a file, e.g. {TESTBED_MODULES}")
    if args.threads is not None:
        if args.threads < 1:
            raise TrainingInputError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    # The model folder, layers, targets, device and workdir are checked before the model loads.
    trainer = Trainer(args.model, args.workdir, settings, device=args.device, log=lambda line: None)
    trainer.run()
    path = trainer.export(output, command=" ".join(["harness"] + sys.argv[1:]))
    final = trainer.final_losses()
    print(f"saved LVPruning modules to {path} (steps {trainer.state.step}, {trainer.state.seconds / 60:.1f} min, "
          f"final loss {final.get('loss')}, keep {final.get('keep')}); log: {path.parent / 'train_log.jsonl'}")
    return 0


def add_parser(sub) -> None:
    lvp = sub.add_parser("lvpruning", help="LVPruning's trained decision modules").add_subparsers(
        dest="lvpruning_command", required=True)
    train = lvp.add_parser("train", help="train the decision modules on a frozen testbed-class model (resumable)")
    train.add_argument("--model", default="harness/testbed/checkpoint",
                       help="LLaVA-1.5-class checkpoint folder whose samples are the testbed's (default: the testbed)")
    train.add_argument("--output", default=TESTBED_MODULES, help="module file (.safetensors); its folder is made")
    train.add_argument("--workdir", default="runs/lvpruning-train",
                       help="checkpoints and log; a rerun with the same workdir resumes")
    train.add_argument("--steps", type=int, default=None, help="optimiser steps (default: Settings.steps)")
    train.add_argument("--batch", type=int, default=None, help="samples per step (default: Settings.batch)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default: Settings.lr)")
    train.add_argument("--layers", default=None,
                       help="decoder layers the modules prune before, e.g. 0,1,2 (default: LLaVA's 1, 8, 16 of 32 "
                            "mapped onto the decoder's depth)")
    train.add_argument("--seed", type=int, default=None, help="seed of the batches, draws and initialisation")
    train.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default: torch's); 1 is much faster on cores another job also uses")
    train.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    train.set_defaults(func=_lvpruning_train, prog_name="harness lvpruning train")
