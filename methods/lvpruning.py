"""`lvpruning`: trained decision modules inside the LLM drop the vision tokens the prompt's text does not
need, in several stages (LVPruning, "An Effective yet Simple Language-Guided Vision Token Pruning Approach
for MLLMs", Findings of NAACL 2025, arXiv 2501.13652; no public code; METHODS.md §4).

LLaVA-1.5-7B frozen; a module after LLaMA layers 1, 8 and 16 of 32 scores the vision tokens still present
(cross-attention to the text tokens, `lvpruning_modules.DecisionModule`); each stage keeps the best-scored
share and removes the rest by indexing, so later layers (and their KV cache) see fewer tokens. Modules are
trained by `harness lvpruning train` (harness/lvpruning/); the default file is the testbed's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import lvpruning_modules as files
from . import register
from .base import Method, VisualContext, check_choice

#: How a final budget sets each stage's count (`LVPruning.schedule`).
SCHEDULES = ("shift", "scale")
_CACHE: dict = {}


def modules(path: str, device=None):
    """The module file at `path` (loaded once per file version): (modules on `device`, metadata)."""
    resolved = files.resolve(path)
    stamp = (str(resolved), resolved.stat().st_mtime_ns if resolved.is_file() else None)
    if stamp not in _CACHE:
        _CACHE[stamp] = {"meta": None, "devices": {}}
        try:
            mods, _CACHE[stamp]["meta"] = files.load(resolved)
        except Exception:
            del _CACHE[stamp]
            raise
        _CACHE[stamp]["devices"][torch.device("cpu")] = mods
    entry = _CACHE[stamp]
    device = torch.device("cpu" if device is None else device)
    if device not in entry["devices"]:
        entry["devices"][device] = copy.deepcopy(entry["devices"][torch.device("cpu")]).to(device)
    return entry["devices"][device], entry["meta"]


@register("lvpruning")
@dataclass
class LVPruning(Method):
    """Multi-stage, in-LLM, language-guided: before each decoder layer K_s of the module file, its module
    scores the image's vision tokens still present against the prompt's text (hidden states entering
    K_s) and the stage keeps the top-scored ones; the last stage keeps the budget.

    Parameters:
        path (the testbed's modules): a module file from `harness lvpruning train`; its modules belong to one
            model (`validate` checks the width and the decoder depth) and say which layers they prune before.
        schedule ("shift"): how a final budget of k of an image's N tokens sets the stages' counts, from the
            keep-ratio targets t_s the modules were trained with (the paper's [rho, rho-0.2, rho-0.4]):
            "shift" keeps k + (t_s - t_last) * N after stage s, which is how the paper evaluates rho = 0.6,
            0.5, 0.45 without retraining (targets moved together, gaps of 0.2 N kept); "scale" keeps
            k * t_s / t_last (the same proportions between stages at every budget). Counts are capped at N.
    The score is the keep log-probability (log-softmax of the two logits; the paper's "keep logit", read
    as DynamicViT's keep score). Source: arXiv 2501.13652 (no public code).
    Positions: `original` (surviving tokens keep their original positions, as in the paper).
    """

    position_policy: str = "original"
    path: str = files.TESTBED_MODULES
    schedule: str = "shift"

    stage: ClassVar[str] = "in_llm"

    def __post_init__(self):
        super().__post_init__()
        check_choice("schedule", self.schedule, SCHEDULES)

    def _meta(self) -> dict:
        return modules(self.path)[1]

    def validate(self, model_config) -> None:
        files.check_model(self._meta(), model_config, self.path)
        super().validate(model_config)

    def files(self) -> list:
        return [files.resolve(self.path)]

    def stage_layers(self) -> tuple:
        return tuple(self._meta()["layers"])

    def stage_counts(self, n: int, k: int) -> list[int]:
        targets = self._meta()["targets"]
        if self.schedule == "shift":
            counts = [k + round((t - targets[-1]) * n) for t in targets]
        else:
            counts = [round(k * t / targets[-1]) if targets[-1] > 0 else n for t in targets]
        return [min(n, max(k, c)) for c in counts[:-1]] + [k]

    def score(self, ctx: VisualContext) -> torch.Tensor:
        if ctx.text_features is None or len(ctx.text_features) == 0:
            raise ValueError("lvpruning needs the prompt's text tokens (VisualContext.text_features)")
        mods, meta = modules(self.path, ctx.features.device)
        if ctx.features.shape[-1] != meta["hidden"]:
            raise files.ModuleFileError(f"LVPruning module file {self.path} has width {meta['hidden']}, the features "
                                        f"{ctx.features.shape[-1]}")
        logits = mods[ctx.stage](ctx.features.float()[None], ctx.text_features.float()[None])[0]
        return torch.log_softmax(logits.float(), dim=-1)[:, 0]
