"""`none`: the unpruned baseline. Every visual token is kept."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import register
from .base import Method, Selection, VisualContext


@register("none")
@dataclass
class NoPruning(Method):
    """Keeps every visual token: the reference every other method is compared with.

    Parameters: none. `uses_budget` is False: the runner runs it once, whatever the budgets.
    Source: none (the unpruned model).
    Positions: `renumber`, left out of the repr: nothing is removed, so no position changes.
    """

    position_policy: str = field(default="renumber", repr=False)  # nothing moves

    uses_budget = False

    def select(self, ctx: VisualContext, k: int) -> Selection:
        return Selection(torch.arange(ctx.num_tokens))
