"""`divprune`: keep a maximally diverse subset (DivPrune, arXiv 2503.02175; github.com/vbdi/divprune).

Distances D = 1 - cosine similarity between projector outputs. Greedy max-min diversity: the first
token is the one farthest from its nearest other token; then, repeatedly, the token whose distance
to the selected set (its nearest selected token) is largest. Kept indices sorted. Text-agnostic,
pre-LLM, positions renumbered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register
from .base import Method, Selection, VisualContext


def greedy_max_min(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices in the order the greedy max-min rule picks them (the first k)."""
    x = F.normalize(features.float(), dim=-1)
    dist = 1 - x @ x.T
    n = dist.shape[0]
    off_diagonal = dist + torch.eye(n) * torch.finfo(dist.dtype).max
    first = int(off_diagonal.min(dim=1).values.argmax())
    picked = [first]
    to_set = dist[first].clone()  # each token's distance to its nearest selected token
    to_set[first] = -1
    for _ in range(k - 1):
        nxt = int(to_set.argmax())
        picked.append(nxt)
        to_set = torch.minimum(to_set, dist[nxt])  # picked tokens stay at -1: distances are >= 0
        to_set[nxt] = -1
    return torch.tensor(picked, dtype=torch.long)


@register("divprune")
@dataclass
class DivPrune(Method):
    def select(self, ctx: VisualContext, k: int) -> Selection:
        return Selection(greedy_max_min(ctx.features, k).sort().values)
