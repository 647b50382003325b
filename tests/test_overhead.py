"""`harness bench --overhead`: one cell through `harness run` against bare generation, on a tiny model."""

import csv

import pytest

from harness import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_overhead_compares_the_same_generation_and_reports_the_harness_share(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["bench", "--overhead", "--methods", "none,random", "--budgets", "64", "--limit", "3",
                     "--batch-size", "2", "--model", str(tiny_llava_dir), "--output", str(out)]) == 0
    with (out / "overhead.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["method"], row["budget"], row["task"], row["batch"]) == ("random", "64", "testbed_color", "2")
    # the bare path answered the same documents with the same tokens as the harness's cell
    assert row["documents"] == "3" and row["answers_match"] == "3"
    harness_s, bare_s = float(row["harness_s"]), float(row["bare_s"])
    assert 0 < bare_s < harness_s
    assert 0 <= float(row["harness_share"]) < 1
    assert float(row["harness_share"]) == pytest.approx(1 - bare_s / harness_s)
    assert float(row["harness_over_bare"]) == pytest.approx(harness_s / bare_s)
    assert row["device"]
    # the timed run computed the pruned cell only: the reference was finished before it
    assert {p.name for p in (out / "overhead_run" / "samples").iterdir()} == {
        "none_full_testbed_color.jsonl", "random_64_testbed_color.jsonl"}
    assert "harness share" in capsys.readouterr().out


def test_overhead_refuses_a_task_that_does_not_generate_before_any_run(tiny_llava_dir, tmp_path, capsys):
    assert cli.main(["bench", "--overhead", "--methods", "random", "--budgets", "64", "--limit", "1",
                     "--task", "testbed_color_mc", "--model", str(tiny_llava_dir), "--output", str(tmp_path)]) == 2
    assert "generate_until" in capsys.readouterr().err
    assert not (tmp_path / "overhead_run").exists()
