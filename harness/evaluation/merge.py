"""`harness merge`: the result folders of one sweep's shards (`harness run --shard I/N`), or of any runs of one
protocol, as one result folder.

Every cell of each input's store (its summary rows, per-document views and records, details) and the
provenance of every invocation is copied into the output's store as it was (its key, run and finish time
kept); a folder's protocol is its newest run's, and cells an earlier run of another protocol left in the
same folder stay out (the merge says how many). Then the output's `summary.csv`, and the `samples/` and
`results/` files of the cells copied, are what `harness run` would leave for those cells, in the order of
the runs' grid. Cells are content-hashed:
a cell in several inputs (the unpruned reference, which every shard runs) is kept once when its contents
agree but for the timing metrics, which each machine measures for itself (the first input's are kept, and
the merge says so); any other difference is an error naming the cell and what differs.

Everything is read and checked before anything is written: inputs that are not result folders, of
another protocol (model, tasks, limit, task data or code version), conflicting duplicates, or two cells
of one (method, budget) with different parameters, are one `MergeError` and leave the output untouched.
The output may be new, an empty folder, or a result folder of the same protocol that the inputs are
added into (it may be one of the inputs); any other existing folder is refused.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import InputError

from .grid import budget_label, cells, parse_budgets, resolve_methods
from .outputs import write_summary
from .store import STORE, SUMMARY, Store

#: What a cell key hashes that is the same for every cell of a run: cells of one protocol share it.
FINGERPRINT = ("model", "tasks", "limit", "task_data", "code")
CELL_COLUMNS = ("cell_key", "run_id", "model", "method", "method_repr", "budget", "determined_by", "rows", "details",
                "finished")


class MergeError(InputError):
    """Inputs that cannot be merged, or an output that cannot take them."""


def is_timing(metric: str) -> bool:
    """Metrics measured on the machine that ran the cell: they differ between machines and runs."""
    return metric.endswith(("_ms", "_ms_per_token")) or metric == "peak_memory_mb"


@dataclass
class Source:
    """A result folder read for merging: its protocol, its invocations and the cells of that protocol."""

    path: Path
    db: sqlite3.Connection
    fingerprint: dict | None
    runs: list[tuple[int, str, str]]  # (run_id, started, provenance as stored)
    cells: list[dict]  # CELL_COLUMNS, the JSON columns as stored
    other_protocols: int = 0  # cells of earlier runs of another protocol in the folder: left out


@dataclass
class Merged:
    """What a merge did, for the command to report."""

    output: Path
    rows: list[dict]
    added: int = 0
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)


def _open(path: Path, what: str) -> sqlite3.Connection:
    """A store, read-only: an input is never modified."""
    store = path / STORE
    if not path.is_dir():
        raise MergeError(f"{what} {path} is not a folder: give the --output folders of `harness run`")
    if not store.is_file():
        raise MergeError(f"{what} {path} is not a result folder: it has no {STORE} (the --output folder of "
                         f"`harness run` has one)")
    db = sqlite3.connect(store.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        db.execute(f"SELECT {', '.join(CELL_COLUMNS)} FROM cells LIMIT 1").fetchall()
        db.execute("SELECT run_id, started, provenance FROM runs LIMIT 1").fetchall()
        db.execute("SELECT cell_key, task, doc_id, view, records FROM samples LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        db.close()
        raise MergeError(f"{what} {path}: {store} is not a results store: {e}") from None
    return db


def _fingerprint(values: dict) -> dict | None:
    return {k: values[k] for k in FINGERPRINT} if all(k in values for k in FINGERPRINT) else None


def _read(path: Path, what: str) -> Source:
    """A folder's protocol is its newest invocation's (an older run in the same folder may have had
    another limit or code: its cells are not this folder's results and stay out of the merge)."""
    db = _open(path, what)
    runs = db.execute("SELECT run_id, started, provenance FROM runs ORDER BY run_id").fetchall()
    stored = [dict(zip(CELL_COLUMNS, row)) for row in
              db.execute(f"SELECT {', '.join(CELL_COLUMNS)} FROM cells ORDER BY finished, cell_key")]
    fingerprint = None
    for _, _, provenance in reversed(runs):
        fingerprint = _fingerprint(json.loads(provenance))
        if fingerprint is not None:
            break
    if fingerprint is None and stored:  # no provenance to go by: the newest cell's
        fingerprint = _fingerprint(json.loads(stored[-1]["determined_by"]))
    ours = [c for c in stored if _fingerprint(json.loads(c["determined_by"])) == fingerprint]
    runs = [r for r in runs if _fingerprint(json.loads(r[2])) in (fingerprint, None)]  # the same protocol's
    return Source(path, db, fingerprint, runs, ours, len(stored) - len(ours))


def _label(cell: dict) -> str:
    rows = json.loads(cell["rows"])
    budget = rows[0]["budget"] if rows else budget_label(json.loads(cell["determined_by"])["budget"], cell["method"])
    return f"{cell['method']}@{budget}"


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _compare_rows(kept: dict, other: dict) -> tuple[str | None, list[str]]:
    """The first non-timing difference of two cells' summary rows (None when they agree), and the timing
    metrics that differ."""
    def by_metric(cell):
        return {(r["task"], r["metric"]): r for r in json.loads(cell["rows"])}

    a, b = by_metric(kept), by_metric(other)
    timing = []
    for task, metric in list(dict.fromkeys([*a, *b])):
        ra, rb = a.get((task, metric)), b.get((task, metric))
        if ra is None or rb is None:
            return f"metric {metric} of task {task} is in one only", timing
        for column in ("model", "method", "budget"):
            if ra[column] != rb[column]:
                return f"the {column} column of task {task} is {ra[column]!r} in one, {rb[column]!r} in the other", []
        if not _same(ra["value"], rb["value"]):
            if is_timing(metric):
                timing.append(metric)
            else:
                return f"metric {metric} of task {task} is {ra['value']!r} in one, {rb['value']!r} in the other", []
    return None, list(dict.fromkeys(timing))


def _canonical(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True)


def _compare_samples(a: Source, b: Source, key: str) -> str | None:
    """The first difference between two copies of a cell's per-document views and records, or None."""
    query = "SELECT task, doc_id, view, records FROM samples WHERE cell_key = ?"
    docs_a = {(t, d): (v, r) for t, d, v, r in a.db.execute(query, (key,))}
    docs_b = {(t, d): (v, r) for t, d, v, r in b.db.execute(query, (key,))}
    if set(docs_a) != set(docs_b):
        only = min(set(docs_a) ^ set(docs_b))
        return f"document {only[1]} of task {only[0]} is in one only"
    for doc in sorted(docs_a):
        (view_a, records_a), (view_b, records_b) = docs_a[doc], docs_b[doc]
        if _canonical(view_a) != _canonical(view_b):
            va, vb = json.loads(view_a), json.loads(view_b)
            what = next((k for k in dict.fromkeys([*va, *vb]) if json.dumps(va.get(k)) != json.dumps(vb.get(k))), "?")
            return f"the {what} of document {doc[1]} of task {doc[0]} differs"
        if _canonical(records_a) != _canonical(records_b):
            return f"the backend's records of document {doc[1]} of task {doc[0]} differ"
    return None


def _grid_order(sources: list[Source]) -> list[str]:
    """(method@budget) labels in the order of the runs' grids (`harness run` writes its cells in that order):
    a shard's provenance holds the whole grid's methods and budgets."""
    order: dict[str, None] = {}
    for source in sources:
        for _, _, provenance in source.runs:
            config = json.loads(provenance).get("config") or {}
            try:
                names = resolve_methods(config.get("methods") or "none")
                names = names if "none" in names else ["none"] + names
                grid = cells(names, parse_budgets(config.get("budgets")))
            except ValueError:  # a method no longer registered: its cells go after, in input order
                continue
            order.update((f"{m}@{budget_label(b, m)}", None) for m, b in grid)
    return list(order)


def _output(path: Path) -> Source | None:
    """The output folder as a source when it is a result folder to add into; None when new or empty."""
    if path.exists() and not path.is_dir():
        raise MergeError(f"--output {path} is a file: give a new folder or a result folder to add into")
    if not path.exists() or not any(path.iterdir()):
        return None
    if not (path / STORE).is_file():
        raise MergeError(f"--output {path} exists and is not a result folder (no {STORE}): give a new folder, "
                         f"an empty one, or a result folder of the same protocol to add the inputs into")
    return _read(path, "--output")


def _differences(a: dict, b: dict) -> str:
    return ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in FINGERPRINT if a[k] != b[k])


def plan(inputs: list, output) -> tuple[list[Source], Source | None, dict, Merged]:
    """Read and check everything; nothing is written. Returns the sources (the output first when it is
    added into; their stores open, read-only), the output's source, the cells to keep by key with the
    source each comes from, and the report so far."""
    sources: list[Source] = []
    try:
        return _plan(inputs, Path(output), sources)
    except BaseException:
        for source in sources:
            source.db.close()
        raise


def _plan(inputs: list, output: Path, sources: list[Source]) -> tuple[list[Source], Source | None, dict, Merged]:
    if not inputs:
        raise MergeError("give at least one result folder to merge")
    target = _output(output)
    if target is not None:
        sources.append(target)
    seen = {output.resolve()} if target is not None else set()
    for path in map(Path, inputs):
        if path.resolve() in seen:  # the output itself, or a folder named twice: its cells are read once
            continue
        seen.add(path.resolve())
        source = _read(path, "input")
        sources.append(source)
        if not source.cells:
            earlier = (f" ({source.other_protocols} of earlier runs of another protocol)"
                       if source.other_protocols else "")
            raise MergeError(f"input {path} holds no finished cell of its last run's protocol{earlier}: "
                             "nothing to merge from it")
    report = Merged(output, [])
    with_cells = [s for s in sources if s.fingerprint is not None]
    first = with_cells[0] if with_cells else None
    for source in with_cells[1:]:
        if source.fingerprint != first.fingerprint:
            raise MergeError(f"{source.path} and {first.path} are results of different protocols "
                             f"({_differences(first.fingerprint, source.fingerprint)}): only runs of one model, "
                             "tasks, limit, task data and code version merge")
    for source in sources:
        if source.other_protocols:
            report.notes.append(f"left out {source.other_protocols} cell(s) of {source.path} from earlier runs of "
                                "another protocol in that folder")

    keep: dict[str, tuple[Source, dict]] = {}
    for source in sources:
        for cell in source.cells:
            key = cell["cell_key"]
            if key not in keep:
                keep[key] = (source, cell)
                continue
            report.duplicates += 1
            first_source, first_cell = keep[key]
            where = f"cell {_label(cell)} (key {key}) of {first_source.path} and {source.path}"
            difference, timing = _compare_rows(first_cell, cell)
            difference = difference or _compare_samples(first_source, source, key)
            if difference:
                raise MergeError(f"{where} conflict: {difference}; a cell's results must not depend on where it "
                                 "ran (rerun one of them, or merge without it)")
            if timing:
                report.notes.append(f"{where}: timing differs ({', '.join(timing)}), measured per machine: kept "
                                    f"{first_source.path}'s")
    labels: dict[str, dict] = {}
    for key, (source, cell) in keep.items():
        label = _label(cell)
        if label in labels:
            raise MergeError(f"two different cells of {label}: {labels[label]['method_repr']} "
                             f"(key {labels[label]['cell_key']}) and {cell['method_repr']} (key {key}, {source.path}); "
                             "their parameters or model arguments differ: merge runs of one grid")
        labels[label] = cell
    return sources, target, keep, report


def merge(inputs: list, output) -> Merged:
    """Merge the result folders `inputs` into `output` (see the module's docstring)."""
    sources, target, keep, report = plan(inputs, output)
    try:
        return _write(sources, target, keep, report)
    finally:
        for source in sources:
            source.db.close()


def _write(sources: list[Source], target: Source | None, keep: dict, report: Merged) -> Merged:
    output = report.output
    store = Store(output / STORE)
    try:
        present = set(store.db.execute("SELECT started, provenance FROM runs").fetchall())
        new_runs = sorted({(started, provenance) for s in sources if s is not target
                           for _, started, provenance in s.runs} - present)
        with store.db:  # one transaction: the output gets every cell or none
            for started, provenance in new_runs:  # oldest first: the newest invocation stays the newest
                store.db.execute("INSERT INTO runs (started, provenance) VALUES (?, ?)", (started, provenance))
            run_ids = {(started, provenance): run_id for run_id, started, provenance in
                       store.db.execute("SELECT run_id, started, provenance FROM runs ORDER BY run_id")}
            for key, (source, cell) in keep.items():
                if source is target:
                    continue
                old = {run_id: (started, provenance) for run_id, started, provenance in source.runs}
                run_id = run_ids.get(old.get(cell["run_id"]), cell["run_id"])
                store.db.execute(f"INSERT OR REPLACE INTO cells ({', '.join(CELL_COLUMNS)}) VALUES "
                                 f"({', '.join('?' * len(CELL_COLUMNS))})",
                                 tuple({**cell, "run_id": run_id}[c] for c in CELL_COLUMNS))
                store.db.execute("DELETE FROM samples WHERE cell_key = ?", (key,))
                store.db.executemany(
                    "INSERT INTO samples (cell_key, task, doc_id, view, records) VALUES (?, ?, ?, ?, ?)",
                    source.db.execute("SELECT cell_key, task, doc_id, view, records FROM samples WHERE cell_key = ?",
                                      (key,)))
                report.added += 1
    finally:
        store.close()
    for key, (source, cell) in keep.items():
        if source is not target:
            _copy_files(source.path, output, cell, report)
    order = _grid_order(sources)
    position = {label: i for i, label in enumerate(order)}
    chosen = sorted(keep.values(), key=lambda sc: position.get(_label(sc[1]), len(order)))  # stable: input order
    report.rows = [row for _, cell in chosen for row in json.loads(cell["rows"])]
    write_summary(output / SUMMARY, report.rows)
    return report


def _copy_files(source: Path, output: Path, cell: dict, report: Merged) -> None:
    """The cell's `samples/<method>_<budget>_<task>.jsonl` and `results/<method>_<budget>.json`, where the
    input has them (a compacted or copied store may come without)."""
    if source.resolve() == output.resolve():
        return
    label = _label(cell).replace("@", "_")
    tasks = list(dict.fromkeys(r["task"] for r in json.loads(cell["rows"])))
    names = [f"samples/{label}_{task}.jsonl" for task in tasks] + [f"results/{label}.json"]
    missing = []
    for name in names:
        if (source / name).is_file():
            (output / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, output / name)
        else:
            missing.append(name)
    if missing:
        report.notes.append(f"{source} has no {', '.join(missing)}: the cell's rows and store entries are merged")
