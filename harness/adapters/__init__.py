"""Model adapters: where visual tokens are removed. One module per model family, chosen by the
checkpoint config's `model_type` (`FAMILIES`); `prune(model, method, budget)` dispatches to it.

Adding a family: a module here whose `PruningRun` subclasses `base.PruningRun` (hooks only; it says
where the family's visual tokens sit and what its vision tower knows) and an entry in `FAMILIES`.
"""

import contextlib

from harness.budget import BUDGET_SCOPES, DEFAULT_BUDGET_SCOPE
from harness.errors import InputError

from . import llava, llava_next, llava_onevision, qwen2_vl
from .base import PruningRun
from .checks import NonFiniteFeatures

#: model_type (config.json) -> the adapter module of that family.
FAMILIES = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_vl,
            "llava_onevision": llava_onevision}


class UnsupportedModel(InputError):
    """A model of a family no adapter handles."""


def adapter_for(model):
    """The adapter module of `model`'s family (by `model.config.model_type`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"no adapter for model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


@contextlib.contextmanager
def prune(model, method, budget=None, record_ipr: bool = True, budget_scope: str = DEFAULT_BUDGET_SCOPE,
          **params):
    """Apply `method` (a registered name with `params`, or an instance) at `budget` to `model` for the
    duration of a `with` block, through its family's adapter (hooks only; the model is unchanged after).
    `budget_scope`: how a budget applies to an image of several parts (`BUDGET_SCOPES`)."""
    with adapter_for(model).PruningRun(model, method, budget, record_ipr=record_ipr, budget_scope=budget_scope,
                                       **params) as run:
        yield run


__all__ = ["BUDGET_SCOPES", "FAMILIES", "NonFiniteFeatures", "PruningRun", "UnsupportedModel", "adapter_for",
           "prune"]
