"""What a run writes besides the store: `summary.csv` (long format), `samples/*.jsonl` and the rows
they hold, from lmms-eval's results and the backend's records."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from harness.metrics import intervals
from harness.metrics.consistency import paired_metrics, sample_view

from .grid import budget_label
from .store import SUMMARY_COLUMNS

def _leaf_tasks(res: dict) -> list[str]:
    groups = {name for name, subtasks in (res.get("group_subtasks") or {}).items() if subtasks}
    return [name for name in res["results"] if name not in groups]


def summary_row(model: str, method: str, budget, task: str, metric: str, value) -> dict:
    """One row of summary.csv (its columns: store.SUMMARY_COLUMNS), the budget as results name it."""
    return dict(model=model, method=method, budget=budget_label(budget, method), task=task, metric=metric, value=value)


def summary_rows(res: dict, model: str, method: str, budget) -> list[dict]:
    """Long-format rows of one cell: each leaf task's metrics (not stderr) and n_samples."""
    rows = []
    for task in _leaf_tasks(res):
        for key, value in res["results"][task].items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = metric if filt == "none" else key
            rows.append(summary_row(model, method, budget, task, name, float(value)))
        n = (res.get("n-samples") or {}).get(task, {}).get("effective")
        if n is not None:
            rows.append(summary_row(model, method, budget, task, "n_samples", int(n)))
    return rows


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return jsonable(value.item())
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return str(value)


def records_by_doc(records: dict) -> dict[tuple, list[dict]]:
    """The backend's records grouped per (task, doc_id), in request order."""
    by_doc: dict[tuple, dict] = {}
    for (task, doc_id, idx), record in records.items():
        by_doc.setdefault((task, doc_id), {})[idx] = record
    return {key: [recs[i] for i in sorted(recs)] for key, recs in by_doc.items()}


def sample_views(res: dict, by_doc: dict) -> dict[str, dict]:
    """Per task, {doc_id: SampleView}: what the paired metrics compare (`by_doc`: `records_by_doc`)."""
    return {task: {s["doc_id"]: sample_view(s, by_doc.get((task, s["doc_id"]), [])) for s in samples}
            for task, samples in (res.get("samples") or {}).items()}


def paired_rows(reference: dict, views: dict, model: str, method: str, budget) -> list[dict]:
    """Rows of the paired metrics of one cell against the unpruned reference, per task, with the 95% paired
    bootstrap interval of each figure that has one (`<metric>_ci_low`, `<metric>_ci_high`); then the cell's
    figures over all its tasks and their intervals, under the task name `intervals.ALL_TASKS`."""
    rows, cols_by_task = [], {}
    for task, task_views in views.items():
        for metric, value in paired_metrics(reference.get(task, {}), task_views).items():
            rows.append(summary_row(model, method, budget, task, metric, float(value)))
        cols_by_task[task] = intervals.columns(reference.get(task, {}), task_views)
        rows += _interval_rows(model, method, budget, task, intervals.task_intervals(cols_by_task[task]))
    points = intervals.cell_points(cols_by_task)
    over = intervals.cell_intervals(cols_by_task)
    for metric in intervals.METRICS:
        if metric in over:
            rows.append(summary_row(model, method, budget, intervals.ALL_TASKS, metric, points[metric]))
    return rows + _interval_rows(model, method, budget, intervals.ALL_TASKS, over)


def _interval_rows(model: str, method: str, budget, task: str, bounds: dict) -> list[dict]:
    return [summary_row(model, method, budget, task, f"{metric}_ci_{side}", value)
            for metric, (low, high) in bounds.items() for side, value in (("low", low), ("high", high))]


def write_samples(out_dir: Path, res: dict, by_doc: dict, method: str, budget) -> list[Path]:
    """``samples/<method>_<budget>_<task>.jsonl`` per task, sorted by doc_id, with the backend's records
    (`by_doc`: `records_by_doc`)."""
    sample_dir = out_dir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, samples in (res.get("samples") or {}).items():
        path = sample_dir / f"{method}_{budget_label(budget, method)}_{task}.jsonl"
        with path.open("w") as f:
            for s in sorted(samples, key=lambda s: s["doc_id"]):
                line = {k: v for k, v in s.items() if k not in ("arguments", "doc_hash")}
                line = {"task": task, "method": method, "budget": budget_label(budget, method), **line}
                line["input"] = s["arguments"][0] if s.get("arguments") else None
                line["records"] = by_doc.get((task, s["doc_id"]), [])
                f.write(json.dumps(jsonable(line)) + "\n")
        paths.append(path)
    return paths


def write_summary(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    """Tasks as rows, one column per (method, budget), accuracy (n) per cell."""
    metric_rows = [r for r in rows if r["metric"] != "n_samples" and "_ci_" not in r["metric"]]
    n = {(r["method"], r["budget"], r["task"]): r["value"] for r in rows if r["metric"] == "n_samples"}
    for m, b, _ in list(n):  # the cell over its tasks: every document of the cell
        n[(m, b, intervals.ALL_TASKS)] = sum(v for (m_, b_, t), v in n.items() if (m_, b_) == (m, b)
                                             and t != intervals.ALL_TASKS)
    columns = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in metric_rows))
    value = {(r["method"], r["budget"], r["task"], r["metric"]): r["value"] for r in metric_rows}
    header = ["task", "metric"] + [f"{m}@{b}" for m, b in columns]
    table = [header]
    for task, metric in keys:
        cells_ = []
        for m, b in columns:
            v = value.get((m, b, task, metric))
            cells_.append("-" if v is None else f"{v:.3f} (n={n.get((m, b, task), '?')})")
        table.append([task, metric] + cells_)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
