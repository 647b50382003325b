"""The results store: a SQLite database in the run's output folder (`results.sqlite`).

Tables:
  runs     one row per `harness run` invocation: when, and its provenance (package versions, git
           commit, device, model hash, the command's configuration).
  cells    one row per finished (model, method with its parameters, budget, tasks, limit) cell: its
           key, what determines it, its summary rows, and details (the timing spread per task:
           min, max, interquartile range, repeats; the device and attention backend).
  samples  one row per (cell, task, doc): the paired-metric view of the sample and the backend's
           records for it.

A cell's key is a hash of everything that determines its results: the model's weights, the
method's repr (all parameters), the budget, the task names and their data versions, the sample
limit, and the code version (a hash of the code the results depend on, `code_version`; the git
commit is provenance). A finished cell is written in one transaction (all its rows or
none), so a sweep killed at any moment resumes by skipping finished cells, never duplicating one.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT, provenance TEXT);
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY, run_id INTEGER, model TEXT, method TEXT, method_repr TEXT, budget TEXT,
    determined_by TEXT, rows TEXT, details TEXT, finished TEXT);
CREATE TABLE IF NOT EXISTS samples (
    cell_key TEXT, task TEXT, doc_id INTEGER, view TEXT, records TEXT, PRIMARY KEY (cell_key, task, doc_id));
"""


def file_hash(paths) -> str:
    """sha256 over the given files' bytes (a model's weights), in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_hash(model_dir: Path) -> str:
    files = [p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".json")]
    return file_hash(files)[:16]


#: What `harness run` writes in its output folder (read back by harness.reports.run_folder).
SUMMARY, STORE = "summary.csv", "results.sqlite"
SUMMARY_COLUMNS = ("model", "method", "budget", "task", "metric", "value")  # long format, one value a row

#: Code a cell's results depend on: every .py and task YAML under these folders of the repository,
#: less the modules that only read finished runs or build things a run loads from files.
RESULT_CODE = ("methods", "harness", "tasks")
REPORT_ONLY = ("harness/reports/", "harness/bench/", "harness/cli/", "harness/codebook/analyze.py",
               "harness/testbed/training/", "harness/lvpruning/", "harness/evaluation/merge.py")


def code_version(repo: Path) -> str:
    """A hash of the content of the code that determines a cell's results (`RESULT_CODE` less
    `REPORT_ONLY`): a commit that changes only documents, reports or training leaves finished cells
    valid, any change to a method, the adapter, the backend or a task invalidates them. Works
    without git (an installed copy)."""
    repo = Path(repo)
    digest = hashlib.sha256()
    for folder in RESULT_CODE:
        for path in sorted((repo / folder).rglob("*")):
            rel = path.relative_to(repo).as_posix()
            if path.suffix in (".py", ".yaml") and path.is_file() and not rel.startswith(REPORT_ONLY) \
                    and "__pycache__" not in rel:
                digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return "code-" + digest.hexdigest()[:16]


def git_commit(repo: Path) -> str:
    """The git commit, marked dirty when tracked files under methods/ or harness/ differ from it
    (provenance only: the cell key uses `code_version`)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "methods", "harness"], cwd=repo).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def cell_key(determined_by: dict) -> str:
    return hashlib.sha256(json.dumps(determined_by, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a results store (a SQLite database): {e}") from None

    def close(self):
        self.db.close()

    def start_run(self, provenance: dict) -> int:
        with self.db:
            cur = self.db.execute("INSERT INTO runs (started, provenance) VALUES (?, ?)",
                                  (datetime.now(timezone.utc).isoformat(), json.dumps(provenance, default=str)))
        return cur.lastrowid

    def finished(self, key: str) -> list[dict] | None:
        """The summary rows of a finished cell, or None."""
        row = self.db.execute("SELECT rows FROM cells WHERE cell_key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def sample_views(self, key: str) -> dict[str, dict[int, dict]]:
        """{task: {doc_id: view dict}} of a finished cell."""
        out: dict[str, dict[int, dict]] = {}
        for task, doc_id, view in self.db.execute("SELECT task, doc_id, view FROM samples WHERE cell_key = ?", (key,)):
            out.setdefault(task, {})[doc_id] = json.loads(view)
        return out

    def records(self, key: str) -> dict[tuple, dict]:
        """{(task, doc_id, idx): record} of a finished cell (the backend's per-request records)."""
        out = {}
        for task, doc_id, records in self.db.execute("SELECT task, doc_id, records FROM samples WHERE cell_key = ?",
                                                     (key,)):
            for idx, record in enumerate(json.loads(records)):
                out[(task, doc_id, idx)] = record
        return out

    def save_cell(self, key: str, run_id: int, determined_by: dict, rows: list[dict],
                  samples: list[tuple[str, int, dict, list]], details: dict | None = None) -> None:
        """All of a cell at once: a transaction, so a kill leaves either the whole cell or nothing."""
        with self.db:
            self.db.execute("DELETE FROM samples WHERE cell_key = ?", (key,))
            self.db.executemany(
                "INSERT INTO samples (cell_key, task, doc_id, view, records) VALUES (?, ?, ?, ?, ?)",
                [(key, task, int(doc_id), json.dumps(view, default=str), json.dumps(records, default=str))
                 for task, doc_id, view, records in samples])
            self.db.execute(
                "INSERT OR REPLACE INTO cells (cell_key, run_id, model, method, method_repr, budget, determined_by, "
                "rows, details, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, run_id, determined_by["model"], determined_by["method"], determined_by["method_repr"],
                 str(determined_by["budget"]), json.dumps(determined_by, sort_keys=True, default=str),
                 json.dumps(rows), json.dumps(details or {}, default=str), datetime.now(timezone.utc).isoformat()))


def compact(path: Path) -> None:
    """Strip a store file down to what the regression checks read (correctness and answers): the
    backend's records and the first-token distributions go, a few hundred kB remain."""
    db = sqlite3.connect(path)
    with db:
        for rowid, view in db.execute("SELECT rowid, view FROM samples").fetchall():
            v = json.loads(view)
            v["dist"] = {}
            db.execute("UPDATE samples SET view = ?, records = '[]' WHERE rowid = ?", (json.dumps(v), rowid))
    db.execute("VACUUM")
    db.close()
