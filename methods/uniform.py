"""`uniform`: keep tokens on an even spatial lattice over the grid (a stride in both directions).

For k tokens on an h x w grid: a lattice of r rows and c = ceil(k / r) columns with r chosen so the
cells are as square as possible; each lattice point keeps the token under its cell centre, and the
first k in raster order are kept. Text-agnostic and content-agnostic: the spatial sanity floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import register
from .base import Method, Selection, VisualContext


def lattice(h: int, w: int, k: int) -> torch.Tensor:
    """Raster indices of k tokens spread evenly over an h x w grid (ascending, distinct)."""
    rows = max(1, min(h, round(math.sqrt(k * h / w))))
    while True:
        cols = min(w, math.ceil(k / rows))
        if rows * cols >= k:
            break
        rows += 1  # cols hit the grid width: add rows
    ys = ((torch.arange(rows) + 0.5) * h / rows).long()
    xs = ((torch.arange(cols) + 0.5) * w / cols).long()
    points = (ys[:, None] * w + xs[None, :]).flatten()
    return points[:k].sort().values


@register("uniform")
@dataclass
class UniformPruning(Method):
    """Keeps k tokens on an even spatial lattice over the h x w grid (`lattice`). Pre-LLM, text- and
    content-agnostic.

    Parameters: none besides the budget.
    Source: the spatial sanity floor of METHODS.md §5 (a stride to the same budget; no one paper).
    Positions: `renumber` (the harness's default for tokens removed before the LLM).
    """

    def select(self, ctx: VisualContext, k: int) -> Selection:
        h, w = ctx.grid
        return Selection(lattice(h, w, k))
