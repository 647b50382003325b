"""`harness run`: evaluate methods x budgets x tasks in-process through lmms-eval.

The model is loaded once (one :class:`harness.evaluation.lmms_backend.VTPLlava`), reconfigured per
(method, budget) cell and handed to ``lmms_eval.evaluator.simple_evaluate`` as an instance, with a
``TaskManager`` that indexes our ``tasks/`` folder and the folders of the lmms-eval tasks asked
(``harness.evaluation.grid``). The response cache is never enabled (it could serve one cell's answers to
another, see ``harness.evaluation.lmms_compat``).

Outputs, under ``--output DIR``:

* ``DIR/summary.csv``: long format, one row per (model, method, budget, task, metric), columns
  exactly ``model, method, budget, task, metric, value``. Metrics: each task's own lmms-eval
  metrics (``accuracy`` for the testbed) plus ``n_samples``. A group contributes its tasks, not
  itself. ``budget`` is ``full`` for methods that take no budget (``none``).
* ``DIR/samples/<method>_<budget>_<task>.jsonl``: one line per doc: lmms-eval's logged sample
  (media-free doc, target, responses, per-sample metrics) plus ``records``, the backend's
  per-request records (generated ids, first-token log-probs, visual tokens in/kept) by request idx.
* ``DIR/results/<method>_<budget>.json``: lmms-eval's results dict without the samples (provenance).

Under ``torchrun`` or ``accelerate launch`` the run is data parallel (``harness.evaluation.distributed``): each rank
evaluates its share of every task's documents, rank 0 gathers the records, measures and writes.

``--shard I/N`` runs job I's share of the grid (`shard_cells`), the cells' keys unchanged, so N jobs' folders
merge into the sweep's (``harness.evaluation.merge``).
"""

from __future__ import annotations

from . import lmms_compat  # first: offline variables before lmms_eval/datasets/transformers

import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from harness.budget import check_scope  # noqa: E402
from harness.metrics.consistency import SampleView  # noqa: E402  (light: numpy)
from harness.metrics import intervals  # noqa: E402
from harness.protocol import DEFAULT_MODEL, ProtocolError, RunConfig, parse_shard  # noqa: E402

from .grid import (RunError, budget_label, cells, check_budgets, parse_budgets, parse_params,  # noqa: E402,F401
                   resolve_methods, resolve_tasks)
from .outputs import (format_table, jsonable, paired_rows, records_by_doc, sample_views, summary_row,  # noqa: E402
                      summary_rows, write_samples, write_summary)
from .distributed import Ranks  # noqa: E402
from .store import STORE, SUMMARY, Store, cell_key, code_version, git_commit, model_hash  # noqa: E402
from .task_sources import check_task_data, task_manager_for, video_tasks  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_model(path: str | None) -> Path:
    """The checkpoint folder of `--model` (a folder, or a model id's snapshot in the local Hugging Face cache;
    the testbed model when None), or a RunError line on what is wrong and how to get it, before anything loads."""
    from .model_args import CheckpointError, check_pretrained

    if path is None:
        if not DEFAULT_MODEL.exists():
            try:
                rel = DEFAULT_MODEL.relative_to(REPO_ROOT)
            except ValueError:
                rel = DEFAULT_MODEL
            raise RunError(
                f"the testbed model is not at {DEFAULT_MODEL}: train it with "
                f"`harness testbed train --output {rel}` (from the repository root), or pass --model PATH")
        path = str(DEFAULT_MODEL)
    try:
        return Path(check_pretrained(path))
    except CheckpointError as e:
        raise RunError(str(e)) from None


def model_label(path: Path, name: str | None) -> str:
    from .model_args import hub_id_of

    if name:
        return name
    if path.resolve() == DEFAULT_MODEL.resolve():
        return "testbed"
    hub_id = hub_id_of(path)  # a snapshot folder is named by its commit: the model's name is the id's
    return hub_id.split("/")[-1] if hub_id else path.name


def shard_cells(grid: list[tuple], shard: tuple[int, int] | None) -> list[tuple]:
    """Job I of N's cells (`--shard I/N`): the unpruned reference, which every cell's paired metrics are
    computed against, and every N-th other cell by its position in the grid from the I-th, in grid order.
    What is already finished does not move the assignment; the shards together hold every cell once."""
    if shard is None:
        return list(grid)
    i, n = shard
    others = [cell for cell in grid if cell[0] != "none"]
    mine = set(others[i - 1::n])
    return [cell for cell in grid if cell[0] == "none" or cell in mine]


# ----------------------------------------------------------------------------- the run

def _quiet_progress_bars() -> None:
    """Per-split dataset building and weight loading bars drown the evaluation progress."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - cosmetic
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic
        pass


def _reference_answers(records: dict) -> dict[tuple, list[int]]:
    """The unpruned cell's generated ids per request: what teacher-forced NLL scores later cells on."""
    return {key: r["generated_ids"] for key, r in records.items() if "generated_ids" in r}


def _task_data_version() -> str:
    """The committed testbed data's manifest hash (its version)."""
    from harness.testbed.data import TASKS_DIR

    from .store import file_hash

    manifests = sorted(Path(TASKS_DIR).glob("**/MANIFEST*"))
    return file_hash(manifests)[:16] if manifests else "none"


def _method_files(method) -> dict:
    """The content hash of the files a method reads (its codebook, its trained modules), when it reads any."""
    from .store import file_hash

    paths = method.files()
    return {"method_files": file_hash(paths)[:16]} if paths else {}


def _provenance(config: RunConfig, model_path: Path, fingerprint: dict, lm) -> dict:
    import platform
    from importlib.metadata import version

    packages = {p: version(p) for p in ("torch", "transformers", "lmms-eval", "fvcore", "numpy")}
    return {"config": asdict(config), "model_path": str(model_path), **fingerprint, "commit": git_commit(REPO_ROOT),
            "packages": packages,
            "python": platform.python_version(), "device": str(lm.device), "platform": platform.platform()}


@contextlib.contextmanager
def _refusing_bad_features(method: str, budget: str, out_dir: Path):
    """Non-finite visual features inside a cell stop the run with one line (a RunError); the cells
    finished before it stay in the store and summary, so a rerun resumes after them. Any other error
    surfaces as itself, not as the tenacity RetryError lmms-eval wraps it in (lmms_compat fix 7)."""
    from harness.adapters import NonFiniteFeatures

    try:
        yield
    except Exception as e:
        inner = lmms_compat.unwrap_retry_error(e)
        if isinstance(inner, NonFiniteFeatures):
            raise RunError(f"method {method} at budget {budget}: {inner}. Cells finished before this one are "
                           f"kept in {out_dir}; rerun with --output {out_dir} to resume.") from None
        if inner is not e:
            raise inner from e
        raise


def _gathered(ranks: Ranks, records: dict) -> dict | None:
    """The per-request records of every rank, on rank 0 (keys are (task, doc_id, idx): ranks' documents are
    disjoint; lmms-eval pads a short rank with copies of its last request, which give the same record)."""
    parts = ranks.gather(records)
    return None if parts is None else {key: r for part in parts for key, r in part.items()}


def _measure(lm, views: dict, timing_repeats: int, clock: dict) -> tuple[dict, dict]:
    """Per task, the cell's operation counts and (with repeats) its timing pass medians; and per task the
    timing pass's spread (details for the store). Their seconds are added to `clock`."""
    measured, spread = {}, {}
    for task in views:
        with _timed(clock, "FLOPs counts"):
            measured[task] = dict(lm.flops(task))
        if timing_repeats:
            with _timed(clock, "timing pass"):
                timed = lm.timings(task, timing_repeats)
            measured[task].update(timed["medians"])
            spread[task] = timed
    return measured, spread


@contextlib.contextmanager
def _timed(clock: dict, phase: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        clock[phase] = clock.get(phase, 0.0) + time.perf_counter() - started


def _time_shares(clock: dict, total: float, lm) -> str:
    """Where the run's time went: the phases of its cells (the unpruned reference's evaluation apart) and the
    vision encoder calls computed and reused across cells (harness.evaluation.vision_cache)."""
    parts = [f"{phase} {seconds:.0f} s ({seconds / total:.0%})" for phase, seconds in clock.items()]
    rest = total - sum(clock.values())
    line = f"time: {total:.0f} s: " + ", ".join(parts + [f"other {rest:.0f} s ({rest / total:.0%})"])
    cache = getattr(lm, "_vision_cache", None)
    if cache is not None:
        line += f"; vision encoder calls: {cache.misses} computed, {cache.hits} reused"
    return line


def _write_cell_files(out_dir: Path, res: dict, by_doc: dict, method: str, budget) -> None:
    """The cell's samples/ files and its lmms-eval results (provenance) under results/."""
    write_samples(out_dir, res, by_doc, method, budget)
    results_dir = out_dir / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"{method}_{budget_label(budget, method)}.json").write_text(
        json.dumps(jsonable({k: v for k, v in res.items() if k != "samples"}), indent=1))


def run(config: RunConfig, out=None) -> list[dict]:
    """Evaluate every (method, budget) cell on the tasks and write the outputs. Returns the rows (on rank 0 of
    a data parallel run; the other ranks evaluate their documents and return [])."""
    try:
        ranks = Ranks.from_env()
    except ValueError as e:
        raise RunError(str(e)) from None

    def say(msg: str) -> None:
        if ranks.main:  # one voice for the run
            print(msg, file=out or sys.stdout, flush=True)

    method_names = resolve_methods(config.methods)
    if "none" not in method_names:  # every pruned cell is compared with the unpruned reference
        method_names = ["none"] + method_names
    budgets = parse_budgets(config.budgets)
    try:
        check_scope(config.budget_scope)
    except ValueError as e:
        raise RunError(f"--budget-scope: {e}") from None
    try:
        shard = parse_shard(config.shard)
    except ProtocolError as e:
        raise RunError(f"--{e}") from None
    grid = cells(method_names, budgets)
    tasks = resolve_tasks(config.tasks)
    model_path = resolve_model(config.model)
    label = model_label(model_path, config.model_name)
    limit = config.limit
    if limit is not None and limit <= 0:
        raise RunError(f"--limit must be positive, got {limit}")
    out_dir = Path(config.output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))

    try:
        lmms_compat.apply(log_level=config.log_level)
    except lmms_compat.DependencyError as e:
        raise RunError(str(e)) from None
    _quiet_progress_bars()
    from lmms_eval.evaluator import simple_evaluate

    import methods as methods_registry
    from harness.testbed.data import TASKS_DIR

    task_manager = task_manager_for(tasks, TASKS_DIR)  # ours and lmms-eval's standard tasks, by name
    ranks.start(config.device)
    for turn in range(2 if ranks.parallel else 1):  # rank 0 first: it fills the datasets cache the others read
        if (turn == 0) == ranks.main:
            check_task_data(task_manager, tasks)  # offline: their datasets are here, or one line on what to get
        ranks.barrier()
    videos = video_tasks(task_manager, tasks)
    if videos:  # video files need a reader and a family that takes videos: say so before the model loads
        from .inputs import check_takes_video, check_video_reader
        from .model_args import model_type_of

        what = f"task(s) {', '.join(videos)}"
        try:
            check_video_reader(what)
            check_takes_video(model_type_of(str(model_path)), what)
        except ValueError as e:
            raise RunError(str(e)) from None

    from .lmms_backend import VTPLlava

    store = None  # rank 0 alone writes the store and the files
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        store = Store(out_dir / STORE)
    fingerprint = {"model": model_hash(model_path), "tasks": sorted(tasks), "limit": limit,
                   "task_data": _task_data_version(), "code": code_version(REPO_ROOT)}
    say(f"harness run: model {label} ({model_path}), {len(grid)} cell(s) x tasks {', '.join(tasks)}"
        + (f", limit {limit:g}" if limit is not None else "") + f", output {out_dir}")
    started = time.perf_counter()
    try:
        lm = VTPLlava(pretrained=str(model_path), device=ranks.device(config.device), dtype=config.dtype,
                      batch_size=config.batch_size, budget_scope=config.budget_scope, **config.extra)
    except ValueError as e:  # bad device/dtype/batch size
        raise RunError(str(e)) from None
    say(f"  loaded in {time.perf_counter() - started:.1f}s on {lm.device}")
    if ranks.parallel:
        say(f"  data parallel over {ranks.world} ranks: rank r evaluates documents r, r+{ranks.world}, ...; rank 0 "
            f"gathers the records, writes the store and runs the FLOPs counts and the timing pass on its own "
            f"device while the other ranks wait")
    check_budgets(budgets, lm.tokens_per_image)  # what this model cannot take, before the first cell
    # Each method once, with its parameters (they reach its repr, the cell key and the records). One that
    # cannot run on this model (its family lacks what it needs, or its codebook is another model's) stops
    # the run now when it was named; `--methods all` leaves it out and says why.
    instances, left_out = {}, {}
    every_method = (config.methods or "").strip() == "all"
    for method in dict.fromkeys(m for m, _ in grid):
        try:
            instances[method] = methods_registry.get(method, **{**lm.method_params, **config.params.get(method, {})})
            lm.check_method(instances[method])
        except ValueError as e:
            if not every_method:
                raise RunError(f"method {method!r} cannot run on {label}: {e}") from None
            instances.pop(method, None)
            left_out[method] = str(e)
            say(f"  left out of --methods all: {method}: {e}")
    grid = [(m, b) for m, b in grid if m in instances]
    if shard is not None:  # after every method is checked: each shard refuses what the whole grid would
        mine = shard_cells(grid, shard)
        others = [c for c in grid if c[0] != "none"]
        positions = [str(p) for p, c in enumerate(others, 1) if c in mine]
        say(f"  shard {shard[0]}/{shard[1]}: {len(mine)} of the grid's {len(grid)} cell(s): the unpruned reference "
            f"and other cell(s) {', '.join(positions) or '(none)'} of {len(others)}")
        grid = mine
    run_id = store.start_run({**_provenance(config, model_path, fingerprint, lm), "left_out": left_out,
                              "ranks": ranks.world}) if ranks.main else None

    rows: list[dict] = []
    reference: dict = {}  # the unpruned cell's sample views per task, computed once
    clock = dict.fromkeys(("evaluation, unpruned reference", "evaluation, pruned", "FLOPs counts", "timing pass"),
                          0.0)  # seconds per phase of the cells (_time_shares)
    for i, (method, budget) in enumerate(grid, 1):
        lm.configure(instances[method], budget)
        lm.pop_records()
        determined_by = {**fingerprint, "method": method, "method_repr": repr(lm.method), "budget": budget,
                         "budget_scope": config.budget_scope, "model_args": config.extra,  # e.g. video_frames
                         **_method_files(lm.method)}
        key = cell_key(determined_by)
        cached = ranks.share(store.finished(key) if ranks.main else None)  # rank 0's store decides for all
        if cached is not None:  # finished in an earlier (possibly interrupted) run: not recomputed
            rows += cached
            if method == "none":
                answers = None
                if ranks.main:
                    reference = {task: {doc: SampleView(**v) for doc, v in docs.items()}
                                 for task, docs in store.sample_views(key).items()}
                    answers = _reference_answers(store.records(key))
                lm.reference_answers = ranks.share(answers)
            if ranks.main:
                write_summary(out_dir / SUMMARY, rows)
            say(f"[{i}/{len(grid)}] method={method} budget={budget_label(budget, method)}: finished earlier (cell {key})")
            continue
        say(f"[{i}/{len(grid)}] method={method} budget={budget_label(budget, method)} ...")
        with _refusing_bad_features(method, budget_label(budget, method), out_dir):
            t0 = time.perf_counter()
            with _timed(clock, "evaluation, unpruned reference" if method == "none" else "evaluation, pruned"):
                res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit,
                                      log_samples=True, bootstrap_iters=0, use_cache=None,
                                      datetime_str=lmms_compat.fresh_datetime_str(),
                                      distributed_executor_backend=ranks.backend)
            records = _gathered(ranks, lm.pop_records())  # every rank's, on rank 0 (None elsewhere)
            if method == "none":
                lm.reference_answers = ranks.share(_reference_answers(records) if ranks.main else None)
            if not ranks.main:  # rank 0 measures, alone on its device, and writes
                ranks.barrier()
                continue
            by_doc = records_by_doc(records)
            views = sample_views(res, by_doc)
            if method == "none":
                reference = views
            cell_rows = (summary_rows(res, label, method, budget)
                         + paired_rows(reference, views, label, method, budget))
            measured, timing_spread = _measure(lm, views, config.timing_repeats, clock)
            cell_rows += [summary_row(label, method, budget, task, metric, float(value))
                          for task, metrics in measured.items() for metric, value in metrics.items()]
            rows += cell_rows
            store.save_cell(key, run_id, determined_by, cell_rows,
                            [(task, doc, asdict(view), by_doc.get((task, doc), []))
                             for task, docs in views.items() for doc, view in docs.items()],
                            details={"timing": timing_spread,
                                     **({"timing_rank": f"0 of {ranks.world}"} if ranks.parallel else {})})
        ranks.barrier()
        _write_cell_files(out_dir, res, by_doc, method, budget)
        write_summary(out_dir / SUMMARY, rows)  # after every cell: an interrupted sweep keeps its rows
        acc = [r for r in cell_rows if r["metric"] == "accuracy" and r["task"] != intervals.ALL_TASKS]
        mean = sum(r["value"] for r in acc) / len(acc) if acc else float("nan")
        over = {r["metric"]: r["value"] for r in cell_rows if r["task"] == intervals.ALL_TASKS}
        ci = (f" (95% interval {over['accuracy_ci_low']:.3f}-{over['accuracy_ci_high']:.3f})"
              if "accuracy_ci_low" in over else "")
        say(f"      done in {time.perf_counter() - t0:.1f}s: mean accuracy {mean:.3f}{ci} over {len(acc)} task(s)")

    ranks.stop()
    if not ranks.main:
        return []
    store.close()
    say("")
    say(format_table(rows))
    say(f"\nwrote {out_dir / SUMMARY} ({len(rows)} rows) and {out_dir / 'samples'}/")
    say(_time_shares(clock, time.perf_counter() - started, lm))
    return rows
