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
    if args.overhead:
        return _overhead(args, names, budgets)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise InputError(f"unknown bench model(s) {unknown}; accepted: {', '.join(MODELS)}")
    if args.repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {args.repeats}")
    batch = 1 if args.batch_size is None else args.batch_size
    if batch < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    run_bench(names, Path(args.output), repeats=args.repeats, budgets=tuple(budgets), models=models,
              batch=batch)
    return 0


def _overhead(args, names, budgets) -> int:
    """`--overhead`: one cell (the first pruning method named, the first budget) through `harness run` and bare."""
    from pathlib import Path

    import methods as registry
    from harness.bench.overhead import measure_overhead
    from harness.protocol import DEFAULT_BATCH_SIZE

    pruning = [m for m in names if registry.get(m).uses_budget]
    method = pruning[0] if pruning and args.methods.strip() != "all" else "random"
    batch = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if batch < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch}")
    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    measure_overhead(method, budgets[0] if budgets else 192, Path(args.output), task=args.task, limit=args.limit,
                     batch_size=batch, model=args.model)
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
    bench.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                       help="identical prompts prefilled together (default 1: one request; `harness run` batches 8); "
                            "with --overhead, documents per batch (default 8, as `harness run`)")
    bench.add_argument("--overhead", action="store_true",
                       help="instead: the share of one `harness run` cell's wall time that is the harness's own, "
                            "against bare model.generate on the same documents (the first pruning method of "
                            "--methods, else random; the first budget; harness.bench.overhead)")
    bench.add_argument("--task", default="testbed_color", help="with --overhead: the generate_until task")
    bench.add_argument("--limit", type=int, default=30, help="with --overhead: the task's first test documents")
    bench.add_argument("--model", default=None, help="with --overhead: checkpoint folder (default: the testbed model)")
    bench.add_argument("--output", default="runs/bench", help="folder for bench.csv and bench.png")
    bench.set_defaults(func=_bench, prog_name="harness bench")

