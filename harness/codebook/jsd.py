"""Jensen-Shannon divergence between two next-token distributions given as logits.

`jsd_official` is the release's form (METHODS.md §1.2), which its thresholds assume: restrict both
logit vectors to the reference run's top-`topk` tokens, softmax each (P, Q), M = (P + Q)/2, and
return ½·[mean_i M_i(log M_i − log P_i) + mean_i M_i(log M_i − log Q_i)]: KL(M‖P) and KL(M‖Q) (the
direction `F.kl_div(log P, M)` computes, the reverse of the textbook's), each divided by `topk`.
`jsd_textbook` is ½KL(P‖M) + ½KL(Q‖M) over the whole vocabulary, in nats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl_to_mixture(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise M·(log M − log P) and M·(log M − log Q), M = (P + Q) / 2."""
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0, dtype=log_p.dtype))
    m = log_m.exp()
    return m * (log_m - log_p), m * (log_m - log_q)


def jsd_official(reference: torch.Tensor, ablated: torch.Tensor, topk: int = 10) -> torch.Tensor:
    """(..., V) logits -> (...) divergence, the release's top-k, mean-reduced form."""
    index = reference.topk(topk, dim=-1).indices
    log_p = F.log_softmax(reference.float().gather(-1, index), dim=-1)
    log_q = F.log_softmax(ablated.float().gather(-1, index), dim=-1)
    a, b = _kl_to_mixture(log_p, log_q)
    return 0.5 * (a.mean(-1) + b.mean(-1))


def jsd_textbook(reference: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) JSD(P, Q) = ½KL(P‖M) + ½KL(Q‖M) over the whole vocabulary, in nats."""
    log_p = F.log_softmax(reference.float(), dim=-1)
    log_q = F.log_softmax(ablated.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))


def p_max(logits: torch.Tensor, topk: int = 50) -> torch.Tensor:
    """(..., V) -> (...): the largest probability after a softmax over the top-`topk` logits."""
    return F.softmax(logits.float().topk(topk, dim=-1).values, dim=-1)[..., 0]
