"""A run folder as the regression checks read it: summary.csv's metrics and, from the store, the cells
behind them, their protocol and their per-document views."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from harness.errors import InputError
from harness.metrics.intervals import ALL_TASKS
from harness.reports import run_folder

PROTOCOL_KEYS = ("model", "tasks", "limit", "task_data")  # what must be equal (from each cell's key)


class Unusable(InputError):
    """Input that cannot be compared: exit code 2, with this message."""


@dataclass
class RunData:
    """What the checks read from a run folder, keyed by (method, budget label, task)."""

    path: Path
    protocol: dict
    metrics: dict  # (method, budget, task) -> {metric: value}  (summary.csv)
    samples: dict  # (method, budget, task) -> {doc_id: view}   (the store's per-sample views)
    method_reprs: dict  # (method, budget) -> repr
    codes: set  # code versions of the cells
    provenance: dict  # the provenance of the newest invocation that finished one of the cells
    started: str = ""


def _read_metrics(path: Path) -> dict:
    frame = run_folder.per_task(run_folder.read_summary(path))  # the checks are per task
    metrics: dict = {}
    for method, budget, task, metric, value in frame[["method", "budget", "task", "metric", "value"]].itertuples(
            index=False, name=None):
        metrics.setdefault((method, budget, task), {})[metric] = float(value)
    return metrics


def _row_set(rows) -> frozenset:
    """Per-task rows comparable as a set (NaN, which a CPU run reports for peak memory, equals itself here)."""
    return frozenset((r["task"], r["metric"], _key(float(r["value"]))) for r in rows if r["task"] != ALL_TASKS)


def _key(value: float):
    return "nan" if math.isnan(value) else value


def _select_cells(db: sqlite3.Connection, metrics: dict, where: Path) -> dict:
    """The store cell behind each (method, budget) of summary.csv. A folder reused with another limit
    or code holds several cells per label: the one whose rows are the summary's is the one reported."""
    summary_rows: dict = {}
    for (method, budget, task), values in metrics.items():
        summary_rows.setdefault((method, budget), set()).update((task, m, _key(v)) for m, v in values.items())
    candidates: dict = {}
    for cell in run_folder.cells(db):
        budget = cell.rows[0]["budget"] if cell.rows else "full"
        candidates.setdefault((cell.method, budget), []).append((cell, _row_set(cell.rows)))
    chosen = {}
    for label, wanted in summary_rows.items():
        matching = [cell for cell, rows in candidates.get(label, []) if rows == frozenset(wanted)]
        if not matching:
            raise Unusable(f"{where}: summary.csv has {label[0]}@{label[1]} but results.sqlite holds no cell "
                           "with those rows (the two files are from different runs)")
        chosen[label] = matching[-1]  # the newest of identical results
    return chosen


def _protocol(chosen: dict, where: Path) -> dict:
    protocols = {json.dumps({k: c.determined_by.get(k) for k in PROTOCOL_KEYS}, sort_keys=True)
                 for c in chosen.values()}
    if len(protocols) > 1:
        raise Unusable(f"{where} mixes protocols across its cells: {'; '.join(sorted(protocols))}")
    return json.loads(protocols.pop())


def _views(db: sqlite3.Connection, chosen: dict) -> dict:
    """Per cell and task, {doc_id: view} with only what the checks read (answers are small, the
    first-token distributions are not)."""
    samples: dict = {}
    for (method, budget), cell in chosen.items():
        for task, doc_id, v in run_folder.sample_views(db, cell.key):
            samples.setdefault((method, budget, task), {})[doc_id] = {"correct": bool(v["correct"]),
                                                                       "answer": v["answer"],
                                                                       "recall": v.get("evidence_recall")}
    return samples


def load_run(path) -> RunData:
    """A finished `harness run` folder (summary.csv and results.sqlite), or Unusable."""
    try:
        path = run_folder.folder(path)
        metrics = _read_metrics(path / run_folder.SUMMARY)
        db = run_folder.open_store(path / run_folder.STORE)
    except run_folder.RunFolderError as e:
        raise Unusable(str(e)) from None
    try:
        chosen = _select_cells(db, metrics, path)
        started, provenance = run_folder.invocation(db, max(c.run_id for c in chosen.values()))
        return RunData(path=path, protocol=_protocol(chosen, path), metrics=metrics, samples=_views(db, chosen),
                       method_reprs={label: c.determined_by["method_repr"] for label, c in chosen.items()},
                       codes={c.determined_by.get("code", "unknown") for c in chosen.values()},
                       provenance=provenance, started=started)
    finally:
        db.close()


def protocol_hash(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:12]
