"""Model adapters: where visual tokens are removed. One module per model family."""

from .llava import PruningRun, prune

__all__ = ["PruningRun", "prune"]
