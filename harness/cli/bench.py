"""`harness bench`: selection overhead, realized against predicted speedup, memory (harness.bench)."""

from __future__ import annotations

from harness.errors import InputError


def _bench(args) -> int:
    from pathlib import Path

    from harness.bench.measure import MODELS, TOKENS_PER_IMAGE, run_bench
    from harness.evaluation import runner

    names = runner.resolve_methods(args.methods)
    budgets = runner.parse_budgets(args.budgets)
    runner.check_budgets(budgets, TOKENS_PER_IMAGE)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise InputError(f"unknown bench model(s) {unknown}; accepted: {', '.join(MODELS)}")
    if args.repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {args.repeats}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    run_bench(names, Path(args.output), repeats=args.repeats, budgets=tuple(budgets), models=models,
              batch=args.batch_size)
    return 0


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="selection overhead, realized vs predicted speedup, memory")
    bench.add_argument("--methods", default="all", help="all | comma list of registered methods")
    bench.add_argument("--budgets", default="192,128,64")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats per quantity (median reported)")
    bench.add_argument("--models", default="testbed,scaled-llava-1.5,llava-1.5-7b",
                       help="comma list of testbed, scaled-llava-1.5 (end to end) and llava-1.5-7b, "
                            "llava-next-7b, qwen2-vl-7b, qwen2.5-vl-7b (extrapolated from their real-size "
                            "layers, harness.bench.cost_model)")
    bench.add_argument("--batch-size", dest="batch_size", type=int, default=1,
                       help="identical prompts prefilled together (1: one request; `harness run` batches 8)")
    bench.add_argument("--output", default="runs/bench", help="folder for bench.csv and bench.png")
    bench.set_defaults(func=_bench, prog_name="harness bench")

