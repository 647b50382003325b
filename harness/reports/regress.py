"""`harness regress`: is the current run worse than a baseline run of the same protocol?

Cells are matched by (method, budget, task). Every check is paired, because both runs evaluate the
same documents: a change is called a regression only when it is larger than what noise explains.

  accuracy      exact McNemar test on per-document correctness (baseline vs current): a regression
                when accuracy dropped and p < alpha (default 0.05).
  agreement     the same test on the per-document indicator "same answer as this run's unpruned
                reference": a regression when agreement dropped and p < alpha.
  evidence      testbed tasks: the share of the question's evidence patches kept, per document; an
                exact sign test on the per-document changes, a regression when p < alpha and the mean
                fell by more than 0.05 (a method keeping the wrong tokens shows here first: FastV
                prunes before the last of the testbed's 3 layers, so its answers barely move).
  kept tokens   mean visual tokens kept per document: a regression when it moved by more than
                0.5 token (a fixed-budget method keeps an exact count; half a token is a real change).
  FLOPs         counted, hence deterministic: any change is reported, an increase is a regression.
  latency       never compared across runs in milliseconds (another machine, another load): the
                cell's prefill_ms over the same run's unpruned prefill_ms, compared between runs; a
                ratio more than 25% worse is a warning (a regression with --strict-latency).

Exit codes: 0 no regression, 1 at least one regression, 2 unusable input (a folder, summary or
store missing, cells of the baseline missing in the current run, or a different protocol: model
weights, tasks, sample limit or task data version; the code version and packages may differ, that
is what is being tested).

Also: `--record RUN_DIR` appends a run's headline figures to `results/history.csv`, `--history`
plots them, and `--ci` runs the small protocol of `configs/regress_ci.yaml` into a fresh folder and
compares it with the committed `results/regress_baseline/` (`--write-baseline` remakes that).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import sqlite3
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness.errors import InputError
from harness.metrics.consistency import mcnemar_p

from . import run_folder

REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE_DIR = REPO_ROOT / "results" / "regress_baseline"
HISTORY_FILE = REPO_ROOT / "results" / "history.csv"
CI_CONFIG = REPO_ROOT / "configs" / "regress_ci.yaml"

ALPHA = 0.05  # per-cell significance of the McNemar tests
TOKEN_TOL = 0.5  # tokens: mean kept count may move this much
RECALL_TOL = 0.05  # evidence recall: a systematic fall smaller than this is not worth failing on
LATENCY_TOL = 0.25  # relative change of the in-run prefill ratio before a warning
PROTOCOL_KEYS = ("model", "tasks", "limit", "task_data")  # what must be equal (from each cell's key)
FLOPS_METRICS = ("flops_vision", "flops_prefill", "flops_decode_per_token")
REFERENCE = ("none", "full")  # the unpruned cell every run holds

OK, IMPROVED, WARNING, REGRESSION, NA = "ok", "improved", "warning", "REGRESSION", "n/a"


class Unusable(InputError):
    """Input that cannot be compared: exit code 2, with this message."""


@dataclass
class Thresholds:
    alpha: float = ALPHA
    token_tol: float = TOKEN_TOL
    recall_tol: float = RECALL_TOL
    latency_tol: float = LATENCY_TOL
    strict_latency: bool = False


# ----------------------------------------------------------------------------- loading a run

@dataclass
class RunData:
    """What the checks read from a run folder, keyed by (method, budget label, task)."""

    path: Path
    protocol: dict
    metrics: dict  # (method, budget, task) -> {metric: value}  (summary.csv)
    samples: dict  # (method, budget, task) -> {doc_id: view}   (the store's per-sample views)
    method_reprs: dict  # (method, budget) -> repr
    codes: set  # code versions of the cells
    provenance: dict  # the newest `runs` row's provenance
    started: str = ""


def _read_metrics(path: Path) -> dict:
    frame = run_folder.read_summary(path)
    metrics: dict = {}
    for method, budget, task, metric, value in frame[["method", "budget", "task", "metric", "value"]].itertuples(
            index=False, name=None):
        metrics.setdefault((method, budget, task), {})[metric] = float(value)
    return metrics


def _row_set(rows) -> frozenset:
    """Rows comparable as a set (NaN, which a CPU run reports for peak memory, equals itself here)."""
    return frozenset((r["task"], r["metric"], _key(float(r["value"]))) for r in rows)


def _key(value: float):
    return "nan" if math.isnan(value) else value


def _select_cells(db: sqlite3.Connection, metrics: dict, where: Path) -> dict:
    """The store cell behind each (method, budget) of summary.csv. A folder reused with another limit
    or code holds several cells per label: the one whose rows are the summary's is the one reported."""
    summary_rows: dict = {}
    for (method, budget, task), values in metrics.items():
        summary_rows.setdefault((method, budget), set()).update((task, m, _key(v)) for m, v in values.items())
    candidates: dict = {}
    for key, method, determined_by, rows, finished in db.execute(
            "SELECT cell_key, method, determined_by, rows, finished FROM cells ORDER BY finished"):
        rows = json.loads(rows)
        budget = rows[0]["budget"] if rows else "full"
        candidates.setdefault((method, budget), []).append((key, json.loads(determined_by), _row_set(rows)))
    chosen = {}
    for label, wanted in summary_rows.items():
        matching = [c for c in candidates.get(label, []) if c[2] == frozenset(wanted)]
        if not matching:
            raise Unusable(f"{where}: summary.csv has {label[0]}@{label[1]} but results.sqlite holds no cell "
                           "with those rows (the two files are from different runs)")
        chosen[label] = matching[-1][:2]  # the newest of identical results
    return chosen


def _protocol(chosen: dict, where: Path) -> dict:
    protocols = {json.dumps({k: d.get(k) for k in PROTOCOL_KEYS}, sort_keys=True) for _, d in chosen.values()}
    if len(protocols) > 1:
        raise Unusable(f"{where} mixes protocols across its cells: {'; '.join(sorted(protocols))}")
    return json.loads(protocols.pop())


def _views(db: sqlite3.Connection, chosen: dict) -> dict:
    """Per cell and task, {doc_id: view} with only what the checks read (answers are small, the
    first-token distributions are not)."""
    samples: dict = {}
    for (method, budget), (key, _) in chosen.items():
        for task, doc_id, view in db.execute("SELECT task, doc_id, view FROM samples WHERE cell_key = ?", (key,)):
            v = json.loads(view)
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
        keys = [k for k, _ in chosen.values()]
        marks = ",".join("?" * len(keys))
        run_id = db.execute(f"SELECT max(run_id) FROM cells WHERE cell_key IN ({marks})", keys).fetchone()[0]
        started, provenance = run_folder.invocation(db, run_id)
        return RunData(path=path, protocol=_protocol(chosen, path), metrics=metrics, samples=_views(db, chosen),
                       method_reprs={label: d["method_repr"] for label, (_, d) in chosen.items()},
                       codes={d.get("code", "unknown") for _, d in chosen.values()},
                       provenance=provenance, started=started)
    finally:
        db.close()


def protocol_hash(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the checks

@dataclass
class Check:
    name: str
    baseline: float | None
    current: float | None
    status: str
    p: float | None = None
    note: str = ""


def _paired(name: str, base: list[bool], cur: list[bool], alpha: float) -> Check:
    """Exact McNemar on paired indicators: a drop is a regression only when it is significant."""
    lost = sum(b and not c for b, c in zip(base, cur))
    gained = sum(c and not b for b, c in zip(base, cur))
    p = mcnemar_p(lost, gained)
    b_mean, c_mean = sum(base) / len(base), sum(cur) / len(cur)
    if p < alpha:
        status = REGRESSION if lost > gained else IMPROVED
    else:
        status = OK
    note = f"-{lost}/+{gained} docs, p={p:.3g}" if lost or gained else ""
    return Check(name, b_mean, c_mean, status, p, note)


def check_accuracy(base: dict, cur: dict, alpha: float = ALPHA) -> Check:
    docs = sorted(base)
    return _paired("accuracy", [base[d]["correct"] for d in docs], [cur[d]["correct"] for d in docs], alpha)


def check_agreement(base: dict, base_ref: dict | None, cur: dict, cur_ref: dict | None,
                    alpha: float = ALPHA) -> Check:
    """Agreement with each run's own unpruned answers, paired by document."""
    if base_ref is None or cur_ref is None or not set(base) <= set(base_ref) or not set(base) <= set(cur_ref):
        return Check("agreement", None, None, NA, note="no unpruned reference")
    docs = sorted(base)
    return _paired("agreement", [base[d]["answer"] == base_ref[d]["answer"] for d in docs],
                   [cur[d]["answer"] == cur_ref[d]["answer"] for d in docs], alpha)


def check_recall(base: dict, cur: dict, alpha: float = ALPHA, tol: float = RECALL_TOL) -> Check:
    """Sign test on per-document evidence recall: systematic (p < alpha) and large enough (> tol)."""
    pairs = [(base[d]["recall"], cur[d]["recall"]) for d in sorted(base)
             if base[d].get("recall") is not None and cur[d].get("recall") is not None]
    if not pairs:
        return Check("evidence_recall", None, None, NA)
    down = sum(c < b - 1e-9 for b, c in pairs)
    up = sum(c > b + 1e-9 for b, c in pairs)
    p = mcnemar_p(down, up)  # the exact sign test: the same binomial on the docs that moved
    b_mean, c_mean = (sum(x) / len(pairs) for x in zip(*pairs))
    status = OK
    if p < alpha and abs(c_mean - b_mean) > tol:
        status = REGRESSION if c_mean < b_mean else IMPROVED
    note = f"-{down}/+{up} docs, p={p:.3g}" if down or up else ""
    return Check("evidence_recall", b_mean, c_mean, status, p, note)


def _num(metrics: dict, name: str) -> float | None:
    """A cell's metric, None when absent or NaN (not measured)."""
    value = metrics.get(name)
    return None if value is None or math.isnan(value) else value


def check_tokens(base: dict, cur: dict, tol: float = TOKEN_TOL) -> Check:
    b, c = _num(base, "visual_tokens_kept"), _num(cur, "visual_tokens_kept")
    if b is None or c is None:
        return Check("kept_tokens", b, c, NA)
    status = REGRESSION if abs(c - b) > tol else OK
    return Check("kept_tokens", b, c, status, note=f"{c - b:+.2f} tokens" if c != b else "")


def check_flops(base: dict, cur: dict) -> list[Check]:
    """Exact: operation counts do not vary between runs, so any difference is the code's."""
    out = []
    for metric in FLOPS_METRICS:
        b, c = _num(base, metric), _num(cur, metric)
        if b is None or c is None:
            out.append(Check(metric, b, c, NA))
        elif c == b:
            out.append(Check(metric, b, c, OK))
        else:
            out.append(Check(metric, b, c, REGRESSION if c > b else IMPROVED, note=f"{(c - b) / b:+.2%}"))
    return out


def prefill_ratio(run: RunData, method: str, budget: str, task: str) -> float | None:
    """The cell's prefill time over the same run's unpruned prefill time (same machine, same load)."""
    cell = _num(run.metrics.get((method, budget, task), {}), "prefill_ms")
    ref = _num(run.metrics.get((*REFERENCE, task), {}), "prefill_ms")
    return cell / ref if cell is not None and ref else None


def check_latency(b_ratio: float | None, c_ratio: float | None, th: Thresholds) -> Check:
    if b_ratio is None or c_ratio is None:
        return Check("prefill_ratio", b_ratio, c_ratio, NA)
    change = c_ratio / b_ratio - 1
    status = (REGRESSION if th.strict_latency else WARNING) if change > th.latency_tol else OK
    return Check("prefill_ratio", b_ratio, c_ratio, status, note=f"{change:+.0%}")


# ----------------------------------------------------------------------------- comparing two runs

@dataclass
class CellVerdict:
    method: str
    budget: str
    task: str
    checks: list[Check] = field(default_factory=list)

    @property
    def cell(self) -> str:
        return f"{self.method}@{self.budget}/{self.task}"

    @property
    def verdict(self) -> str:
        statuses = {c.status for c in self.checks}
        for s in (REGRESSION, WARNING, IMPROVED):
            if s in statuses:
                return s
        return OK


@dataclass
class Report:
    baseline: RunData
    current: RunData
    thresholds: Thresholds
    cells: list[CellVerdict]
    notes: list[str]

    @property
    def regressions(self) -> list[CellVerdict]:
        return [c for c in self.cells if c.verdict == REGRESSION]

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions else 0


def check_protocol(base: RunData, cur: RunData) -> None:
    """Unusable unless both runs are of the same protocol and the current one holds every cell."""
    diffs = [f"{k}: {base.protocol.get(k)!r} (baseline) vs {cur.protocol.get(k)!r} (current)"
             for k in PROTOCOL_KEYS if base.protocol.get(k) != cur.protocol.get(k)]
    if diffs:
        raise Unusable("different protocol, the runs are not comparable: " + "; ".join(diffs))
    missing = [k for k in base.metrics if k not in cur.metrics]
    if missing:
        raise Unusable(f"{len(missing)} cell(s) of the baseline are missing in the current run: "
                       + ", ".join(f"{m}@{b}/{t}" for m, b, t in sorted(missing)))
    for key, docs in base.samples.items():
        if set(docs) != set(cur.samples.get(key, {})):
            raise Unusable(f"{key[0]}@{key[1]}/{key[2]}: the runs evaluated different documents "
                           f"({len(docs)} vs {len(cur.samples.get(key, {}))})")


def _notes(base: RunData, cur: RunData) -> list[str]:
    """What differs but is allowed to: the point of the comparison, or context for reading it."""
    p = base.protocol
    notes = [(f"protocol {protocol_hash(p)}: model {p['model']}, tasks {','.join(map(str, p['tasks']))}, "
              f"limit {p['limit']}, task data {p['task_data']}"),
             f"code: {', '.join(sorted(base.codes))} (baseline) -> {', '.join(sorted(cur.codes))} (current)"]
    for label, r in base.method_reprs.items():
        if cur.method_reprs.get(label, r) != r:
            notes.append(f"{label[0]}@{label[1]} parameters changed: {r} -> {cur.method_reprs[label]}")
    bp, cp = base.provenance.get("packages", {}), cur.provenance.get("packages", {})
    for pkg in sorted(set(bp) | set(cp)):
        if bp.get(pkg) != cp.get(pkg):
            notes.append(f"package {pkg}: {bp.get(pkg)} -> {cp.get(pkg)}")
    for key in ("device", "dtype", "batch_size"):
        b = base.provenance.get(key, base.provenance.get("config", {}).get(key))
        c = cur.provenance.get(key, cur.provenance.get("config", {}).get(key))
        if b != c:
            notes.append(f"{key}: {b} -> {c} (answers may differ for that reason alone)")
    extra = sorted(k for k in cur.metrics if k not in base.metrics)
    if extra:
        notes.append("not in the baseline, not compared: " + ", ".join(f"{m}@{b}/{t}" for m, b, t in extra))
    return notes


def compare(base: RunData, cur: RunData, th: Thresholds | None = None) -> Report:
    th = th or Thresholds()
    check_protocol(base, cur)
    cells = []
    for key in base.metrics:
        method, budget, task = key
        v = CellVerdict(method, budget, task)
        b_s, c_s = base.samples.get(key), cur.samples.get(key)
        if b_s:
            v.checks.append(check_accuracy(b_s, c_s, th.alpha))
            if (method, budget) != REFERENCE:
                ref = (*REFERENCE, task)
                v.checks.append(check_agreement(b_s, base.samples.get(ref), c_s, cur.samples.get(ref), th.alpha))
                v.checks.append(check_recall(b_s, c_s, th.alpha, th.recall_tol))
        v.checks.append(check_tokens(base.metrics[key], cur.metrics[key], th.token_tol))
        v.checks += check_flops(base.metrics[key], cur.metrics[key])
        if (method, budget) != REFERENCE:
            v.checks.append(check_latency(prefill_ratio(base, *key), prefill_ratio(cur, *key), th))
        cells.append(v)
    return Report(base, cur, th, cells, _notes(base, cur))


# ----------------------------------------------------------------------------- the verdict table

def _fmt(check: Check | None) -> str:
    if check is None or check.status == NA:
        return "-"
    if check.name in FLOPS_METRICS:
        text = "=" if check.status == OK else check.note
    elif check.name == "kept_tokens":
        text = f"{check.current:.1f}" + (f" ({check.note})" if check.note else "")
    elif check.name == "prefill_ratio":
        text = f"{check.baseline:.2f}->{check.current:.2f}"
    else:
        text = f"{check.baseline:.3f}->{check.current:.3f}" + (f" (p={check.p:.2g})" if check.note else "")
    return text + ("" if check.status == OK else f" {check.status}")


def _flops_summary(checks: list[Check]) -> str:
    changed = [c for c in checks if c.name in FLOPS_METRICS and c.status not in (OK, NA)]
    if not changed:
        return "=" if any(c.name in FLOPS_METRICS and c.status == OK for c in checks) else "-"
    return ", ".join(f"{c.name.removeprefix('flops_')} {c.note} {c.status}" for c in changed)


def format_report(report: Report) -> str:
    th = report.thresholds
    head = ["cell", "accuracy", "agreement", "evidence recall", "kept tokens", "FLOPs", "prefill / unpruned", "verdict"]
    rule = (f"Regression: accuracy or agreement dropped with exact McNemar p < {th.alpha:g} (paired by document); "
            f"evidence recall fell by more than {th.recall_tol:g} with sign-test p < {th.alpha:g}; mean kept tokens "
            f"moved by more than {th.token_tol:g}; any FLOPs increase. The prefill ratio to the same run's unpruned "
            f"prefill more than {th.latency_tol:.0%} worse is a {'regression' if th.strict_latency else 'warning'}.")
    lines = [f"# harness regress: {report.current.path} against {report.baseline.path}", "", rule, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report.cells:
        by = {c.name: c for c in v.checks}
        row = [v.cell, _fmt(by.get("accuracy")), _fmt(by.get("agreement")), _fmt(by.get("evidence_recall")),
               _fmt(by.get("kept_tokens")),
               _flops_summary(v.checks), _fmt(by.get("prefill_ratio")), v.verdict]
        lines.append("| " + " | ".join(row) + " |")
    lines += [""] + [f"- {n}" for n in report.notes] + [""]
    bad = report.regressions
    lines.append(f"**Verdict: REGRESSION** in {len(bad)} cell(s): {', '.join(v.cell for v in bad)}" if bad
                 else f"**Verdict: pass** ({len(report.cells)} cells, no regression)")
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, table = out_dir / "regress.md", out_dir / "regress.csv"
    md.write_text(format_report(report))
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "budget", "task", "check", "baseline", "current", "p_value", "status", "note"])
        for v in report.cells:
            for c in v.checks:
                w.writerow([v.method, v.budget, v.task, c.name, c.baseline, c.current, c.p, c.status, c.note])
    return md, table


def regress(baseline, current, output=None, th: Thresholds | None = None, out=None, write: bool = True) -> int:
    """Compare, print the verdict table, write regress.md/.csv; the exit code (0, 1 or 2)."""
    out = out or sys.stdout
    try:
        report = compare(load_run(baseline), load_run(current), th)
    except Unusable as e:
        print(f"harness regress: unusable input: {e}", file=sys.stderr)
        return 2
    print(format_report(report), file=out)
    if write or report.exit_code:
        md, table = write_report(report, Path(output) if output else Path(current))
        print(f"wrote {md} and {table}", file=out)
    return report.exit_code


# ----------------------------------------------------------------------------- history

HISTORY_COLUMNS = ("recorded", "run_started", "commit", "protocol", "protocol_desc", "run", "headline")


def headline(run: RunData) -> dict:
    """Per method@budget, means over tasks: accuracy, agreement, kept tokens."""
    by_cell: dict = {}
    for (method, budget, _), values in run.metrics.items():
        by_cell.setdefault(f"{method}@{budget}", []).append(values)
    out = {}
    for cell, tasks in by_cell.items():
        out[cell] = {m: round(sum(t[m] for t in tasks) / len(tasks), 4)
                     for m in ("accuracy", "agreement", "visual_tokens_kept") if all(m in t for t in tasks)}
    return out


def record(run_dir, history=HISTORY_FILE, out=None) -> int:
    """Append one line for a finished run: commit, dates, protocol and headline figures."""
    try:
        run = load_run(run_dir)
    except Unusable as e:
        print(f"harness regress --record: unusable input: {e}", file=sys.stderr)
        return 2
    history = Path(history)
    p = run.protocol
    line = {"recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_started": run.started[:19], "commit": run.provenance.get("commit", ",".join(sorted(run.codes))),
            "protocol": protocol_hash(p),
            "protocol_desc": f"tasks={','.join(map(str, p['tasks']))} limit={p['limit']} model={p['model']}",
            "run": str(run_dir), "headline": json.dumps(headline(run), sort_keys=True)}
    new = not history.exists()
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        if new:
            w.writeheader()
        w.writerow(line)
    print(f"recorded {run_dir} ({line['commit'][:12]}, protocol {line['protocol']}) in {history}",
          file=out or sys.stdout)
    return 0


def history_frame(history=HISTORY_FILE):
    """Long table: one row per (record, method@budget, figure)."""
    import pandas as pd

    path = Path(history)
    if not path.is_file():
        raise Unusable(f"{path} does not exist (record runs with `harness regress --record RUN_DIR`)")
    rows = []
    with path.open() as f:
        for i, r in enumerate(csv.DictReader(f)):
            label = f"{i}: {r['commit'][:7]}\n{r['run_started'][:10]}"
            for cell, figures in json.loads(r["headline"]).items():
                for metric, value in figures.items():
                    rows.append({"record": i, "label": label, "protocol": r["protocol"],
                                 "protocol_desc": r["protocol_desc"], "cell": cell, "metric": metric, "value": value})
    if not rows:
        raise Unusable(f"{path} holds no records")
    return pd.DataFrame(rows)


def plot_history(history=HISTORY_FILE, output=None, out=None) -> int:
    """Mean accuracy per method@budget over the recorded runs, one panel per protocol (only runs of
    one protocol are comparable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    try:
        df = history_frame(history)
    except Unusable as e:
        print(f"harness regress --history: {e}", file=sys.stderr)
        return 2
    acc = df[df.metric == "accuracy"]
    protocols = list(dict.fromkeys(acc.protocol))
    fig, axes = plt.subplots(len(protocols), 1, figsize=(9, 3.6 * len(protocols)), squeeze=False)
    for ax, proto in zip(axes[:, 0], protocols):
        part = acc[acc.protocol == proto]
        sns.lineplot(data=part, x="record", y="value", hue="cell", marker="o", ax=ax)
        ticks = part.drop_duplicates("record")
        ax.set_xticks(ticks.record, ticks.label, fontsize=7)
        ax.set_ylabel("mean accuracy")
        ax.set_title(f"protocol {proto}: {part.protocol_desc.iloc[0]}", fontsize=9)
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    output = Path(output) if output else Path(history).with_suffix(".png")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    print(f"wrote {output} ({acc.record.nunique()} runs, {len(protocols)} protocol(s))", file=out or sys.stdout)
    return 0


# ----------------------------------------------------------------------------- CI

def load_ci_config(path=CI_CONFIG) -> dict:
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    known = {"methods", "budgets", "tasks", "limit", "timing_repeats", "batch_size", "model", "baseline"}
    unknown = set(config) - known
    if unknown:
        raise Unusable(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; accepted: {', '.join(sorted(known))}")
    return config


def run_ci_protocol(config: dict, out_dir: Path) -> None:
    """`harness run` with the CI protocol into a fresh folder: never one holding finished cells,
    which a run would reuse instead of testing the code."""
    from harness.evaluation.runner import RunConfig, RunError, run

    if out_dir.exists() and any(out_dir.iterdir()):
        raise Unusable(f"{out_dir} is not empty: the CI protocol runs into a fresh folder")
    as_str = {k: ",".join(map(str, v)) if isinstance(v, list) else (None if v is None else str(v))
              for k, v in config.items() if k in ("methods", "budgets", "tasks")}
    cfg = RunConfig(**as_str, limit=config.get("limit"), model=config.get("model"), output=str(out_dir),
                    timing_repeats=int(config.get("timing_repeats", 2)), batch_size=int(config.get("batch_size", 8)))
    try:
        run(cfg)
    except RunError as e:
        raise Unusable(f"the CI protocol could not run: {e}") from None


def compact_copy(run_dir: Path, dest: Path) -> None:
    """What a committed baseline needs: summary.csv and the store without the backend's records and
    first-token distributions (the checks read correctness and answers only), a few hundred kB."""
    tmp = Path(tempfile.mkdtemp(prefix="regress-baseline-", dir=dest.parent if dest.parent.exists() else None))
    tmp.chmod(0o755)  # mkdtemp makes it private; a committed folder is not
    shutil.copy(run_dir / "summary.csv", tmp / "summary.csv")
    shutil.copy(run_dir / "results.sqlite", tmp / "results.sqlite")
    db = sqlite3.connect(tmp / "results.sqlite")
    with db:
        for rowid, view in db.execute("SELECT rowid, view FROM samples").fetchall():
            v = json.loads(view)
            v["dist"] = {}
            db.execute("UPDATE samples SET view = ?, records = '[]' WHERE rowid = ?", (json.dumps(v), rowid))
    db.execute("VACUUM")
    db.close()
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def ci(config_path=CI_CONFIG, current=None, write_baseline=False, th: Thresholds | None = None, out=None) -> int:
    """Run the CI protocol and compare it with the committed baseline (or remake the baseline)."""
    out = out or sys.stdout
    try:
        config = load_ci_config(config_path)
        baseline = Path(config.get("baseline") or BASELINE_DIR)
        baseline = baseline if baseline.is_absolute() else REPO_ROOT / baseline
        if not write_baseline:
            load_run(baseline)  # unusable before spending minutes on the run
        run_dir = Path(current) if current else Path(tempfile.mkdtemp(prefix="harness-regress-ci-"))
        run_ci_protocol(config, run_dir)
    except Unusable as e:
        print(f"harness regress --ci: unusable input: {e}", file=sys.stderr)
        return 2
    if write_baseline:
        compact_copy(run_dir, baseline)
        print(f"wrote the baseline {baseline} from {run_dir}", file=out)
        code = 0
    else:
        code = regress(baseline, run_dir, output=run_dir, th=th, out=out, write=current is not None)
    if current is None and code == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif code:
        print(f"kept the CI run in {run_dir}", file=out)
    return code


# ----------------------------------------------------------------------------- command line

def _main(args) -> int:
    th = Thresholds(alpha=args.alpha, token_tol=args.token_tol, recall_tol=args.recall_tol,
                    latency_tol=args.latency_tol, strict_latency=args.strict_latency)
    if args.ci:
        return ci(args.ci_config, current=args.current, write_baseline=args.write_baseline, th=th)
    if args.record:
        return record(args.record, args.history_file)
    if args.history:
        return plot_history(args.history_file, args.output)
    if not (args.baseline and args.current):
        print("harness regress: error: give --baseline DIR and --current DIR (or --ci, --record RUN_DIR, --history)",
              file=sys.stderr)
        return 2
    return regress(args.baseline, args.current, args.output, th)


def add_parser(subparsers) -> None:
    """Register `harness regress` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "regress", help="compare a run with a baseline run of the same protocol (exit 1 on regression)",
        description="Cell-by-cell comparison with paired statistics; exit 0 pass, 1 regression, 2 unusable input.")
    p.add_argument("--baseline", help="baseline run folder (summary.csv + results.sqlite)")
    p.add_argument("--current", help="current run folder; with --ci: the (fresh) folder to run into")
    p.add_argument("--output", default=None,
                   help="folder for regress.md/regress.csv (default: the current run's); with --history: the PNG")
    p.add_argument("--alpha", type=float, default=ALPHA, help=f"McNemar significance per cell (default {ALPHA})")
    p.add_argument("--token-tol", dest="token_tol", type=float, default=TOKEN_TOL,
                   help=f"allowed change of mean kept tokens (default {TOKEN_TOL})")
    p.add_argument("--recall-tol", dest="recall_tol", type=float, default=RECALL_TOL,
                   help=f"mean evidence-recall fall tolerated even when systematic (default {RECALL_TOL})")
    p.add_argument("--latency-tol", dest="latency_tol", type=float, default=LATENCY_TOL,
                   help=f"allowed relative worsening of the in-run prefill ratio (default {LATENCY_TOL})")
    p.add_argument("--strict-latency", dest="strict_latency", action="store_true",
                   help="a latency warning is a regression")
    p.add_argument("--record", metavar="RUN_DIR", help="append RUN_DIR's headline figures to the history file")
    p.add_argument("--history", action="store_true", help="plot the history file's trend")
    p.add_argument("--history-file", dest="history_file", default=str(HISTORY_FILE))
    p.add_argument("--ci", action="store_true", help="run the CI protocol and compare with the committed baseline")
    p.add_argument("--ci-config", dest="ci_config", default=str(CI_CONFIG))
    p.add_argument("--write-baseline", dest="write_baseline", action="store_true",
                   help="with --ci: remake the committed baseline from a fresh run instead of comparing")
    p.set_defaults(func=_main)
