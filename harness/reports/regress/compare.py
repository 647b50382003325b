"""Comparing two runs of the same protocol cell by cell (matched by method, budget and task)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import (IMPROVED, OK, REFERENCE, REGRESSION, WARNING, Check, Thresholds, check_accuracy, check_agreement,
                     check_flops, check_latency, check_recall, check_tokens, prefill_ratio)
from .loading import PROTOCOL_KEYS, RunData, Unusable, protocol_hash


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
