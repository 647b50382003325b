"""Reading the run folders a leaderboard is made of, and merging them (a later run's cells win)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics.consistency import sample_view
from harness.reports import run_folder


@dataclass
class Run:
    """One finished `harness run` folder, as stored."""

    path: Path
    summary: pd.DataFrame  # summary.csv (long format; budget as text: a number, `full` or `adaptive`)
    provenance: dict = field(default_factory=dict)  # the last invocation's: configuration, versions, device
    started: str = ""
    timing: list[str] = field(default_factory=list)  # the timing pass's devices, with attention backend
    kept: dict = field(default_factory=dict)  # (method, budget, task, doc_id) -> kept indices, one array per image
    docs: dict = field(default_factory=dict)  # (task, doc_id) -> the document (testbed: scene specs, evidence)
    views: dict = field(default_factory=dict)  # (method, budget, task) -> {doc_id: SampleView}: what pairs compare

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(self.summary["model"]))


def load_run(run_dir) -> Run:
    """Read a run folder: its summary, the store's provenance and timing devices, and per document the
    kept token indices and the paired-metric view of every cell in the summary."""
    path = run_folder.folder(run_dir)
    summary = run_folder.read_summary(path / run_folder.SUMMARY)
    run = Run(path, summary)
    if (path / run_folder.STORE).is_file():  # optional here: without it the leaderboard says "no provenance"
        run.started, run.provenance, run.timing = _read_store(path / run_folder.STORE, summary)
    run.kept, run.docs, run.views = _read_samples(path / "samples", summary)
    return run


def _read_store(path: Path, summary: pd.DataFrame) -> tuple[str, dict, list[str]]:
    """The last invocation's start time and provenance, and where the timing pass of the summary's
    cells ran (a cell reused from an earlier invocation was timed then, possibly elsewhere)."""
    db = run_folder.open_store(path)
    try:
        started, provenance = run_folder.invocation(db)
        cells = run_folder.cells(db)
    finally:
        db.close()
    wanted = set(zip(summary["method"], summary["budget"]))
    devices = []
    for cell in cells:
        if not cell.rows or (cell.rows[0]["method"], cell.rows[0]["budget"]) not in wanted:
            continue
        for timed in (cell.details.get("timing") or {}).values():
            devices.append(f"{timed.get('device', '?')} ({timed.get('attention', '?')} attention)")
    return started, provenance, list(dict.fromkeys(devices))


def _read_samples(folder: Path, summary: pd.DataFrame) -> tuple[dict, dict, dict]:
    """Kept indices per document and image (the first request's: every request of a document sees the
    same images) of the summary's cells, the documents themselves, and each cell's views of them."""
    kept, docs, views = {}, {}, {}
    summary = run_folder.per_task(summary)
    for method, budget, task in dict.fromkeys(zip(summary["method"], summary["budget"], summary["task"])):
        path = folder / f"{method}_{budget}_{task}.jsonl"
        if not path.is_file():
            continue
        with path.open() as f:
            for line in f:
                sample = json.loads(line)
                records = sample.get("records") or [{}]
                indices = records[0].get("kept_indices")
                if indices is not None:
                    kept[(method, budget, task, sample["doc_id"])] = [np.asarray(i, np.int32) for i in indices]
                docs.setdefault((task, sample["doc_id"]), sample.get("doc") or {})
                views.setdefault((method, budget, task), {})[sample["doc_id"]] = sample_view(
                    sample, sample.get("records") or [])
    return kept, docs, views


def merge(runs: list[Run]) -> tuple[pd.DataFrame, dict, dict, dict]:
    """The runs' per-task summaries, kept indices, documents and views as one: a later run's (model, method,
    budget, task) replaces an earlier one's. The cells' figures over all their tasks are left out: a merged cell
    may hold tasks of several runs, so the leaderboard recomputes them from the views."""
    key = ["model", "method", "budget", "task"]
    frames, kept, docs, views = [], {}, {}, {}
    for run in runs:
        summary = run_folder.per_task(run.summary)
        newer = set(summary[key].itertuples(index=False, name=None))
        frames = [f[np.array([k not in newer for k in f[key].itertuples(index=False, name=None)], bool)]
                  for f in frames]
        frames.append(summary)
        model = run.models[0]  # a summary holds one invocation of `harness run`: one model
        kept = {k: v for k, v in kept.items() if k[:4] not in newer}
        kept.update({(model, *k): v for k, v in run.kept.items()})
        views = {k: v for k, v in views.items() if k not in newer}
        views.update({(model, *k): v for k, v in run.views.items()})
        docs.update(run.docs)
    summary = pd.concat(frames, ignore_index=True).drop_duplicates(subset=key + ["metric"], keep="last")
    return summary, kept, docs, views
