"""Every lmms-eval 0.7.3 workaround, in one place.

Import this module before anything that imports ``lmms_eval``, ``datasets`` or ``transformers``
(``harness.evaluation.lmms_backend`` and ``harness.evaluation.runner`` do so first). Each fix is a named function,
documented with the lmms-eval location it works around and tested in ``tests/test_lmms_compat.py``;
when upstream fixes one, delete its function and its test.

1. Offline: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set (setdefault,
   so a user can still opt out) at import of this module. They must be set before
   ``huggingface_hub``/``datasets``/``transformers`` are imported: those read them once.
2. Multiple choice / loglikelihood: ``lmms_eval.evaluator`` passes every model output through
   ``unwrap_generation_output`` (``api/instance.py:44-71``, used at ``evaluator.py:1232``), which
   turns a ``(loss, is_greedy)`` tuple into the *string* ``"(5.9, False)"``. MC scoring then fails
   with "too many values to unpack", retried 5x2 s per doc by tenacity and surfacing as a
   ``RetryError``. :func:`patch_loglikelihood_unwrap` wraps the name in ``lmms_eval.evaluator`` so a
   ``(float, bool)`` tuple, and the ``[loss, greedy]`` list a response-cache hit returns, pass
   through unchanged. Applied only on the versions listed in ``UNWRAP_BUG_VERSIONS``.
3. Logging: importing ``lmms_eval.models`` (``models/__init__.py:13-15``) removes every loguru
   handler and installs one at WARNING on *stdout*. :func:`restore_logging` puts a stderr handler
   back at the level we want.
4. ``lmms.clean()`` (``api/model.py:164-174``, called at ``evaluator.py:1249`` after inference)
   deletes every ``nn.Module`` attribute of the wrapper, so a reused instance has no model on its
   second evaluation. Handled in ``harness.evaluation.lmms_backend.VTPLlava.clean`` (an override, not a patch).
5. Response cache (``caching/response_cache.py``): its key covers ``f"{model}|{model_args}"`` but
   not pruning state held elsewhere, so it would serve one method's answers to another.
   ``VTPLlava.__str__`` spells out the method and budget, ``method=``/``budget=`` are
   ``model_args`` for string-model runs, and ``harness run`` never enables the cache.
6. ``simple_evaluate``'s ``datetime_str`` default is frozen at import (``evaluator.py:402``):
   :func:`fresh_datetime_str` gives one per run.
7. Errors inside a task's ``process_results`` come out as ``tenacity.RetryError`` after 5 tries
   (``api/task.py:1583``): :func:`unwrap_retry_error` returns the real exception.
8. Built-in tasks win name clashes with ``include_path`` tasks (``tasks/__init__.py:72``):
   :func:`task_manager` builds a ``TaskManager`` with ``include_defaults=False``.
9. ``simple_evaluate`` imports private modules of packages lmms-eval does not bound
   (``evaluator.py:134-135``, ``_enable_reentrant_filelocks``): ``filelock._api`` (gone in filelock 4.3)
   and ``datasets.utils._filelock``. ``pyproject.toml`` bounds filelock and the lock pins both;
   :func:`check_private_imports` (run by :func:`apply`) turns an environment without them into one
   clear :class:`DependencyError` before any work, instead of a traceback from the first cell.
"""

from __future__ import annotations

import os
import sys

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

#: lmms-eval versions whose ``unwrap_generation_output`` stringifies loglikelihood results.
UNWRAP_BUG_VERSIONS = ("0.7.3",)

#: loguru level used after ``lmms_eval`` reset it; ``HARNESS_LOG_LEVEL`` overrides.
DEFAULT_LOG_LEVEL = "WARNING"


#: Fix 9: private modules lmms-eval 0.7.3 imports -> (distribution, what to install instead).
PRIVATE_IMPORTS = {"filelock._api": ("filelock", "filelock<4.3"),
                   "datasets.utils._filelock": ("datasets", "a datasets release that has it, as the lock pins")}


class DependencyError(RuntimeError):
    """The environment lacks something lmms-eval needs without declaring it (fix 9)."""


def set_offline_env() -> None:
    """Fix 1: no hub access. ``setdefault``, so an explicit ``HF_HUB_OFFLINE=0`` still wins."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


set_offline_env()  # at import: this module is imported before lmms_eval/datasets/transformers


def lmms_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmms_eval")
    except PackageNotFoundError:  # pragma: no cover - lmms-eval is a hard dependency
        return "unknown"


def _is_loglikelihood_output(output) -> bool:
    """``(loss, is_greedy)`` as a model returns it, or ``[loss, is_greedy]`` from a cache hit."""
    return (
        isinstance(output, (tuple, list))
        and len(output) == 2
        and isinstance(output[0], (int, float))
        and not isinstance(output[0], bool)
        and isinstance(output[1], bool)
    )


def patch_loglikelihood_unwrap(force: bool = False) -> bool:
    """Fix 2: let loglikelihood results through ``lmms_eval.evaluator.unwrap_generation_output``.

    Idempotent. Returns True when the wrapper is installed (now or before). Skipped on lmms-eval
    versions not in ``UNWRAP_BUG_VERSIONS`` unless ``force``: drop this function once upstream
    handles ``(float, bool)``.
    """
    import lmms_eval.evaluator as evaluator

    current = evaluator.unwrap_generation_output
    if getattr(current, "_harness_loglikelihood_fix", False):
        return True
    if not force and lmms_eval_version() not in UNWRAP_BUG_VERSIONS:
        return False

    def unwrap_generation_output(output):
        if _is_loglikelihood_output(output):
            return (float(output[0]), bool(output[1])), None
        return current(output)

    unwrap_generation_output._harness_loglikelihood_fix = True
    unwrap_generation_output.__wrapped__ = current
    unwrap_generation_output.__doc__ = (current.__doc__ or "") + "\n(harness: (loss, is_greedy) passes through.)"
    evaluator.unwrap_generation_output = unwrap_generation_output
    return True


def restore_logging(level: str | None = None) -> None:
    """Fix 3: after ``lmms_eval.models`` reset loguru to WARNING on stdout, log to stderr at ``level``.

    ``level`` defaults to ``$HARNESS_LOG_LEVEL`` or ``DEFAULT_LOG_LEVEL`` (WARNING: lmms-eval's INFO
    is verbose; pass "INFO" to see request counts and cache statistics). stderr keeps stdout for
    the harness's own output.
    """
    from loguru import logger

    level = level or os.environ.get("HARNESS_LOG_LEVEL") or DEFAULT_LOG_LEVEL
    logger.remove()
    logger.add(sys.stderr, level=level.upper(),
               format="<green>{time:HH:mm:ss}</green> | <level>{level: <7}</level> | {name} - {message}")


def fresh_datetime_str() -> str:
    """Fix 6: a timestamp per run (the ``simple_evaluate`` default is computed once at import)."""
    from lmms_eval.utils import get_datetime_str

    return get_datetime_str()


def unwrap_retry_error(exc: BaseException) -> BaseException:
    """Fix 7: the exception a tenacity ``RetryError`` hides (or ``exc`` itself)."""
    try:
        from tenacity import RetryError
    except ImportError:  # pragma: no cover
        return exc
    seen = 0
    while isinstance(exc, RetryError) and seen < 10:
        inner = exc.last_attempt.exception() if exc.last_attempt is not None else None
        if inner is None:
            break
        exc, seen = inner, seen + 1
    return exc


def task_manager(include_path, **kwargs):
    """Fix 8: a ``TaskManager`` that indexes only our task folder(s), so no built-in task shadows
    one of ours (and indexing takes milliseconds, not ~5 s)."""
    from lmms_eval.tasks import TaskManager

    paths = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else str(include_path)
    return TaskManager(include_path=paths, include_defaults=False, **kwargs)


def check_private_imports() -> None:
    """Fix 9: a DependencyError naming the module, the installed release and what to install, when a
    private module lmms-eval 0.7.3 imports is missing."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    for module, (distribution, remedy) in PRIVATE_IMPORTS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            try:
                installed = f"{distribution} {version(distribution)}"
            except PackageNotFoundError:
                installed = f"no {distribution}"
            raise DependencyError(
                f"lmms-eval {lmms_eval_version()} imports {module}, which {installed} (installed) does not have: "
                f"install from the lock (make install) or {remedy}") from None


def apply(restore_log: bool = True, log_level: str | None = None) -> None:
    """Import ``lmms_eval`` (evaluator, hence models) with every fix applied. Idempotent.

    ``restore_log=False`` leaves loguru alone: the backend uses that, because under the
    ``lmms-eval`` CLI the user's ``--verbosity`` handler is already in place by the time the
    backend is imported. ``harness run`` restores logging (fix 3).
    """
    set_offline_env()
    check_private_imports()
    import lmms_eval.evaluator  # noqa: F401  (imports lmms_eval.models: registry + loguru reset)

    patch_loglikelihood_unwrap()
    if restore_log:
        restore_logging(log_level)
