"""Paired bootstrap intervals (harness.metrics.intervals): cases with known answers, and agreement with the
point figures of harness.metrics.consistency."""

import math

import numpy as np
import pytest

from harness.metrics import intervals as iv
from harness.metrics.consistency import SampleView, paired_metrics

PAIRED = ("relative_accuracy", "agreement", "flip_correct_to_wrong", "flip_wrong_to_correct", "first_token_kl")


def _views(correct, answers=None, p_first=None) -> dict:
    answers = answers or ["a" if c else "b" for c in correct]
    p_first = p_first or [0.7] * len(correct)
    return {i: SampleView(bool(c), a, {"0": math.log(p), "1": math.log(1 - p)}, 576, 64, None)
            for i, (c, a, p) in enumerate(zip(correct, answers, p_first))}


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(7)
    ref = rng.random(60) < 0.8
    new = ref & (rng.random(60) < 0.85) | (~ref & (rng.random(60) < 0.2))
    return _views(ref), _views(new, p_first=list(0.5 + 0.4 * rng.random(60)))


def test_identical_runs_give_zero_width_intervals_of_every_paired_figure(pair):
    ref, _ = pair
    got = iv.task_intervals(iv.columns(ref, ref))
    assert got["relative_accuracy"] == (1.0, 1.0) and got["agreement"] == (1.0, 1.0)
    assert got["flip_correct_to_wrong"] == got["flip_wrong_to_correct"] == got["first_token_kl"] == (0.0, 0.0)
    low, high = got["accuracy"]  # the accuracy itself still varies with the documents drawn
    assert low < 0.8 < high and high - low > 0.1
    cell = iv.cell_intervals({"t1": iv.columns(ref, ref), "t2": iv.columns(ref, ref)})
    assert cell["relative_accuracy"] == (1.0, 1.0) and cell["flip_correct_to_wrong"] == (0.0, 0.0)


def test_a_method_that_turns_every_right_answer_wrong_has_certain_flips():
    ref, new = _views([True] * 20), _views([False] * 20)
    got = iv.task_intervals(iv.columns(ref, new))
    assert got["flip_correct_to_wrong"] == (1.0, 1.0) and got["relative_accuracy"] == (0.0, 0.0)
    assert got["agreement"] == (0.0, 0.0)


def test_each_interval_holds_the_point_figure_and_is_seeded(pair):
    ref, new = pair
    cols = iv.columns(ref, new)
    got = iv.task_intervals(cols)
    points = paired_metrics(ref, new)
    points["accuracy"] = float(np.mean([v.correct for v in new.values()]))
    for metric in iv.METRICS:
        low, high = got[metric]
        assert low <= points[metric] <= high, metric
        assert high > low, metric  # the runs differ: no interval collapses
    assert iv.task_intervals(cols) == got  # seeded
    assert iv.task_intervals(cols, seed=1) != got


def test_the_width_of_an_accuracy_interval_is_the_binomial_one():
    rng = np.random.default_rng(0)
    correct = rng.random(400) < 0.5
    low, high = iv.task_intervals(iv.columns(_views(correct), _views(correct)))["accuracy"]
    p = correct.mean()
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 400), rel=0.12)


def test_the_stratified_cell_interval_of_one_task_is_that_task_s(pair):
    ref, new = pair
    cols = iv.columns(ref, new)
    task, cell = iv.task_intervals(cols), iv.cell_intervals({"t": cols})
    for metric in iv.METRICS:
        assert cell[metric] == pytest.approx(task[metric], abs=0.03), metric


def test_stratified_resampling_keeps_each_task_s_documents_apart():
    """Two tasks, one always right, one always wrong: every resample has half the documents right, so the
    mean accuracy over tasks is exactly 0.5; pooling the documents would vary it."""
    right, wrong = _views([True] * 10), _views([False] * 10)
    cell = iv.cell_intervals({"a": iv.columns(right, right), "b": iv.columns(wrong, wrong)})
    assert cell["accuracy"] == (0.5, 0.5)
    assert cell["relative_accuracy"] == (1.0, 1.0)


def test_documents_without_distributions_leave_kl_out():
    ref = {i: SampleView(True, "a", {}, 576, 64, None) for i in range(5)}
    assert "first_token_kl" not in iv.task_intervals(iv.columns(ref, ref))
    assert iv.task_intervals(iv.columns({}, {})) == {} and iv.cell_intervals({}) == {}
