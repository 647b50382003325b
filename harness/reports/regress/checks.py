"""The per-cell checks and their thresholds. Every check is paired, because both runs evaluate the same
documents: a change is called a regression only when it is larger than what noise explains.

Accuracy and agreement are judged twice on the same pairs of documents: by the paired bootstrap interval of
the change (`intervals.difference_interval`, the leaderboard's resampling), and by the exact McNemar test. A
drop is a regression when the interval excludes the baseline value and the test agrees (p < alpha); when only
one of them says so it is a warning. They disagree only at the edge: with few changed documents, all one way
(e.g. 4 lost, 0 gained of 30), no resample can show a gain, so the percentile interval is too narrow there while
the exact test is not (p = 0.125)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.metrics import intervals
from harness.metrics.consistency import mcnemar_p

from .loading import RunData

ALPHA = 0.05  # per-cell significance of the McNemar tests
TOKEN_TOL = 0.5  # tokens: mean kept count may move this much
RECALL_TOL = 0.05  # evidence recall: a systematic fall smaller than this is not worth failing on
LATENCY_TOL = 0.25  # relative change of the in-run prefill ratio before a warning
FLOPS_METRICS = ("flops_vision", "flops_prefill", "flops_decode_per_token")
REFERENCE = ("none", "full")  # the unpruned cell every run holds

OK, IMPROVED, WARNING, REGRESSION, NA = "ok", "improved", "warning", "REGRESSION", "n/a"


@dataclass
class Thresholds:
    """When a change is a regression; the command line's options."""

    alpha: float = ALPHA
    token_tol: float = TOKEN_TOL
    recall_tol: float = RECALL_TOL
    latency_tol: float = LATENCY_TOL
    strict_latency: bool = False  # a latency warning is a regression


@dataclass
class Check:
    """One check of one cell: both runs' values, the verdict, and what it rests on."""

    name: str
    baseline: float | None
    current: float | None
    status: str
    p: float | None = None
    note: str = ""
    ci: tuple[float, float] | None = None  # paired 95% interval of current - baseline


def _paired(name: str, base: list[bool], cur: list[bool], alpha: float) -> Check:
    """Paired indicators: the change's bootstrap interval at 1 - alpha and the exact McNemar test (module note)."""
    lost = sum(b and not c for b, c in zip(base, cur))
    gained = sum(c and not b for b, c in zip(base, cur))
    p = mcnemar_p(lost, gained)
    low, high = intervals.difference_interval(base, cur, level=1 - alpha)
    b_mean, c_mean = sum(base) / len(base), sum(cur) / len(cur)
    by_interval, by_test = low > 0 or high < 0, p < alpha
    if by_interval and by_test:
        status = REGRESSION if lost > gained else IMPROVED
    elif (by_interval or by_test) and lost > gained:
        status = WARNING
    else:
        status = OK
    note = f"-{lost}/+{gained} docs, change {low:+.3f} to {high:+.3f}, p={p:.3g}" if lost or gained else ""
    if status == WARNING:
        note += (": the interval excludes the baseline, the exact test does not" if by_interval
                 else ": the exact test says so, the interval does not")
    return Check(name, b_mean, c_mean, status, p, note, (low, high))


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
