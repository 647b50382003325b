"""The lmms-eval 0.7.3 workarounds in harness.evaluation.lmms_compat, one test each (drop with the fix)."""

import os

import pytest

from harness.evaluation import lmms_compat


def test_offline_variables_are_set_by_default_but_not_forced(monkeypatch):
    for key in lmms_compat.OFFLINE_ENV:
        assert os.environ.get(key) == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    lmms_compat.set_offline_env()
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # an explicit choice wins (setdefault)
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"


def _original_unwrap():
    import lmms_eval.api.instance as instance

    return instance.unwrap_generation_output


def test_upstream_bug_still_present():
    """If this fails, lmms-eval fixed unwrap_generation_output: drop patch_loglikelihood_unwrap."""
    text, _ = _original_unwrap()((5.9, False))
    assert text == "(5.9, False)"


def test_loglikelihood_unwrap_patch():
    import lmms_eval.evaluator as evaluator
    from lmms_eval.api.instance import GenerationResult, TokenCounts

    lmms_compat.apply(restore_log=False)
    assert lmms_compat.patch_loglikelihood_unwrap() is True  # idempotent
    unwrap = evaluator.unwrap_generation_output
    assert unwrap.__wrapped__ is _original_unwrap()  # wrapped once, not twice
    assert unwrap((5.9, False)) == ((5.9, False), None)
    assert unwrap([1.25, True]) == ((1.25, True), None)  # what a response-cache hit returns
    assert unwrap((3, True)) == ((3.0, True), None)
    # everything else behaves as upstream
    assert unwrap("yes") == ("yes", None)
    assert unwrap(GenerationResult("a", TokenCounts(1, 2))) == ("a", TokenCounts(1, 2))
    assert unwrap(("a", {"input_tokens": 4})) == ("a", TokenCounts(input_tokens=4))
    assert unwrap(["r1", "r2"]) == (["r1", "r2"], None)
    assert unwrap((True, False))[0] == "(True, False)"  # bools are not losses


def test_unwrap_patch_is_version_guarded(monkeypatch):
    import lmms_eval.evaluator as evaluator

    original = _original_unwrap()
    monkeypatch.setattr(evaluator, "unwrap_generation_output", original)
    monkeypatch.setattr(lmms_compat, "lmms_eval_version", lambda: "0.8.0")
    assert lmms_compat.patch_loglikelihood_unwrap() is False
    assert evaluator.unwrap_generation_output is original
    assert lmms_compat.patch_loglikelihood_unwrap(force=True) is True
    assert evaluator.unwrap_generation_output((1.0, True)) == ((1.0, True), None)


def test_restore_logging_after_lmms_eval_reset(capsys):
    import lmms_eval.models  # noqa: F401  (resets loguru to WARNING on stdout at first import)
    from loguru import logger

    lmms_compat.restore_logging("INFO")
    logger.info("harness-info-line")
    captured = capsys.readouterr()
    assert "harness-info-line" in captured.err and "harness-info-line" not in captured.out
    lmms_compat.restore_logging()  # back to the default (WARNING)
    logger.info("hidden-info-line")
    assert "hidden-info-line" not in capsys.readouterr().err


def test_unwrap_retry_error():
    from tenacity import RetryError, retry, stop_after_attempt

    @retry(stop=stop_after_attempt(2))
    def boom():
        raise KeyError("the real problem")

    with pytest.raises(RetryError) as info:
        boom()
    inner = lmms_compat.unwrap_retry_error(info.value)
    assert isinstance(inner, KeyError)
    plain = ValueError("x")
    assert lmms_compat.unwrap_retry_error(plain) is plain


def test_fresh_datetime_str_changes():
    import time

    a = lmms_compat.fresh_datetime_str()
    time.sleep(1.05)
    assert lmms_compat.fresh_datetime_str() != a


def test_task_manager_indexes_only_our_tasks(tiny_tasks_dir):
    tm = lmms_compat.task_manager(tiny_tasks_dir)
    assert {"vtp_tiny_mc", "vtp_tiny_gen"} <= set(tm.all_tasks)
    assert "mme" not in tm.all_tasks  # built-ins are not indexed (they would win name clashes)
