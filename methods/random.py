"""`random`: keep a uniformly random subset. The sanity floor, and a strong baseline in recent
benchmarks. Seeded per image (the method's seed and a hash of the image's pixels), so a sample
keeps the same tokens whatever batch it is in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, VisualContext, check_range


@register("random")
@dataclass
class RandomPruning(Method):
    """Keeps k tokens drawn uniformly at random, per image. Pre-LLM, text- and content-agnostic.

    Parameters:
        seed (0): mixed with a hash of the image's pixels (`VisualContext.generator`), so a sample
            keeps the same tokens whatever batch it is in; another seed, another draw.
    Source: the sanity floor of METHODS.md §5 (no one paper; a strong baseline in recent benchmarks).
    Positions: `renumber` (the harness's default for tokens removed before the LLM).
    """

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_range("seed", self.seed, 0, integer=True)

    def score(self, ctx: VisualContext) -> torch.Tensor:
        return torch.rand(ctx.num_tokens, generator=ctx.generator(self.seed))
