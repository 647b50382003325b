"""`lofi`: keep the tokens with the highest rank-k SVD leverage scores (LoFi, Sun et al., "Silent
Hazards of Token Reduction in Vision-Language Models: The Hidden Impact on Consistency",
arXiv 2503.06794; no public code). METHODS.md §3.

Thin SVD of the visual tokens H = U S V^T (N, D); the rank-k leverage of token i is
l_i = sum_{j<=k} U_ij^2 (they sum to k); keep the top-m, sorted, m being the harness's budget.
Pre-LLM, text-agnostic.

Every choice below is open (the paper body was not reachable); all but the feature space are fields:
- Feature space: the projector outputs, the tensor the LLM receives (the only one available before
  the LLM; a shallow LLM layer's hidden states would need an in-LLM stage).
- `rank`: "energy" (default): the smallest k whose sigma^2 share reaches `energy` (0.9), the
  standard rule; an integer k; or "budget": k = m. k never exceeds the numerical rank of H
  (sigma^2 above max(N, D) * eps64 * sigma_max^2): the singular vectors of zero singular values are
  arbitrary, and rounding would pick among them. When k reaches N (N <= D) every leverage is 1
  and the choice is left to rounding: a property of the score, which the energy rule avoids.
- `center` (default False): H as the LLM receives it; True subtracts the token mean first (the
  leverage of a centred, PCA-style subspace).
- Positions renumbered (the harness's default for tokens removed before the LLM; the paper's is unknown).
- Computed in float64 whatever the features' dtype (see `leverage_scores`), so a token's score
  does not depend on its batch.
Each image's k is recorded as `extra["lofi_rank"]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Selection, VisualContext, check_range, top_k

RANK_RULES = ("energy", "budget")


def leverage_scores(H: torch.Tensor, rank: str | int = "energy", energy: float = 0.9, center: bool = False):
    """((N,) rank-k leverage scores (float64), k) of the rows of H; `rank` is "energy" or an integer k."""
    x = H.double()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    # The thin SVD through the Gram matrix of the smaller side: its eigenvalues are sigma^2, its
    # eigenvectors U (or V). In float64 the squared condition number costs nothing the float32
    # features could resolve, and at N = 576, D = 4096 this is ~7x faster than a float32 SVD.
    lam, vec = torch.linalg.eigh(x @ x.T if d >= n else x.T @ x)
    lam, vec = lam.flip(0).clamp(min=0), vec.flip(1)  # descending
    # Eigenvalues below the Gram's rounding (numpy's matrix_rank rule, on sigma^2) are zero.
    numerical_rank = int((lam > lam[0] * max(n, d) * torch.finfo(lam.dtype).eps).sum()) if len(lam) else 0
    if rank == "energy":
        share = lam.cumsum(0)
        share /= share[-1].clamp(min=torch.finfo(share.dtype).tiny)
        # The first k whose cumulative share reaches `energy`; rounding may leave the last share just
        # below 1, which the clamp to the numerical rank absorbs.
        k = int(torch.searchsorted(share, torch.tensor([energy], dtype=share.dtype, device=share.device))) + 1
    else:
        k = int(rank)
    k = min(k, numerical_rank)
    u = vec[:, :k] if d >= n else (x @ vec[:, :k]) / lam[:k].sqrt()  # U = H V / sigma
    return (u ** 2).sum(dim=1), k


@register("lofi")
@dataclass
class LoFi(Method):
    """Keeps the m tokens with the highest rank-k SVD leverage scores of the projector outputs
    (`leverage_scores`), sorted; each image's k is recorded as `extra["lofi_rank"]`. Pre-LLM,
    text-agnostic.

    Parameters (open choices: the paper body was not reachable):
        rank ("energy"): "energy", the smallest k whose sigma^2 share reaches `energy` (the standard
            rule); an integer k; or "budget", k = m. Never above H's numerical rank.
        energy (0.9): the sigma^2 share the energy rule must reach, in (0, 1].
        center (False): H as the LLM receives it; True subtracts the token mean first.
    Source: LoFi, Sun et al., "Silent Hazards of Token Reduction in Vision-Language Models",
        arXiv 2503.06794; no public code. METHODS.md §3.
    Positions: `renumber` (the harness's default for tokens removed before the LLM; the paper's is
    unknown).
    """

    rank: str | int = "energy"
    energy: float = 0.9
    center: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rank, str):
            if self.rank not in RANK_RULES:
                raise ValueError(f"rank must be 'energy', 'budget' or a positive integer, got {self.rank!r}")
        elif isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be 'energy', 'budget' or a positive integer, got {self.rank!r}")
        check_range("energy", self.energy)  # a number
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1] (the share of sum sigma^2 the top-k singular values "
                             f"must reach), got {self.energy!r}")
        if not isinstance(self.center, bool):
            raise ValueError(f"center must be True or False, got {self.center!r}")

    def select(self, ctx: VisualContext, k: int) -> Selection:
        # Not score(): with rank="budget" the score depends on the budget.
        scores, rank = leverage_scores(ctx.features, k if self.rank == "budget" else self.rank, self.energy,
                                       self.center)
        return Selection(top_k(scores, k), extra={"lofi_rank": rank})
