"""`harness analyze consistency`: ΔIPR against consistency, from a run's summary.csv."""

import csv

import pytest

from harness import cli
from harness.reports.ipr_analysis import analyze_consistency


def _summary(path, cells):
    with open(path / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "method", "budget", "task", "metric", "value"])
        w.writerow(["m", "none", "full", "t1", "accuracy", 0.8])
        for method, budget, task, dipr, agreement in cells:
            w.writerow(["m", method, budget, task, "delta_ipr", dipr])
            w.writerow(["m", method, budget, task, "agreement", agreement])
            w.writerow(["m", method, budget, task, "first_token_kl", 1 - agreement])


def test_a_monotone_relation_gives_rank_correlation_one(tmp_path):
    cells = [(m, b, t, d, 1 - d) for (m, b, t, d) in [
        ("random", 64, "t1", 0.1), ("random", 128, "t1", 0.05), ("fastv", 64, "t1", 0.3),
        ("fastv", 64, "t2", 0.2), ("uniform", 64, "t2", 0.4), ("uniform", 128, "t2", 0.01)]]
    _summary(tmp_path, cells)
    result = analyze_consistency(tmp_path, say=lambda m: None)
    pooled = result[(result["scope"] == "all tasks")].set_index("metric")
    assert pooled.loc["agreement", "spearman"] == pytest.approx(-1)
    assert pooled.loc["first_token_kl", "spearman"] == pytest.approx(1)
    assert pooled.loc["agreement", "cells"] == 6
    assert set(result["scope"]) == {"all tasks", "t1", "t2"}  # within each task as well
    assert (tmp_path / "analysis" / "ipr_consistency.png").stat().st_size > 0


def test_bad_run_folders_give_clear_errors(tmp_path, capsys):
    assert cli.main(["analyze", "consistency", str(tmp_path)]) == 2
    assert "no summary.csv" in capsys.readouterr().err
    _summary(tmp_path, [("random", 64, "t1", 0.1, 0.9)])
    assert cli.main(["analyze", "consistency", str(tmp_path)]) == 2
    assert "fewer than 3 pruned cells" in capsys.readouterr().err
