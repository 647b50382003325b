"""`codebook` and `codebook_fixed`: drop the visual tokens that resemble a redundant prototype
(METHODS.md §1.4; "Beyond Intermediate States", arXiv 2503.20540; github.com/DingchenYang99/RedundancyCodebook).

Redundancy of token l: s_l = max_n cos(x_l, c_n) over the codebook's prototypes c_n, on the
projector outputs. Pre-LLM, text-agnostic, positions renumbered. Built by `harness codebook build`
(harness/codebook/); the default is the testbed's codebook.

- `codebook` (the official mode): keep every token with s_l < tau; how many is decided per image.
  `tau=None` takes the tau recorded with the codebook's build, else the LLaVA-1.5 release's 0.45.
  If no token is below tau, the least redundant one is kept (an image never vanishes).
- `codebook_fixed` (the release's `fix_num`): keep the k tokens with the smallest s_l, sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from . import codebook_files as files
from . import register
from .base import Method, Selection, VisualContext, check_range

RELEASE_TAU = 0.45  # LLaVA-1.5-7B
_CACHE: dict = {}


def prototypes(path: str) -> torch.Tensor:
    """The L2-normalised prototypes of the codebook at `path` (loaded once per file version)."""
    resolved = files.resolve(path)
    stamp = (str(resolved), resolved.stat().st_mtime_ns if resolved.is_file() else None)
    if stamp not in _CACHE:
        _CACHE[stamp] = F.normalize(files.load(resolved), dim=-1)
    return _CACHE[stamp]


@dataclass
class _CodebookBase(Method):
    """What `codebook` and `codebook_fixed` share: a token's redundancy s_l against a codebook.

    Parameters:
        path (the testbed's codebook, built by `harness codebook build`): a codebook file, ours or
            a released .pt; it must be in this model's projector space (`validate` checks its width).
    """

    path: str = files.TESTBED_CODEBOOK

    def validate(self, model_config) -> None:
        files.check_hidden(prototypes(self.path), model_config.text_config.hidden_size, self.path)

    def files(self) -> list:
        return [files.resolve(self.path)]

    def redundancy(self, ctx: VisualContext) -> torch.Tensor:
        """(N,) s_l, the largest cosine similarity to a prototype."""
        codes = prototypes(self.path)
        files.check_hidden(codes, ctx.features.shape[1], self.path)  # also for select() outside the adapter
        x = F.normalize(ctx.features.float(), dim=-1)
        return (x @ codes.to(x.device).T).max(dim=1).values

    def score(self, ctx: VisualContext) -> torch.Tensor:
        return -self.redundancy(ctx)


@register("codebook")
@dataclass
class Codebook(_CodebookBase):
    """Keeps every token whose redundancy s_l is below tau (the release's default mode): how many
    is decided per image (`adaptive`; no budget), and at least the least redundant one, so an image
    never vanishes. Pre-LLM, text-agnostic.

    Parameters:
        path: the codebook (`_CodebookBase`).
        tau (None): None takes the tau recorded with the codebook's build, else the LLaVA-1.5
            release's 0.45 (a threshold belongs to its model: LLaVA-NeXT-8B's is 0.11).
    Source: "Beyond Intermediate States", Yang et al., arXiv 2503.20540;
        github.com/DingchenYang99/RedundancyCodebook (2a24172). METHODS.md §1.4.
    Positions: `renumber` (as the release: tokens removed before the LLM, renumbered contiguously).
    """

    tau: Optional[float] = None

    uses_budget: ClassVar[bool] = False
    adaptive: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.tau is not None:
            check_range("tau", self.tau, -1.0, 1.0)

    def threshold(self) -> float:
        if self.tau is not None:
            return float(self.tau)
        return float(files.build_record(self.path).get("tau", RELEASE_TAU))

    def select(self, ctx: VisualContext, k: int) -> Selection:
        s = self.redundancy(ctx)
        kept = torch.nonzero(s < self.threshold()).flatten()
        if len(kept) == 0:
            kept = s.argmin().reshape(1)
        return Selection(kept, extra={"kept": len(kept)})


@register("codebook_fixed")
@dataclass
class CodebookFixed(_CodebookBase):
    """Keeps the k least redundant tokens (the default top-k of -s_l), sorted: the release's
    `fix_num` mode, under the harness's budget. Pre-LLM, text-agnostic.

    Parameters: path, the codebook (`_CodebookBase`).
    Source: as `codebook` (arXiv 2503.20540; github.com/DingchenYang99/RedundancyCodebook, 2a24172).
    Positions: `renumber`, as `codebook`.
    """
