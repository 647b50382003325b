"""The verdict table (regress.md, regress.csv), and `regress`: compare two run folders, print and write it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from .checks import FLOPS_METRICS, NA, OK, Check, Thresholds
from .compare import Report, compare
from .loading import Unusable, load_run


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
        text = f"{check.baseline:.3f}->{check.current:.3f}"
        if check.note:
            text += f" ({check.ci[0]:+.3f}…{check.ci[1]:+.3f}, p={check.p:.2g})" if check.ci else f" (p={check.p:.2g})"
    return text + ("" if check.status == OK else f" {check.status}")


def _flops_summary(checks: list[Check]) -> str:
    changed = [c for c in checks if c.name in FLOPS_METRICS and c.status not in (OK, NA)]
    if not changed:
        return "=" if any(c.name in FLOPS_METRICS and c.status == OK for c in checks) else "-"
    return ", ".join(f"{c.name.removeprefix('flops_')} {c.note} {c.status}" for c in changed)


def format_report(report: Report) -> str:
    th = report.thresholds
    head = ["cell", "accuracy", "agreement", "evidence recall", "kept tokens", "FLOPs", "prefill / unpruned", "verdict"]
    rule = (f"Regression: accuracy or agreement dropped, the paired bootstrap {1 - th.alpha:.0%} interval of the "
            f"change excluding zero and exact McNemar p < {th.alpha:g} (paired by document; one of the two alone: "
            f"a warning); "
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
        w.writerow(["method", "budget", "task", "check", "baseline", "current", "change_ci_low", "change_ci_high",
                    "p_value", "status", "note"])
        for v in report.cells:
            for c in v.checks:
                low, high = c.ci or (None, None)
                w.writerow([v.method, v.budget, v.task, c.name, c.baseline, c.current, low, high, c.p, c.status,
                            c.note])
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
