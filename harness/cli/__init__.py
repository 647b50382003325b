"""`harness` command line: run evaluations, benchmark, build codebooks, train the testbed."""

from __future__ import annotations

import argparse
import sys

# The default protocol (`harness run` with no flags): the testbed group, this many test documents per
# task, budgets 192/128/64 (harness.evaluation.runner.DEFAULT_BUDGETS), timing repeats 5.
DEFAULT_LIMIT = 30


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
        print(f"harness testbed train: {err}", file=sys.stderr)
        return 2
    trainer.run()
    trainer.export(args.output, command=" ".join(["harness"] + sys.argv[1:]))
    print(f"saved the trained testbed model to {args.output}")
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from harness.evaluation import runner
    from harness.bench.measure import MODELS, TOKENS_PER_IMAGE, run_bench

    try:
        names = runner.resolve_methods(args.methods)
        budgets = runner.parse_budgets(args.budgets)
        runner.check_budgets(budgets, TOKENS_PER_IMAGE)
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        unknown = [m for m in models if m not in MODELS]
        if unknown or not models:
            raise runner.RunError(f"unknown bench model(s) {unknown}; accepted: {', '.join(MODELS)}")
        if args.repeats < 1:
            raise runner.RunError(f"--repeats must be at least 1, got {args.repeats}")
        if args.batch_size < 1:
            raise runner.RunError(f"--batch-size must be at least 1, got {args.batch_size}")
    except runner.RunError as e:
        print(f"harness bench: {e}", file=sys.stderr)
        return 2
    run_bench(names, Path(args.output), repeats=args.repeats, budgets=tuple(budgets), models=models,
              batch=args.batch_size)
    return 0


def _codebook_build(args) -> int:
    from pathlib import Path

    from harness.codebook.build import BuildConfig, build
    from harness.codebook.probes import ProbeConfig
    from harness.evaluation.runner import RunError, resolve_model

    try:
        model = resolve_model(args.model)
        if args.images < 1:
            raise RunError(f"--images must be at least 1, got {args.images}")
    except RunError as e:
        print(f"harness codebook build: error: {e}", file=sys.stderr)
        return 2
    probe = ProbeConfig(**({"prompt": args.prompt} if args.prompt else {}))
    cfg = BuildConfig(images=args.images, jsd_threshold=args.jsd_threshold, pmax_threshold=args.pmax_threshold,
                      min_images=args.min_images, probe=probe)
    try:
        build(str(model), Path(args.output), cfg, cache=args.cache)
    except ValueError as e:
        print(f"harness codebook build: error: {e}", file=sys.stderr)
        return 2
    return 0


def _codebook_analyze(args) -> int:
    from harness.codebook.analyze import analyze
    from methods.codebook_files import CodebookError

    try:
        analyze(args.codebook, args.output, run_dir=args.run)
    except (ValueError, CodebookError) as e:
        print(f"harness codebook analyze: error: {e}", file=sys.stderr)
        return 2
    return 0


def _analyze_consistency(args) -> int:
    from harness.reports.ipr_analysis import analyze_consistency

    try:
        analyze_consistency(args.run_dir)
    except ValueError as e:
        print(f"harness analyze consistency: error: {e}", file=sys.stderr)
        return 2
    return 0


def _limit(text: str):
    """An int (docs per task), a float below 1 (a fraction of each task), as lmms-eval takes it, or
    `all` (None: every document)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def _run(args) -> int:
    from harness.evaluation.runner import RunConfig, RunError, parse_params, run

    config = RunConfig(methods=args.methods, budgets=args.budgets, tasks=args.tasks, model=args.model,
                       model_name=args.model_name, limit=args.limit, output=args.output,
                       batch_size=args.batch_size, device=args.device, dtype=args.dtype, log_level=args.log_level,
                       timing_repeats=args.timing_repeats)
    try:
        config.params = parse_params(args.params)
        run(config)
    except RunError as e:
        print(f"harness run: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    run.add_argument("--limit", type=_limit, default=DEFAULT_LIMIT,
                     help=f"docs per task, a fraction below 1, or all (default {DEFAULT_LIMIT}: the default protocol)")
    run.add_argument("--output", default=None, help="output folder (default: runs/<timestamp>)")
    run.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    run.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    run.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16, auto")
    run.add_argument("--log-level", dest="log_level", default=None,
                     help="lmms-eval log level (default WARNING; INFO shows request counts)")
    run.add_argument("--timing-repeats", dest="timing_repeats", type=int, default=5,
                     help="timed repeats per cell and task in the timing pass (0 skips it)")
    run.add_argument("--params", action="append", metavar="METHOD:KEY=VALUE[;KEY=VALUE]",
                     help="a method's parameters, e.g. --params 'lofi:center=true' (repeatable)")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="selection overhead, realized vs predicted speedup, memory")
    bench.add_argument("--methods", default="all", help="all | comma list of registered methods")
    bench.add_argument("--budgets", default="192,128,64")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats per quantity (median reported)")
    bench.add_argument("--models", default="testbed,scaled-llava-1.5,llava-1.5-7b",
                       help="comma list of testbed, scaled-llava-1.5 (end to end) and llava-1.5-7b "
                            "(extrapolated from its real-size layers, harness.bench.cost_model)")
    bench.add_argument("--batch-size", dest="batch_size", type=int, default=1,
                       help="identical prompts prefilled together (1: one request; `harness run` batches 8)")
    bench.add_argument("--output", default="runs/bench", help="folder for bench.csv and bench.png")
    bench.set_defaults(func=_bench)

    codebook = sub.add_parser("codebook", help="the language-feedback redundancy codebook").add_subparsers(
        dest="codebook_command", required=True)
    cb_build = codebook.add_parser("build", help="probe images and mine a codebook of redundant prototypes")
    cb_build.add_argument("--model", default=None, help="LLaVA checkpoint folder (default: the testbed model)")
    cb_build.add_argument("--images", type=int, default=500, help="training images to probe (default 500)")
    cb_build.add_argument("--output", default="harness/testbed/codebook/codebook.pt", help="codebook file (.pt)")
    cb_build.add_argument("--cache", default=None, help="probe cache folder (default: runs/codebook-probes/<hash>)")
    cb_build.add_argument("--prompt", default=None, help="probe prompt (default: the release's one-word request)")
    cb_build.add_argument("--jsd-threshold", dest="jsd_threshold", type=float, default=None,
                          help="label threshold on JSD_local + 16 JSD_global (default: derived, see build.py)")
    cb_build.add_argument("--pmax-threshold", dest="pmax_threshold", type=float, default=None,
                          help="label threshold on p_max (default: derived)")
    cb_build.add_argument("--min-images", dest="min_images", type=int, default=64,
                          help="stage two keeps clusters with members from more than this many images")
    cb_build.set_defaults(func=_codebook_build)
    cb_analyze = codebook.add_parser("analyze", help="language-feedback redundancy against [CLS] similarity "
                                                     "and attention, on a codebook's probed tokens")
    cb_analyze.add_argument("--codebook", default="harness/testbed/codebook/codebook.pt")
    cb_analyze.add_argument("--output", default="runs/codebook-analysis")
    cb_analyze.add_argument("--run", default=None, help="a `harness run` folder with the adaptive codebook: "
                                                        "also plot the tokens it kept per image")
    cb_analyze.set_defaults(func=_codebook_analyze)

    analyze = sub.add_parser("analyze", help="analyses of a finished run").add_subparsers(
        dest="analyze_command", required=True)
    consistency = analyze.add_parser("consistency", help="does ΔIPR predict consistency? (LoFi's claim)")
    consistency.add_argument("run_dir", help="output folder of a `harness run`")
    consistency.set_defaults(func=_analyze_consistency)

    from harness.reports import leaderboard, regress

    leaderboard.add_parser(sub)
    regress.add_parser(sub)

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
    train.set_defaults(func=_testbed_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

