"""Visual-token pruning methods and their registry.

A method is a ``@dataclass`` whose fields are its hyper-parameters (validated in ``__post_init__``),
registered under a short name with ``@register("name")``. It decides *which* visual tokens to keep;
it never touches a model's forward (that is the adapters' job, in ``harness/``). Its dataclass
``repr`` is its provenance.

    >>> import methods
    >>> methods.names()
    ['none', 'random', 'uniform', 'fastv', 'cls_attention', 'divprune', 'codebook', 'codebook_fixed', 'gprune',
     'lofi']
    >>> methods.get("none")
    NoPruning()
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

__all__ = ["register", "names", "get", "NoPruning", "RandomPruning", "UniformPruning", "FastV", "ClsAttention",
           "DivPrune", "Codebook", "CodebookFixed", "GPrune", "LoFi"]
