"""Reading a finished `harness run` output folder: its `summary.csv` and its results store, read-only.

One place for what the leaderboard, the regression checks and the analyses read, and the one reader
of the store's tables (`harness.evaluation.store` writes them); each report keeps its own view of the
cells on top. Every problem is a `RunFolderError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.errors import InputError
from harness.evaluation.store import STORE, SUMMARY, SUMMARY_COLUMNS  # noqa: F401  (what a run writes)
from harness.metrics import intervals


class RunFolderError(InputError):
    """A folder, summary or store that is not what a finished `harness run` leaves."""


def folder(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"run folder not found: {path}")
    if not (path / SUMMARY).is_file():
        raise RunFolderError(f"{path} has no {SUMMARY}: not the --output folder of a finished `harness run`")
    return path


def read_summary(path: Path) -> pd.DataFrame:
    """The long-format summary; every column text except `value` (budgets stay `64`, `full`, `adaptive`)."""
    text = {c: str for c in SUMMARY_COLUMNS if c != "value"}
    try:
        frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values={"value": ["nan", "NaN", ""]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise RunFolderError(f"{path} is not a harness summary: {str(e).splitlines()[0]}") from None
    if tuple(frame.columns) != SUMMARY_COLUMNS:
        raise RunFolderError(f"{path} is not a harness summary: columns {', '.join(frame.columns)}, "
                             f"expected {', '.join(SUMMARY_COLUMNS)}")
    if frame.empty:
        raise RunFolderError(f"{path} has no rows")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame


def per_task(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's rows of single tasks (not the cells' figures over all their tasks)."""
    return summary[summary["task"] != intervals.ALL_TASKS]


def over_tasks(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's rows of each cell's figures over all its tasks, with their intervals."""
    return summary[summary["task"] == intervals.ALL_TASKS]


def open_store(path: Path) -> sqlite3.Connection:
    """Read-only: reading a run (a regression baseline above all) must never modify it."""
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: the per-sample results and provenance are in the results store")
    try:
        db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        db.execute("SELECT cell_key, run_id, method, determined_by, rows, details, finished FROM cells "
                   "LIMIT 1").fetchall()
        db.execute("SELECT run_id, started, provenance FROM runs LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        raise RunFolderError(f"{path} is not a results store: {e}") from None
    return db


def invocation(db: sqlite3.Connection, run_id: int | None = None) -> tuple[str, dict]:
    """When an invocation of `harness run` started and its provenance (the newest one by default)."""
    if run_id is None:
        row = db.execute("SELECT started, provenance FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
    else:
        row = db.execute("SELECT started, provenance FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return (row[0], json.loads(row[1])) if row else ("", {})


@dataclass(frozen=True)
class StoredCell:
    """One finished cell of the store, its JSON columns decoded."""

    key: str
    run_id: int  # the invocation that finished it
    method: str
    determined_by: dict  # what its key hashes: model, method_repr, budget, tasks, limit, task data, code
    rows: list  # its summary rows, as dicts
    details: dict  # the timing pass per task: spread, device, attention backend


def cells(db: sqlite3.Connection) -> list[StoredCell]:
    """Every finished cell, oldest first."""
    query = "SELECT cell_key, run_id, method, determined_by, rows, details FROM cells ORDER BY finished"
    return [StoredCell(key, run_id, method, json.loads(determined_by), json.loads(rows), json.loads(details or "{}"))
            for key, run_id, method, determined_by, rows, details in db.execute(query)]


def sample_views(db: sqlite3.Connection, key: str) -> Iterator[tuple[str, int, dict]]:
    """(task, doc_id, view) of each document the cell evaluated, the paired-metric view decoded."""
    for task, doc_id, view in db.execute("SELECT task, doc_id, view FROM samples WHERE cell_key = ?", (key,)):
        yield task, doc_id, json.loads(view)
