"""`harness run`: arguments, errors, and an end-to-end run on the testbed tasks with a tiny model."""

import csv
import json
import subprocess
import sys

import pytest

from harness import cli, runner


def test_methods_resolution():
    import methods

    assert runner.resolve_methods("none") == ["none"]
    assert runner.resolve_methods("all") == methods.names()
    assert runner.resolve_methods("none,none") == ["none"]
    with pytest.raises(runner.RunError, match=r"unknown method\(s\) 'fast'; known methods: none, random"):
        runner.resolve_methods("none,fast")


def test_budgets_are_ignored_for_none():
    assert runner.parse_budgets("64, 0.25") == [64, 0.25]
    assert runner.cells(["none"], [64, 128]) == [("none", None)]
    assert runner.cells(["none", "random"], []) == [("none", None)] + [("random", b) for b in (192, 128, 64)]
    assert runner.budget_label(None) == "full"
    with pytest.raises(runner.RunError, match="--budgets"):
        runner.parse_budgets("lots")


def test_registry_errors():
    import methods

    with pytest.raises(ValueError, match="unknown method 'x'; known methods: none"):
        methods.get("x")
    with pytest.raises(ValueError, match="has no parameter"):
        methods.get("none", ratio=0.5)
    assert repr(methods.get("none")) == "NoPruning()"


def test_missing_default_model_says_how_to_train_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "DEFAULT_MODEL", tmp_path / "checkpoint")
    assert cli.main(["run", "--limit", "1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "checkpoint") in err and "harness testbed train" in err
    assert not (tmp_path / "out").exists()


def test_cli_errors_have_no_traceback(tmp_path):
    for args, message in ((["--methods", "bogus"], "unknown method(s) 'bogus'"),
                          (["--model", str(tmp_path / "nowhere")], "model not found")):
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_task(tiny_llava_dir, tmp_path, capsys):
    assert cli.main(["run", "--tasks", "testbed_nope", "--model", str(tiny_llava_dir),
                     "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'testbed_nope'" in err and "testbed_exist" in err


def test_harness_run_end_to_end(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--methods", "none", "--budgets", "64", "--tasks", "testbed_exist,testbed_color_mc",
                     "--limit", "2", "--model", str(tiny_llava_dir), "--output", str(out)]) == 0
    with (out / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ("model", "method", "budget", "task", "metric", "value")
        rows = list(reader)
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("testbed_exist", "accuracy"), ("testbed_exist", "n_samples"),
        ("testbed_color_mc", "accuracy"), ("testbed_color_mc", "n_samples")}
    assert all(r["model"] == tiny_llava_dir.name and r["method"] == "none" and r["budget"] == "full" for r in rows)
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["metric"] == "accuracy")
    assert all(r["value"] == "2" for r in rows if r["metric"] == "n_samples")
    # per-task samples with the backend's per-request records
    for task, n_requests in (("testbed_exist", 1), ("testbed_color_mc", 4)):
        lines = [json.loads(x) for x in (out / "samples" / f"none_full_{task}.jsonl").read_text().splitlines()]
        assert [s["doc_id"] for s in lines] == [0, 1]
        assert all(len(s["records"]) == n_requests and s["records"][0]["visual_tokens_in"] == 576 for s in lines)
        assert all("accuracy" in s for s in lines)
    assert (out / "results" / "none_full.json").exists()
    printed = capsys.readouterr().out
    assert "testbed_color_mc" in printed and "none@full" in printed


def test_summary_rows_are_long_format_per_task_not_group():
    res = {
        "results": {
            "testbed": {"alias": "testbed", "accuracy,none": 0.5, "accuracy_stderr,none": "N/A"},
            "testbed_exist": {"alias": " - testbed_exist", "accuracy,none": 1.0, "accuracy_stderr,none": "N/A",
                              "accuracy_stderr_clt,none": 0.0, "exact_match,strict": 0.25},
            "testbed_count": {"alias": " - testbed_count", "accuracy,none": 0.0},
        },
        "group_subtasks": {"testbed": ["testbed_exist", "testbed_count"]},
        "n-samples": {"testbed_exist": {"original": 200, "effective": 4},
                      "testbed_count": {"original": 200, "effective": 4}},
    }
    rows = runner.summary_rows(res, "m", "none", None)
    assert rows == [
        dict(model="m", method="none", budget="full", task="testbed_exist", metric="accuracy", value=1.0),
        dict(model="m", method="none", budget="full", task="testbed_exist", metric="exact_match,strict", value=0.25),
        dict(model="m", method="none", budget="full", task="testbed_exist", metric="n_samples", value=4),
        dict(model="m", method="none", budget="full", task="testbed_count", metric="accuracy", value=0.0),
        dict(model="m", method="none", budget="full", task="testbed_count", metric="n_samples", value=4),
    ]
    table = runner.format_table(rows)
    assert "none@full" in table and "1.000 (n=4)" in table
