"""`none`: the unpruned baseline. Every visual token is kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import register
from .base import Method, Selection, VisualContext


@register("none")
@dataclass
class NoPruning(Method):
    """Keep every visual token. The reference every other method is compared with."""

    position_policy: str = field(default="renumber", repr=False)  # nothing moves

    uses_budget = False

    def select(self, ctx: VisualContext, k: int) -> Selection:
        return Selection(torch.arange(ctx.num_tokens))
