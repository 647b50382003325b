"""Model adapters: where visual tokens are removed. One module per model family, chosen by the
checkpoint config's `model_type` (`FAMILIES`); `prune(model, method, budget)` dispatches to it.

Adding a family: a module here with a `prune` context manager (hooks only; see llava.py for the
contract its tests hold) and an entry in `FAMILIES`.
"""

from harness.errors import InputError

from . import llava
from .checks import NonFiniteFeatures
from .llava import PruningRun

#: model_type (config.json) -> the adapter module of that family.
FAMILIES = {"llava": llava}


class UnsupportedModel(InputError):
    """A model of a family no adapter handles."""


def adapter_for(model):
    """The adapter module of `model`'s family (by `model.config.model_type`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"no adapter for model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def prune(model, method, budget=None, record_ipr: bool = True, **params):
    """Apply `method` (a registered name with `params`, or an instance) at `budget` to `model` for the
    duration of a `with` block, through its family's adapter (hooks only; the model is unchanged after)."""
    return adapter_for(model).prune(model, method, budget, record_ipr=record_ipr, **params)


__all__ = ["FAMILIES", "NonFiniteFeatures", "PruningRun", "UnsupportedModel", "adapter_for", "prune"]
