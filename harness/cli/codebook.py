"""`harness codebook build|analyze`: the language-feedback redundancy codebook (harness.codebook)."""

from __future__ import annotations

from harness.errors import InputError
from methods.codebook_files import TESTBED_CODEBOOK


def _codebook_build(args) -> int:
    from pathlib import Path

    from harness.codebook.build import BuildConfig, build
    from harness.codebook.probes import ProbeConfig
    from harness.evaluation.runner import resolve_model

    model = resolve_model(args.model)
    if args.images < 1:
        raise InputError(f"--images must be at least 1, got {args.images}")
    probe = ProbeConfig(**({"prompt": args.prompt} if args.prompt else {}))
    cfg = BuildConfig(images=args.images, jsd_threshold=args.jsd_threshold, pmax_threshold=args.pmax_threshold,
                      min_images=args.min_images, probe=probe)
    try:
        build(str(model), Path(args.output), cfg, cache=args.cache)
    except ValueError as e:  # a bad threshold, probe cache or codebook file
        raise InputError(str(e)) from None
    return 0


def _codebook_analyze(args) -> int:
    from harness.codebook.analyze import analyze

    try:
        analyze(args.codebook, args.output, run_dir=args.run)
    except ValueError as e:  # a missing or malformed codebook (CodebookError) or run folder
        raise InputError(str(e)) from None
    return 0


def add_parser(sub) -> None:
    codebook = sub.add_parser("codebook", help="the language-feedback redundancy codebook").add_subparsers(
        dest="codebook_command", required=True)
    cb_build = codebook.add_parser("build", help="probe images and mine a codebook of redundant prototypes")
    cb_build.add_argument("--model", default=None, help="LLaVA checkpoint folder (default: the testbed model)")
    cb_build.add_argument("--images", type=int, default=500, help="training images to probe (default 500)")
    cb_build.add_argument("--output", default=TESTBED_CODEBOOK, help="codebook file (.pt)")
    cb_build.add_argument("--cache", default=None, help="probe cache folder (default: runs/codebook-probes/<hash>)")
    cb_build.add_argument("--prompt", default=None, help="probe prompt (default: the release's one-word request)")
    cb_build.add_argument("--jsd-threshold", dest="jsd_threshold", type=float, default=None,
                          help="label threshold on JSD_local + 16 JSD_global (default: derived, see build.py)")
    cb_build.add_argument("--pmax-threshold", dest="pmax_threshold", type=float, default=None,
                          help="label threshold on p_max (default: derived)")
    cb_build.add_argument("--min-images", dest="min_images", type=int, default=64,
                          help="stage two keeps clusters with members from more than this many images")
    cb_build.set_defaults(func=_codebook_build, prog_name="harness codebook build")
    cb_analyze = codebook.add_parser("analyze", help="language-feedback redundancy against [CLS] similarity "
                                                     "and attention, on a codebook's probed tokens")
    cb_analyze.add_argument("--codebook", default=TESTBED_CODEBOOK)
    cb_analyze.add_argument("--output", default="runs/codebook-analysis")
    cb_analyze.add_argument("--run", default=None, help="a `harness run` folder with the adaptive codebook: "
                                                        "also plot the tokens it kept per image")
    cb_analyze.set_defaults(func=_codebook_analyze, prog_name="harness codebook analyze")

