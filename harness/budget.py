"""Token budgets: visual tokens kept per image (the literature's 192 / 128 / 64 of 576) or a ratio.

An integer is tokens kept per image; a float in (0, 1] is the fraction kept (rounded, at least one).
"""

from __future__ import annotations

FULL = "full"  # the budget label of methods that keep every token
ADAPTIVE = "adaptive"  # ... and of methods that decide per image how many (thresholds)


def check_budget(budget, tokens_per_image: int | None = None):
    """The budget unchanged, or a ValueError saying what is wrong and what is accepted."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an integer (tokens kept per image) or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ValueError(f"a fractional budget must be in (0, 1], got {budget}; integers are tokens kept per image")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"budget must keep at least one token per image, got {budget}")
        if tokens_per_image is not None and budget > tokens_per_image:
            raise ValueError(f"budget {budget} is above the {tokens_per_image} visual tokens of an image; "
                             f"accepted: 1..{tokens_per_image} or a fraction in (0, 1]")
    return budget


def tokens_to_keep(budget, tokens_per_image: int) -> int:
    """Tokens kept of one image of `tokens_per_image` tokens under `budget` (None keeps all)."""
    check_budget(budget, tokens_per_image)
    if budget is None:
        return tokens_per_image
    if isinstance(budget, float):
        return max(1, min(tokens_per_image, round(budget * tokens_per_image)))
    return budget


def budget_label(budget, adaptive: bool = False) -> str:
    """The budget as results name it: the number kept, `full` for the unpruned reference, `adaptive`
    for methods that decide per image."""
    if budget is not None:
        return str(budget)
    return ADAPTIVE if adaptive else FULL
