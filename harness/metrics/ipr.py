"""The inverse participation ratio of a set of token representations (METHODS.md section 3)."""

from __future__ import annotations

import torch


def ipr(tokens: torch.Tensor) -> float:
    """Inverse participation ratio of the singular-value spectrum of (n, D) token representations:
    p_j = s_j^2 / sum s^2, IPR = sum p_j^2 (1/r for a flat spectrum of rank r, 1 for rank one).
    Uncentred, as METHODS.md section 3 defines it (the choice is recorded there)."""
    s = torch.linalg.svdvals(tokens.detach().float())
    p = s.pow(2) / s.pow(2).sum().clamp(min=1e-30)
    return float(p.pow(2).sum())
