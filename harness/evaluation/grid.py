"""The grid of a run: methods with their parameters, budgets and tasks, parsed and checked before any
work (what no model accepts when read; what this model cannot take right after it loads).

Tasks are the testbed's (our tasks/ folder) and lmms-eval's own by name: the standard ones in
`STANDARD_TASKS` index only their folder; any other lmms-eval task, group or tag, the folders whose YAML names
it (all of lmms-eval's where that is not enough). Offline, a task whose Hugging Face dataset is not in the
local datasets cache stops the run before the model loads, in one line saying what to download and how
(`check_task_data`).
"""

from __future__ import annotations

from harness.budget import BudgetError, check_budget, for_method
from harness.budget import budget_label as label_budget
from harness.budget import parse_budgets as parse_budget_list
from harness.errors import InputError
from harness.protocol import DEFAULT_BUDGETS, DEFAULT_TASKS


class RunError(InputError):
    """A problem with the run's arguments or inputs, reported without a traceback."""


def parse_params(specs: list[str] | None) -> dict[str, dict]:
    """`method:key=value;key=value` strings -> {method: {key: value}}; values read as YAML scalars
    (`true`, `3`, `0.5`, `budget`). Unknown methods or parameters are refused with what exists."""
    import yaml

    import methods

    out: dict[str, dict] = {}
    for spec in specs or []:
        name, sep, body = spec.partition(":")
        name = name.strip()
        if not sep or not body.strip():
            raise RunError(f"--params {spec!r}: expected METHOD:key=value[;key=value...]")
        pairs = {}
        for item in body.split(";"):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise RunError(f"--params {spec!r}: {item!r} is not key=value")
            pairs[key.strip()] = yaml.safe_load(value.strip())
        try:
            methods.get(name, **pairs)
        except ValueError as e:
            raise RunError(f"--params {spec!r}: {e}") from None
        out.setdefault(name, {}).update(pairs)
    return out


def resolve_methods(spec: str) -> list[str]:
    """``none`` | ``all`` | ``a,b``: registered method names, validated."""
    import methods

    known = methods.names()
    spec = (spec or "").strip()
    if spec == "all":
        return known
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise RunError(f"--methods is empty; known methods: {', '.join(known)} (or 'all')")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RunError(f"unknown method(s) {', '.join(map(repr, unknown))}; "
                       f"known methods: {', '.join(known)} (or 'all')")
    return list(dict.fromkeys(names))


def parse_budgets(spec: str | None) -> list:
    """`--budgets` as a list (harness.budget.parse_budgets); what no model accepts is a RunError."""
    try:
        return parse_budget_list(spec)
    except BudgetError as e:
        raise RunError(f"--budgets: {e}") from None


def check_budgets(budgets: list, tokens_per_image: int) -> None:
    """Every budget against the loaded model's tokens per image, before the first cell."""
    for value in budgets:
        try:
            check_budget(value, tokens_per_image)
        except BudgetError as e:
            raise RunError(f"--budgets: {e}") from None


def cells(method_names: list[str], budgets: list) -> list[tuple[str, object]]:
    """(method, budget) pairs: methods without a budget get one unpruned cell (budget None);
    the others one per budget (`DEFAULT_BUDGETS` when none are given)."""
    import methods

    out = []
    for name in method_names:
        method = methods.get(name)
        out += list(dict.fromkeys((name, for_method(method, b)) for b in (budgets or DEFAULT_BUDGETS)))
    return out


def resolve_tasks(spec: str | None) -> list[str]:
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    return names or list(DEFAULT_TASKS)


def budget_label(budget, method: str | None = None) -> str:
    """The budget column of the registered method `method` (harness.budget.budget_label)."""
    import methods

    return label_budget(budget, method is not None and getattr(type(methods.get(method)), "adaptive", False))
