"""Token budgets: visual tokens kept per image (the literature's 192 / 128 / 64 of 576) or a ratio.

An integer is tokens kept per image; a float in (0, 1] is the fraction kept (rounded, at least one).
Budgets are parsed and checked here: what no model accepts when they are read (`parse_budgets`), what
this model cannot take as soon as it is loaded (`check_budget` with its tokens per image), so a bad
budget stops a run before its first cell.
"""

from __future__ import annotations

from harness.errors import InputError

FULL = "full"  # the budget label of methods that keep every token
ADAPTIVE = "adaptive"  # ... and of methods that decide per image how many (thresholds)


class BudgetError(InputError):
    """A budget that is not a number, or that no model / this model cannot take."""


#: How a budget applies to an image of several parts (LLaVA-NeXT's base view and crops): split over them in
#: proportion to their tokens ("image"), or given to each part ("part"). Video frames always get it each.
BUDGET_SCOPES = ("image", "part")
DEFAULT_BUDGET_SCOPE = "image"


def check_scope(scope: str) -> str:
    if scope not in BUDGET_SCOPES:
        raise BudgetError(f"budget_scope {scope!r} is not one of {', '.join(BUDGET_SCOPES)}")
    return scope


def accepted(tokens_per_image: int | None = None) -> str:
    """What a budget may be, in words, for the error messages."""
    count = f"1..{tokens_per_image}" if tokens_per_image is not None else "at least 1"
    return f"accepted: an integer {count} (visual tokens kept per image) or a fraction in (0, 1]"


def check_budget(budget, tokens_per_image: int | None = None):
    """The budget unchanged, or a BudgetError naming the bad value and what is accepted."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise BudgetError(f"budget {budget!r} is not a number; {accepted(tokens_per_image)}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise BudgetError(f"budget {budget!r} is a fraction outside (0, 1] (integers are tokens kept per image); "
                          f"{accepted(tokens_per_image)}")
    if isinstance(budget, int):
        if budget <= 0:
            raise BudgetError(f"budget {budget} keeps no token; {accepted(tokens_per_image)}")
        if tokens_per_image is not None and budget > tokens_per_image:
            raise BudgetError(f"budget {budget} is above the {tokens_per_image} visual tokens of an image of this "
                              f"model; {accepted(tokens_per_image)}")
    return budget


def for_method(method, budget):
    """The budget `method` runs at: None for methods that take none (`none`, the adaptive codebook),
    so their cell is one cell whatever the budgets say; else `budget` (its callers have checked it)."""
    return budget if getattr(method, "uses_budget", True) else None


def parse_budget(budget):
    """None (keep everything: empty, ``none`` or ``full``) or a checked number: an int (tokens to keep)
    or a float (fraction to keep). Text as a user types it, or a number."""
    if budget is None or (isinstance(budget, str) and budget.strip().lower() in ("", "none", "full")):
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return check_budget(budget)
    text = str(budget).strip()
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise BudgetError(f"budget {text!r} is not a number; {accepted()}") from None
    return check_budget(value)


def parse_budgets(spec) -> list:
    """A comma list (``"192,128,0.25"``) -> the budgets in order, duplicates dropped; [] for none given."""
    if spec is None or not str(spec).strip():
        return []
    return list(dict.fromkeys(parse_budget(s) for s in str(spec).split(",") if s.strip()))


def tokens_to_keep(budget, tokens_per_image: int) -> int:
    """Tokens kept of one image of `tokens_per_image` tokens under `budget` (None keeps all). A count above
    the image's tokens keeps them all: where images differ in size (Qwen's dynamic resolution, a part of an
    image) a count is capped per image; a family of one fixed count refuses it up front (`check_budget`)."""
    check_budget(budget)
    if budget is None:
        return tokens_per_image
    if isinstance(budget, float):
        return max(1, min(tokens_per_image, round(budget * tokens_per_image)))
    return min(budget, tokens_per_image)


def budget_label(budget, adaptive: bool = False) -> str:
    """The budget as results name it: the number kept, `full` for the unpruned reference, `adaptive`
    for methods that decide per image."""
    if budget is not None:
        return str(budget)
    return ADAPTIVE if adaptive else FULL
