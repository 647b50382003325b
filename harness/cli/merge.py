"""`harness merge`: the result folders of a sweep's shards (`harness run --shard I/N`) as one result folder
(harness.evaluation.merge)."""

from __future__ import annotations


def _merge(args) -> int:
    from harness.evaluation.merge import merge
    from harness.evaluation.outputs import format_table

    merged = merge(args.inputs, args.output)
    for note in merged.notes:
        print(f"  {note}")
    print(format_table(merged.rows))
    print(f"\nmerged {len(args.inputs)} folder(s) into {merged.output}: {merged.added} cell(s) added, "
          f"{merged.duplicates} duplicate(s) kept once; wrote {merged.output / 'summary.csv'} "
          f"({len(merged.rows)} rows)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge the result folders of one sweep's shards (harness run --shard I/N) into one",
        description="Copy every cell and the provenance of each input's results.sqlite into OUTPUT's, keeping a "
                    "cell found in several inputs (the unpruned reference of every shard) once when it agrees but "
                    "for timing (the first input's timing is kept); a conflicting duplicate, or inputs of another "
                    "model, tasks, limit, task data or code version, are an error before anything is written. "
                    "Writes OUTPUT/summary.csv, samples/ and results/ as `harness run` would for those cells.")
    p.add_argument("inputs", nargs="+", metavar="RUN_DIR", help="`harness run` output folders")
    p.add_argument("--output", required=True,
                   help="a new or empty folder, or a result folder of the same protocol (one of the inputs, too) "
                        "to add the others into; any other existing folder is refused")
    p.set_defaults(func=_merge, prog_name="harness merge")
