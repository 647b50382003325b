"""`fastv`: drop the image tokens the last token attends to least, inside the LLM
(FastV, arXiv 2403.06764; github.com/pkunlp-icler/FastV).

Layers 0..K-1 see every token. At layer K-1 the attention of the last token (head-averaged) over the
image tokens scores them; before layer K the lowest-scored ones are dropped. Faithful defaults:
K = 2, original position ids kept. The budget is tokens kept per image (FastV's R = 0.5 is budget
0.5). The adapter computes that single attention row from layer K-1's queries and keys, so the
model keeps its SDPA/flash attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, VisualContext, check_range


@register("fastv")
@dataclass
class FastV(Method):
    """Keeps, from decoder layer K on, the k image tokens the last token attends to most at layer
    K-1 (head-averaged); layers 0..K-1 see every token. In-LLM.

    Parameters:
        layer (2): K, FastV's default; `validate` requires 1..(decoder layers - 1).
    The budget is tokens kept per image: FastV's R = 0.5 is budget 0.5.
    Source: FastV, arXiv 2403.06764; github.com/pkunlp-icler/FastV.
    Positions: `original` (FastV keeps the kept tokens' original position ids).
    """

    position_policy: str = "original"
    layer: int = 2

    stage = "in_llm"
    needs_attention_row = True

    def __post_init__(self):
        super().__post_init__()
        check_range("layer", self.layer, 1, integer=True)

    def score(self, ctx: VisualContext) -> torch.Tensor:
        if ctx.attention_row is None:
            raise ValueError("fastv needs the last token's attention row at layer K-1")
        return ctx.attention_row
