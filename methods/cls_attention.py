"""`cls_attention`: VisionZip-style dominant + contextual tokens (arXiv 2412.04467;
github.com/dvlab-research/VisionZip). Pre-LLM, text-agnostic.

- Dominant tokens: the highest [CLS]->patch attention in the ViT's feature layer (the penultimate
  one for LLaVA), summed over heads.
- Contextual tokens: of the remaining tokens, `contextual` targets spread evenly through them (in
  index order); every other remaining token is merged into the target whose feature-layer key is
  most similar (cosine), and each target becomes the mean of its group. VisionZip merges the ViT
  features and then projects them; so does this, through the model's own projector.
- Budget split: VisionZip's default is 54 dominant + 10 contextual = 64; other budgets keep that
  ratio (`contextual_share` = 10/64), rounded.
Each kept token stays at its own position in raster order (the merged ones at their target's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register
from .base import Method, Selection, VisualContext, check_range, top_k


@register("cls_attention")
@dataclass
class ClsAttention(Method):
    """Keeps k tokens, VisionZip-style: the dominant ones with the highest [CLS]->patch attention
    (ViT feature layer, summed over heads), and contextual targets spread evenly through the rest,
    each replaced by the projected mean of the tokens merged into it (most similar key). Pre-LLM,
    text-agnostic.

    Parameters:
        contextual_share (10/64): the contextual part of the budget, rounded: VisionZip's default
            54 dominant + 10 contextual = 64, kept as a ratio for other budgets.
    Source: VisionZip, arXiv 2412.04467; github.com/dvlab-research/VisionZip.
    Positions: `renumber` (the harness's default for tokens removed before the LLM); kept tokens
    in raster order, a merged one at its target's place.
    """

    contextual_share: float = 10 / 64

    def __post_init__(self):
        super().__post_init__()
        check_range("contextual_share", self.contextual_share, 0.0, 1.0)

    def score(self, ctx: VisualContext) -> torch.Tensor:
        if ctx.cls_attention is None:
            raise ValueError("cls_attention needs the ViT's [CLS] attention; this model's adapter gives none")
        return ctx.cls_attention()

    def select(self, ctx: VisualContext, k: int) -> Selection:
        contextual = min(round(k * self.contextual_share), k - 1) if k > 1 else 0
        dominant = k - contextual
        scores = self.score(ctx).float()
        dom = top_k(scores, dominant)
        is_rest = torch.ones_like(scores, dtype=torch.bool)
        is_rest[dom] = False
        rest = is_rest.nonzero().flatten()  # ascending
        if contextual == 0 or len(rest) == 0:
            return Selection(dom)
        if ctx.vision_features is None or ctx.project is None or ctx.vision_keys is None:
            raise ValueError("cls_attention's contextual tokens need the ViT features, keys and projector")
        step = len(rest) / contextual
        targets = rest[(torch.arange(contextual) * step).long()]
        at_targets = torch.searchsorted(rest, targets)  # where the targets sit in `rest`
        keys = F.normalize(ctx.vision_keys()[rest].float(), dim=-1)
        group = (keys @ keys[at_targets].T).argmax(dim=1)  # (len(rest),)
        group[at_targets] = torch.arange(contextual)  # a target is its own group
        vis = ctx.vision_features[rest].float()
        merged = torch.zeros(contextual, vis.shape[1]).index_add_(0, group, vis)
        sizes = torch.bincount(group, minlength=contextual)
        merged /= sizes.clamp(min=1)[:, None].float()
        projected = ctx.project(merged.to(ctx.vision_features.dtype)).to(ctx.features.dtype)
        # A target that absorbed nothing keeps its own projector output (bit for bit).
        projected = torch.where((sizes == 1)[:, None], ctx.features[targets], projected)
        kept = torch.cat([dom, targets])
        features = torch.cat([ctx.features[dom], projected])
        order = kept.argsort()
        return Selection(kept[order], features[order], extra={"dominant": dominant, "contextual": contextual})
