"""`divprune`: keep a maximally diverse subset (DivPrune, arXiv 2503.02175; github.com/vbdi/divprune).

Distances D = 1 - cosine similarity between projector outputs. Greedy max-min diversity: the first
token is the one farthest from its nearest other token; then, repeatedly, the token whose distance
to the selected set (its nearest selected token) is largest. Kept indices sorted. Text-agnostic,
pre-LLM, positions renumbered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import register
from .base import Method, Selection, VisualContext


def greedy_max_min(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices in the order the greedy max-min rule picks them (the first k; none for k <= 0)."""
    if k <= 0 or features.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    x = F.normalize(features.float(), dim=-1)
    dist = (x @ x.T).cpu().numpy()
    np.subtract(1, dist, out=dist)  # in place: the N x N product is most of the cost already
    n = dist.shape[0]
    # The diagonal is never read again (a picked token's own entry is overwritten below).
    np.fill_diagonal(dist, np.inf)
    first = int(dist.min(axis=1).argmax())  # the token farthest from its nearest other token
    # The loop is k small steps over N values: numpy's per-call cost is a fraction of torch's, and
    # argmax takes the first maximum in both, so the picks are the same.
    picked = np.empty(k, dtype=np.int64)
    picked[0] = first
    to_set = dist[first].copy()  # each token's distance to its nearest selected token
    to_set[first] = -1
    for step in range(1, min(k, n)):
        nxt = to_set.argmax()
        picked[step] = nxt
        np.minimum(to_set, dist[nxt], out=to_set)  # picked tokens stay at -1: distances are >= 0
        to_set[nxt] = -1
    return torch.from_numpy(picked[:min(k, n)]).to(features.device)


@register("divprune")
@dataclass
class DivPrune(Method):
    """Keeps a maximally diverse k tokens: greedy max-min over D = 1 - cosine of the projector
    outputs (`greedy_max_min`), sorted. Pre-LLM, text-agnostic.

    Parameters: none besides the budget.
    Source: DivPrune, arXiv 2503.02175; github.com/vbdi/divprune.
    Positions: `renumber` (the harness's default for tokens removed before the LLM).
    """

    def select(self, ctx: VisualContext, k: int) -> Selection:
        return Selection(greedy_max_min(ctx.features, k).sort().values)
