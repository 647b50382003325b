"""`none`: the unpruned baseline. Every visual token is kept."""

from __future__ import annotations

from dataclasses import dataclass

from . import register


@register("none")
@dataclass
class NoPruning:
    """Keep every visual token. The reference every other method is compared with."""

    #: whether the method takes a token budget (the runner ignores ``--budgets`` when it does not)
    uses_budget = False  # class attribute, not a dataclass field
