"""Paired measurements of a pruned cell against the unpruned reference on the same samples.

Each sample is reduced to a `SampleView`: whether it was answered correctly (the task's own
per-sample accuracy), the answer (generated text, or the chosen option of a multiple-choice doc),
the first answer token's distribution (for multiple choice: the distribution over the options,
softmax of the negative option losses), and the visual tokens in and kept.

Metrics (rows of summary.csv; names fixed):
  relative_accuracy        pruned accuracy / unpruned accuracy on the same samples
  agreement                share of samples with the same answer
  flip_correct_to_wrong    share of samples right unpruned, wrong pruned
  flip_wrong_to_correct    share of samples wrong unpruned, right pruned
  first_token_kl           mean KL(unpruned || pruned) of the first-token (or option) distribution
  first_token_jsd          mean Jensen-Shannon divergence (natural log, textbook definition) of the same
  top1_agreement           share of samples whose most likely first token (or option) is the same
  mcnemar_p                exact two-sided McNemar test on the discordant pairs
  teacher_forced_nll       mean summed NLL of the unpruned model's generated answer under the pruned
                           model (generation tasks; not for the unpruned cell itself)
  visual_tokens_in / visual_tokens_kept / evidence_recall   means over the samples
  delta_ipr                mean over samples of IPR(kept tokens) - IPR(all tokens) (METHODS.md section 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def normalize_answer(text) -> str:
    """How an answer is compared with the truth or another answer: case-insensitive, surrounding
    whitespace and trailing periods removed (the testbed's task scoring and training use it too)."""
    text = "" if text is None else str(text)
    return text.strip().rstrip(".").strip().lower()


@dataclass
class SampleView:
    correct: bool
    answer: str
    dist: dict  # token id (or option index), as a string -> log-probability
    visual_tokens_in: int
    visual_tokens_kept: int
    evidence_recall: float | None
    delta_ipr: float | None = None
    teacher_forced_nll: float | None = None


def _dist(first_token: dict | None) -> dict:
    if not first_token:
        return {}
    return {str(i): lp for i, lp in zip(first_token["ids"], first_token["logprobs"])}  # str: as JSON keeps them


def sample_view(sample: dict, records: list[dict]) -> SampleView:
    """A logged lmms-eval sample (with the backend's records, in request order) reduced to what
    the paired metrics compare."""
    correct = bool(sample.get("accuracy", 0.0))
    first = records[0] if records else {}
    if first.get("request_type") == "loglikelihood":  # multiple choice: one record per option
        losses = np.array([r["loss"] for r in records], dtype=float)
        logp = -losses - np.logaddexp.reduce(-losses)
        answer, dist = str(int(losses.argmin())), {str(i): lp for i, lp in enumerate(logp.tolist())}
    else:
        answer, dist = normalize_answer(first.get("text")), _dist(first.get("first_token"))
    return SampleView(correct, answer, dist, int(first.get("visual_tokens_in", 0)),
                      int(first.get("visual_tokens_kept", 0)), first.get("evidence_recall"), first.get("delta_ipr"),
                      first.get("teacher_forced_nll"))


def _kl_and_jsd(p: dict, q: dict) -> tuple[float, float]:
    """KL(p || q) and JSD over the union of the stored ids (missing ids: probability ~0)."""
    ids = sorted(set(p) | set(q))
    floor = -1e9
    lp = np.array([p.get(i, floor) for i in ids])
    lq = np.array([q.get(i, floor) for i in ids])
    pp, qq = np.exp(lp), np.exp(lq)
    pp, qq = pp / pp.sum(), qq / qq.sum()
    eps = 1e-12
    kl = float(np.sum(pp * (np.log(pp + eps) - np.log(qq + eps))))
    m = (pp + qq) / 2
    jsd = float(0.5 * np.sum(pp * (np.log(pp + eps) - np.log(m + eps)))
                + 0.5 * np.sum(qq * (np.log(qq + eps) - np.log(m + eps))))
    return max(kl, 0.0), max(jsd, 0.0)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_metrics(reference: dict, pruned: dict) -> dict[str, float]:
    """Metrics over the samples both cells hold: {key: SampleView} each."""
    keys = sorted(set(reference) & set(pruned))
    if not keys:
        return {}
    ref = [reference[k] for k in keys]
    new = [pruned[k] for k in keys]
    ref_acc = np.mean([r.correct for r in ref])
    new_acc = np.mean([n.correct for n in new])
    c2w = sum(r.correct and not n.correct for r, n in zip(ref, new))
    w2c = sum(n.correct and not r.correct for r, n in zip(ref, new))
    divergences = [_kl_and_jsd(r.dist, n.dist) for r, n in zip(ref, new) if r.dist and n.dist]
    top1 = [max(r.dist, key=r.dist.get) == max(n.dist, key=n.dist.get) for r, n in zip(ref, new)
            if r.dist and n.dist]
    recalls = [n.evidence_recall for n in new if n.evidence_recall is not None]
    out = {
        "relative_accuracy": float(new_acc / ref_acc) if ref_acc > 0 else float("nan"),
        "agreement": float(np.mean([r.answer == n.answer for r, n in zip(ref, new)])),
        "flip_correct_to_wrong": c2w / len(keys),
        "flip_wrong_to_correct": w2c / len(keys),
        "first_token_kl": float(np.mean([d[0] for d in divergences])) if divergences else float("nan"),
        "first_token_jsd": float(np.mean([d[1] for d in divergences])) if divergences else float("nan"),
        "top1_agreement": float(np.mean(top1)) if top1 else float("nan"),
        "mcnemar_p": mcnemar_p(c2w, w2c),
        "visual_tokens_in": float(np.mean([n.visual_tokens_in for n in new])),
        "visual_tokens_kept": float(np.mean([n.visual_tokens_kept for n in new])),
    }
    if recalls:
        out["evidence_recall"] = float(np.mean(recalls))
    nll = [n.teacher_forced_nll for n in new if n.teacher_forced_nll is not None]
    if nll:
        out["teacher_forced_nll"] = float(np.mean(nll))
    ipr = [n.delta_ipr for n in new if n.delta_ipr is not None]
    if ipr:
        out["delta_ipr"] = float(np.mean(ipr))
    return out
