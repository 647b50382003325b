"""Visual-token pruning methods and their registry.

A method is a ``@dataclass`` whose fields are its hyper-parameters (validated in ``__post_init__``),
registered under a short name with ``@register("name")``. It decides *which* visual tokens to keep;
it never touches a model's forward (that is the adapters' job, in ``harness/``). Its dataclass
``repr`` is its provenance.

    >>> import methods
    >>> methods.names()
    ['none', 'random', 'uniform', 'fastv', 'cls_attention', 'divprune', 'codebook', 'codebook_fixed', 'gprune',
     'lofi', 'lvpruning']
    >>> methods.get("none")
    NoPruning()

Adding a method
---------------
One file, ``methods/<name>.py``, imported at the bottom of this one (that order is ``names()``'s),
holding one ``@register("<name>")`` ``@dataclass`` subclass of ``base.Method``:

- Fields: its hyper-parameters, defaulting to the source's values; ``__post_init__`` calls
  ``super().__post_init__()`` and rejects bad values with a clear ValueError (``base.check_range``,
  ``base.check_choice``). The class docstring says what it keeps, each field's default and why, the
  source (arXiv id; code repository and commit) and the position policy.
- Usually only ``score(ctx)``: (N,) scores, higher = keep; the default ``select`` keeps
  ``base.top_k`` of them. Write ``select(ctx, k) -> Selection`` only to choose otherwise (greedy,
  merged features, a threshold).
- ``ctx`` (``base.VisualContext``), one image: ``features`` (N, D; pre-LLM the projector outputs,
  in-LLM the hidden states entering layer K, or K-1 with ``needs_attention_row``), ``text_features`` (the
  prompt's text tokens, taken the same way), ``grid``, ``generator(seed)`` for draws seeded per
  image; where the adapter can give them, the ViT's ``vision_features``, the model's projector
  ``project``, the lazy ``cls_attention()`` and ``vision_keys()``, and in-LLM the last token's
  ``attention_row``. Raise a ValueError naming what is missing when one it needs is None.
- Class attributes: ``stage`` (``"pre_llm"``, or ``"in_llm"`` with a ``layer`` field K: pruned
  before decoder layer K; a multi-stage method overrides ``stage_layers()`` and ``stage_counts(n, k)``
  and reads ``ctx.stage``), ``needs_attention_row`` (in-LLM: scored at layer K-1's input), ``uses_budget``
  (False: run once, whatever the budgets), ``adaptive``
  (True: it decides how many to keep per image). The ``position_policy`` field (``"renumber"`` or
  ``"original"`` position ids) defaults to what the source does.
- Tests: an entry in ``tests/default_methods.py`` (the parameters the tests' tiny 2-layer model
  needs; ``{}`` when the defaults do); a registered method without one fails. ``tests/test_methods.py``
  runs every entry through the adapter's contracts: a budget of every token gives the unpruned
  outputs, the model is unchanged after the block, pruning shortens the forward, a padded batch
  equals single runs, kept indices are sorted, distinct (for score-only methods, exactly the top
  scores), and budget 0 keeps none.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    """Class decorator: register a method dataclass under ``name``."""

    def deco(cls: T) -> T:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"method {name!r}: {cls.__name__} must be a @dataclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Registered method names, in registration order (``none`` first)."""
    return list(_REGISTRY)


def get(name: str, **params):
    """An instance of the method registered as ``name``, built with ``params``.

    Raises ``ValueError`` naming the known methods (or the method's parameters) when the name or a
    parameter is unknown.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}") from None
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        accepted = ", ".join(sorted(fields)) or "none"
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)}; it accepts: {accepted}")
    return cls(**params)


# Each module registers itself (needs `register` above); `none` first, the order `names()` lists.
from .none import NoPruning  # noqa: E402
from .random import RandomPruning  # noqa: E402
from .uniform import UniformPruning  # noqa: E402
from .fastv import FastV  # noqa: E402
from .cls_attention import ClsAttention  # noqa: E402
from .divprune import DivPrune  # noqa: E402
from .codebook import Codebook, CodebookFixed  # noqa: E402
from .gprune import GPrune  # noqa: E402
from .lofi import LoFi  # noqa: E402
from .lvpruning import LVPruning  # noqa: E402

__all__ = ["register", "names", "get", "NoPruning", "RandomPruning", "UniformPruning", "FastV", "ClsAttention",
           "DivPrune", "Codebook", "CodebookFixed", "GPrune", "LoFi", "LVPruning"]
