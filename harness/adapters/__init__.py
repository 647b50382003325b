"""Model adapters: where visual tokens are removed. One module per model family."""

from .checks import NonFiniteFeatures
from .llava import PruningRun, prune

__all__ = ["NonFiniteFeatures", "PruningRun", "prune"]
