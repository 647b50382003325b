"""`gprune`: keep the tokens that collect the most information after propagation on a similarity graph
(G-Prune, Jiang et al., AAAI 2025, arXiv 2501.02268; github.com/jytmelon/G-Prune at 762c637,
`LLaVA-NeXT/llava/model/llava_arch.py`). METHODS.md §2.

On the projector outputs X (N, D) of one image:
  S = cos(x_i, x_j) (self-loops included); entries below `threshold` are not edges; edges get S / T,
  non-edges -5000; A = softmax_row(S); deg_i = edges of i (self included); w_i = ||x_i||_2;
  r = (w A^hops) / deg; keep the top-k r, sorted. Pre-LLM, text-agnostic, original position ids kept
  (as the official code does).

Choices where the release is silent or does not carry over:
- Budget: the harness's. A fractional budget is G-Prune's `keep_ratio` (0.5 in the release), so no
  separate field. The release truncates (`int(0.5 * 576)`), the harness rounds: the same for 0.5 x 576.
- One graph per image context. The release builds two (LLaVA-NeXT's base view, and its unpadded
  high-res crops with the row-end newline tokens left out of the graph and always kept); a
  single-view LLaVA-1.5 image is the base-view graph.
- Edges: the release zeroes S < threshold, divides by T and marks |S| < 1e-6 as non-edges; for a
  threshold > 0 (required here) and any T < 1e6 x threshold that is exactly cos < threshold, the
  rule used here.
- Degree: the release counts A > 0 after the softmax, i.e. the edges unless an edge's probability
  underflows (it can in fp16, LLaVA's usual inference dtype: exp(-(1 - 0.5) / 0.03) = 5.8e-8 is at
  fp16's smallest subnormal); here the edges are counted directly, as METHODS.md defines deg. A token with
  no edge at all (only a zero vector: no self-loop) gets deg 1; its score is 0 either way.
- Propagation: `hops` vector-matrix products (O(hops N^2)) instead of the release's
  `matrix_power` (O(N^3)); equal up to rounding (tested).
- Precision: float32 whatever the features' dtype (the release computes in the model's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register
from .base import Method, VisualContext, check_range

#: The logit of a non-edge (the release's): far below every edge's (>= threshold / T > 0), so its
#: softmax probability is exactly 0 in float32.
NON_EDGE = -5000.0


def graph(features: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03):
    """(A, deg): the row-softmax transition matrix (N, N) and each token's edge count (N,), float32."""
    x = F.normalize(features.float(), dim=-1)
    sim = x @ x.T
    edge = sim >= threshold
    # In place: the N x N product is the cost that matters; softmax then reads one buffer.
    sim.div_(temperature).masked_fill_(~edge, NON_EDGE)
    return torch.softmax(sim, dim=1), edge.sum(dim=1)


def propagate(features: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03, hops: int = 5):
    """(N,) G-Prune scores r = (w A^hops) / deg with w_i = ||x_i||_2, higher = keep."""
    a, deg = graph(features, threshold, temperature)
    w = torch.linalg.vector_norm(features.float(), dim=-1)
    for _ in range(hops):  # w <- w A: what flows into each node; never form A^hops
        w = w @ a
    return w / deg.clamp(min=1)


@register("gprune")
@dataclass
class GPrune(Method):
    """Keeps the k tokens that collect the most information after `hops` steps of propagation on
    the cosine-similarity graph of the projector outputs (`propagate`), sorted. Pre-LLM,
    text-agnostic.

    Parameters (the release's values):
        threshold (0.5): the cosine from which two tokens share an edge; in (0, 1), where the
            release's edge rule and cos >= threshold agree.
        temperature (0.03): an edge's logit is cos / temperature before the row softmax; > 0.
        hops (5): propagation steps.
    A fractional budget is G-Prune's `keep_ratio` (0.5 in the release).
    Source: G-Prune, Jiang et al., AAAI 2025, arXiv 2501.02268; github.com/jytmelon/G-Prune at
        762c637, `LLaVA-NeXT/llava/model/llava_arch.py`. METHODS.md §2.
    Positions: `original` (as the official code keeps them).
    """

    position_policy: str = "original"
    threshold: float = 0.5
    temperature: float = 0.03
    hops: int = 5

    def __post_init__(self):
        super().__post_init__()
        check_range("threshold", self.threshold)  # a number
        if not 0 < self.threshold < 1:
            # 0 would make the release's |S| < 1e-6 rule and cos >= threshold disagree; 1 leaves
            # self-loops to rounding.
            raise ValueError(f"threshold must be a cosine similarity in (0, 1) (G-Prune uses 0.5), "
                             f"got {self.threshold!r}")
        check_range("temperature", self.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (G-Prune uses 0.03), got {self.temperature!r}")
        check_range("hops", self.hops, 0, integer=True)

    def score(self, ctx: VisualContext) -> torch.Tensor:
        return propagate(ctx.features, self.threshold, self.temperature, self.hops)
