"""`harness run`: arguments, errors, and an end-to-end run on the testbed tasks with a tiny model."""

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from harness import cli, protocol
from harness.evaluation import runner


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


def test_a_non_positive_rope_base_is_refused_before_training(tmp_path, capsys):
    for bad in ("0", "-1e4", "ten"):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"dims:\n  rope_theta: {bad}\n")
        assert cli.main(["testbed", "train", "--workdir", str(tmp_path / "w"), "--recipe", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert "dims.rope_theta: expected a positive number" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_missing_donor_checkpoint_is_one_clear_error(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"init_from: {tmp_path / 'nowhere'}\n")
    assert cli.main(["testbed", "train", "--workdir", str(tmp_path / "w"), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"init_from {tmp_path / 'nowhere'}: not a llava-hf checkpoint" in err and "Traceback" not in err
    # Also when the recipe gives the RoPE base itself (the donor is then first opened by the trainer).
    recipe.write_text(f"init_from: {tmp_path / 'nowhere'}\ndims: {{rope_theta: 1e6}}\n")
    assert cli.main(["testbed", "train", "--workdir", str(tmp_path / "w"), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"init_from {tmp_path / 'nowhere'}: not a llava-hf checkpoint" in err and "Traceback" not in err


def test_the_recipe_file_sets_every_recipe_field_and_refuses_anything_else(tmp_path, capsys):
    """`harness testbed train --recipe FILE`: every Recipe field (and every dim) can be set from YAML, to
    the type the field has; an unknown key or a value of the wrong type is one line, exit 2, before any
    training."""
    import dataclasses

    import yaml

    from harness.testbed.model import ModelDims
    from harness.testbed.training import recipe as R

    default = R.Recipe()
    changed = {"int": 7, "float": 0.25, "bool": True, "tuple": [1, 3], "str | None": "somewhere"}
    values = {f.name: changed[f.type] for f in dataclasses.fields(R.Recipe) if f.type in changed}
    values["readout_answers"] = "all"
    values["dims"] = {f.name: changed[f.type] for f in dataclasses.fields(ModelDims)}
    assert set(values) == {f.name for f in dataclasses.fields(R.Recipe)}  # every field has a changed value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    recipe = R.load(path)
    for f in dataclasses.fields(R.Recipe):
        got = getattr(recipe, f.name)
        assert got != getattr(default, f.name), f.name
        expected = tuple(values[f.name]) if f.type == "tuple" else values[f.name]
        assert got == expected and type(got) is type(expected), f.name
    assert isinstance(recipe.vision_lr, float) and R.load(path).dims == values["dims"]
    # Exponent floats without a dot are numbers; ints widen to floats; dims left out keep their defaults.
    path.write_text("instruct_lr: 1e-3\nattention_weight: 2\ndims: {rope_theta: 1e8}\n")
    recipe = R.load(path)
    assert (recipe.instruct_lr, recipe.attention_weight) == (1e-3, 2.0) and type(recipe.attention_weight) is float
    assert recipe.dims == {**default.dims, "rope_theta": 1e8}
    path.write_text("")
    assert R.load(path) == default
    # save() writes what load() reads back.
    R.save(recipe, tmp_path / "again.yaml", header="a header\nof two lines")
    assert (tmp_path / "again.yaml").read_text().startswith("# a header\n# of two lines\n")
    assert R.load(tmp_path / "again.yaml") == recipe

    for text, message in (("instruct_step: 300\n", "unknown key(s) 'instruct_step' (did you mean 'instruct_steps'?)"),
                          ("dims: {hidden: 8}\n", "dims: unknown key(s) 'hidden'"),
                          ("instruct_steps: 1.5\n", "instruct_steps: expected an integer, got 1.5"),
                          ("instruct_steps: '300'\n", "instruct_steps: expected an integer, got '300'"),
                          ("instruct_lr: fast\n", "instruct_lr: expected a number, got 'fast'"),
                          ("attention_weight: true\n", "attention_weight: expected a number, got True"),
                          ("seed: null\n", "seed: expected an integer, got None"),
                          ("spread_words: 1\n", "spread_words: expected true or false, got 1"),
                          ("multi_slots: [2, x]\n", "multi_slots: expected a list of integers, got [2, 'x']"),
                          ("init_from: 3\n", "init_from: expected a string or null, got 3"),
                          ("readout_answers: everything\n", "readout_answers: expected 'attributes' or 'all'"),
                          ("dims: 8\n", "dims: expected a mapping of ModelDims fields"),
                          ("dims: {text_layers: 2.0}\n", "dims.text_layers: expected an integer, got 2.0"),
                          ("- vision_steps\n", "expected a mapping of Recipe fields"),
                          ("vision_steps: [\n", "is not valid YAML")):
        path.write_text(text)
        with pytest.raises(R.RecipeError, match=re.escape(message)):
            R.load(path)
        assert cli.main(["testbed", "train", "--workdir", str(tmp_path / "w"), "--recipe", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and str(path) in err
    assert cli.main(["testbed", "train", "--workdir", str(tmp_path / "w"), "--recipe", str(tmp_path / "none")]) == 2
    assert "recipe file not readable" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    args = cli.build_parser().parse_args(["testbed", "train", "--recipe", "r.yaml", "--seed", "3"])
    assert (args.recipe, args.seed, args.device) == ("r.yaml", 3, None)


def test_unknown_task(tiny_llava_dir, tmp_path, capsys):
    assert cli.main(["run", "--tasks", "testbed_nope", "--model", str(tiny_llava_dir),
                     "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'testbed_nope'" in err and "testbed_exist" in err


def test_a_codebook_from_another_model_stops_the_run_before_any_cell(tiny_llava_dir, tmp_path, capsys):
    # The default codebook is the testbed model's (hidden 128); the tiny model's projector is narrower.
    assert cli.main(["run", "--methods", "codebook_fixed", "--budgets", "64", "--tasks", "testbed_exist",
                     "--model", str(tiny_llava_dir), "--limit", "1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "method 'codebook_fixed' cannot run" in err and "hidden size 128" in err
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_a_fastv_layer_the_model_lacks_stops_the_run_before_any_cell(tiny_llava_dir, tmp_path, capsys):
    assert cli.main(["run", "--methods", "fastv", "--budgets", "64", "--tasks", "testbed_exist",
                     "--model", str(tiny_llava_dir), "--limit", "1", "--output", str(tmp_path / "out")]) == 2
    assert "layer K must be in 1..1" in capsys.readouterr().err  # the tiny model has 2 decoder layers


def test_method_parameters_reach_their_method_only(tiny_llava_dir, tmp_path):
    """--params sets one method's parameters (here FastV's K for a 2-layer model); `none` is untouched."""
    out = tmp_path / "out"
    assert cli.main(["run", "--methods", "fastv", "--budgets", "64", "--tasks", "testbed_exist", "--limit", "1",
                     "--model", str(tiny_llava_dir), "--output", str(out), "--timing-repeats", "0",
                     "--params", "fastv:layer=1"]) == 0
    line = json.loads((out / "samples" / "fastv_64_testbed_exist.jsonl").read_text().splitlines()[0])
    assert "layer=1" in line["records"][0]["method"]


def test_bad_method_parameters_are_refused(capsys):
    for spec, message in (("fastv:nope=1", "has no parameter(s) nope"), ("bogus:x=1", "unknown method 'bogus'"),
                          ("lofi", "expected METHOD:key=value")):
        assert cli.main(["run", "--methods", "fastv", "--params", spec]) == 2
        assert message in capsys.readouterr().err


PAIRED = {"relative_accuracy", "agreement", "flip_correct_to_wrong", "flip_wrong_to_correct", "first_token_kl",
          "first_token_jsd", "top1_agreement", "mcnemar_p", "visual_tokens_in", "visual_tokens_kept", "evidence_recall",
          "delta_ipr",
          "flops_vision", "flops_prefill", "flops_decode_per_token", "flops_prefill_analytic", "equivalent_tokens",
          "vision_ms", "selection_ms", "prefill_ms", "decode_ms_per_token", "peak_memory_mb"}
WITH_INTERVALS = {"accuracy", "relative_accuracy", "agreement", "flip_correct_to_wrong", "flip_wrong_to_correct",
                  "first_token_kl"}
INTERVALS = {f"{m}_ci_{side}" for m in WITH_INTERVALS for side in ("low", "high")}


def test_harness_run_end_to_end(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--methods", "random", "--budgets", "64", "--tasks", "testbed_exist,testbed_color_mc",
                     "--limit", "2", "--model", str(tiny_llava_dir), "--output", str(out), "--timing-repeats", "2"]) == 0
    with (out / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ("model", "method", "budget", "task", "metric", "value")
        rows = list(reader)
    # the unpruned reference is added to the grid, and every cell is compared with it
    assert {(r["method"], r["budget"]) for r in rows} == {("none", "full"), ("random", "64")}
    for method in ("none", "random"):
        for task in ("testbed_exist", "testbed_color_mc"):
            metrics = {r["metric"] for r in rows if r["method"] == method and r["task"] == task}
            extra = {"teacher_forced_nll"} if (method, task) == ("random", "testbed_exist") else set()
            assert metrics == {"accuracy", "n_samples"} | PAIRED | INTERVALS | extra
        over = {r["metric"] for r in rows if r["method"] == method and r["task"] == "all_tasks"}
        assert over == WITH_INTERVALS | INTERVALS  # the cell over its tasks
    value = {(r["method"], r["task"], r["metric"]): float(r["value"]) for r in rows}
    for task in ("testbed_exist", "testbed_color_mc", "all_tasks"):
        # the unpruned cell against itself: paired intervals without width; every interval holds its figure
        assert value[("none", task, "agreement_ci_low")] == value[("none", task, "agreement_ci_high")] == 1.0
        assert value[("none", task, "first_token_kl_ci_high")] == 0.0
        for method in ("none", "random"):
            for metric in ("agreement", "flip_correct_to_wrong", "first_token_kl"):
                low, high = value[(method, task, f"{metric}_ci_low")], value[(method, task, f"{metric}_ci_high")]
                assert low <= value[(method, task, metric)] <= high, (method, task, metric)
    assert value[("random", "all_tasks", "agreement")] == pytest.approx(
        (value[("random", "testbed_exist", "agreement")] + value[("random", "testbed_color_mc", "agreement")]) / 2)
    for task in ("testbed_exist", "testbed_color_mc"):
        assert value[("none", task, "agreement")] == 1.0 and value[("none", task, "first_token_kl")] == 0.0
        assert value[("none", task, "evidence_recall")] == 1.0 and value[("none", task, "delta_ipr")] == 0.0
        assert value[("random", task, "delta_ipr")] != 0.0
        assert value[("random", task, "visual_tokens_kept")] == 64 and value[("none", task, "visual_tokens_kept")] == 576
        assert 0 <= value[("random", task, "evidence_recall")] <= 1
        assert value[("random", task, "first_token_kl")] > 0  # pruning changed the distribution
        assert value[("random", task, "flops_prefill")] < value[("none", task, "flops_prefill")] / 4
        assert value[("random", task, "flops_prefill")] == value[("random", task, "flops_prefill_analytic")]
    assert value[("random", "testbed_exist", "teacher_forced_nll")] > 0  # generation task: scored
    assert ("none", "testbed_exist", "teacher_forced_nll") not in value
    assert ("random", "testbed_color_mc", "teacher_forced_nll") not in value  # multiple choice: no answer text
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["metric"] == "accuracy")
    assert all(r["value"] == "2" for r in rows if r["metric"] == "n_samples")
    assert all(float(r["value"]) > 0 for r in rows if r["metric"] == "prefill_ms")
    import sqlite3

    with sqlite3.connect(out / "results.sqlite") as db:
        details = [json.loads(d) for (d,) in db.execute("SELECT details FROM cells")]
    assert all(d["timing"]["testbed_exist"]["spread"]["prefill_ms"]["n"] == 2 for d in details)
    assert all(d["timing"]["testbed_exist"]["device"] == "cpu" for d in details)
    # per-task samples with the backend's per-request records
    for task, n_requests in (("testbed_exist", 1), ("testbed_color_mc", 4)):
        lines = [json.loads(x) for x in (out / "samples" / f"random_64_{task}.jsonl").read_text().splitlines()]
        assert [s["doc_id"] for s in lines] == [0, 1]
        assert all(len(s["records"]) == n_requests and s["records"][0]["visual_tokens_in"] == 576 for s in lines)
        assert all(len(s["records"][0]["kept_indices"][0]) == 64 for s in lines)
        assert all("accuracy" in s for s in lines)
    assert (out / "results" / "none_full.json").exists() and (out / "results" / "random_64.json").exists()
    printed = capsys.readouterr().out
    assert "testbed_color_mc" in printed and "none@full" in printed and "random@64" in printed


def test_mcnemar_and_divergences():
    from harness.metrics.consistency import SampleView, _kl_and_jsd, mcnemar_p, paired_metrics

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_p(3, 3) == 1.0
    p = {0: np.log(0.5), 1: np.log(0.5)}
    q = {0: np.log(0.9), 1: np.log(0.1)}
    kl, jsd = _kl_and_jsd(p, q)
    assert kl == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
    assert 0 < jsd < np.log(2) and _kl_and_jsd(p, p) == (0.0, 0.0)
    ref = {i: SampleView(i < 3, "a", p, 576, 576, 1.0) for i in range(4)}
    new = {i: SampleView(i in (0, 3), "a" if i == 0 else "b", q, 576, 64, 0.5) for i in range(4)}
    m = paired_metrics(ref, new)
    assert m["relative_accuracy"] == pytest.approx((2 / 4) / (3 / 4)) and m["agreement"] == 0.25
    assert m["flip_correct_to_wrong"] == 0.5 and m["flip_wrong_to_correct"] == 0.25
    assert m["top1_agreement"] == 1.0 and m["visual_tokens_kept"] == 64 and m["evidence_recall"] == 0.5


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


def test_a_rerun_skips_finished_cells_and_an_interrupted_sweep_resumes(tiny_llava_dir, tmp_path):
    """Killed after its first cell, a sweep resumes on the same output folder without recomputing or
    duplicating that cell; a complete rerun recomputes nothing and writes the same summary."""
    import os
    import signal
    import sqlite3
    import time

    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "harness.cli", "run", "--methods", "none,random", "--budgets", "64,32",
            "--tasks", "testbed_exist", "--limit", "2", "--model", str(tiny_llava_dir), "--output", str(out),
            "--timing-repeats", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill as soon as the first cell is stored
        if "done in" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 1
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "method=none budget=full: finished earlier" in resumed.stdout
    assert resumed.stdout.count(" ...") == 2  # only the two random cells ran
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 3
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 3 * 2
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
    summary = (out / "summary.csv").read_text()
    started = time.perf_counter()
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 3 and " ..." not in again.stdout
    assert (out / "summary.csv").read_text() == summary
    assert time.perf_counter() - started < 120


def test_limit_argument():
    from harness.cli.run import config_from, limit

    assert limit("all") is None and limit("25") == 25 and limit("0.5") == 0.5
    config = config_from(cli.build_parser().parse_args(["run"]))
    assert config.limit == protocol.DEFAULT_LIMIT  # the default protocol's documents per task
    assert (config.batch_size, config.timing_repeats) == (protocol.DEFAULT_BATCH_SIZE, protocol.DEFAULT_TIMING_REPEATS)
    assert config == protocol.RunConfig()
    assert config_from(cli.build_parser().parse_args(["run", "--limit", "all"])).limit is None  # every document


def test_a_protocol_file_runs_with_flags_overriding_it(tmp_path):
    """`harness run --config FILE`: the file's protocol (the same loader as the leaderboard's and the CI
    check's), every flag given on the command line over it."""
    from harness.cli.run import config_from

    path = tmp_path / "p.yaml"
    path.write_text("methods: [random, fastv]\nbudgets: [64]\nlimit: 12\ntiming_repeats: 2\n")
    parse = cli.build_parser().parse_args
    config = config_from(parse(["run", "--config", str(path)]))
    assert (config.methods, config.budgets, config.limit, config.timing_repeats) == ("random,fastv", "64", 12, 2)
    assert config.tasks == "testbed" and config.batch_size == 8  # keys the file leaves out: the defaults
    config = config_from(parse(["run", "--config", str(path), "--limit", "3", "--budgets", "32,16"]))
    assert (config.limit, config.budgets, config.methods) == (3, "32,16", "random,fastv")
    path.write_text("limits: 3\n")
    with pytest.raises(protocol.ProtocolError, match="unknown key"):
        config_from(parse(["run", "--config", str(path)]))


def test_code_version_follows_the_code_results_depend_on(tmp_path):
    """Cells are keyed on the content of the code that determines results: documents, reports and
    training scripts leave finished cells valid; a method, the harness core or a task invalidates them."""
    from harness.evaluation.store import code_version

    for rel in ("methods/m.py", "harness/core.py", "harness/reports/leaderboard.py",
                "harness/testbed/training/trainer.py", "tasks/t/t.yaml", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    base = code_version(tmp_path)
    for rel in ("README.md", "harness/reports/leaderboard.py", "harness/testbed/training/trainer.py"):
        (tmp_path / rel).write_text("x = 2\n")
        assert code_version(tmp_path) == base, rel
    seen = {base}
    for rel in ("methods/m.py", "harness/core.py", "tasks/t/t.yaml"):
        (tmp_path / rel).write_text("x = 2\n")
        seen.add(code_version(tmp_path))
    assert len(seen) == 4
    (tmp_path / "methods/new.py").write_text("")  # a new module counts too
    assert code_version(tmp_path) not in seen


@pytest.mark.parametrize("bad, message", [
    ("0", "budget 0 keeps no token"), ("-1", "budget -1 keeps no token"),
    ("1.5", r"budget 1.5 is a fraction outside \(0, 1\]"), ("abc", "budget 'abc' is not a number"),
    ("64,577", "budget 577 is above the 576 visual tokens of an image of this model")])
def test_a_bad_budget_stops_the_run_before_any_cell(tiny_llava_dir, tmp_path, capsys, bad, message):
    """One line naming the value and what is accepted, exit 2, and nothing computed: 0, -1, 1.5 and
    'abc' before the model loads, 577 (above this model's 576 tokens) right after."""
    out = tmp_path / "out"
    assert cli.main(["run", "--methods", "fastv", "--budgets", bad, "--tasks", "testbed_exist", "--limit", "1",
                     "--model", str(tiny_llava_dir), "--output", str(out), "--params", "fastv:layer=1"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(rf"^harness run: error: --budgets: {message}.*; accepted: an integer ", lines[0])
    assert "fraction in (0, 1]" in lines[0] and "Traceback" not in captured.err
    assert "[1/" not in captured.out and not (out / "summary.csv").exists()  # no cell started
    assert ("loaded in" in captured.out) == (bad == "64,577")  # what the model decides waits for it


def test_a_bad_budget_exits_2_without_a_traceback_from_the_shell(tiny_llava_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--methods", "random", "--budgets", "577",
                           "--model", str(tiny_llava_dir), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "harness run: error: --budgets: budget 577 is above the 576 visual tokens of an image of this model; "
        "accepted: an integer 1..576 (visual tokens kept per image) or a fraction in (0, 1]"]


def test_non_finite_features_stop_the_run_in_one_line_and_keep_finished_cells(tiny_llava_dir, tmp_path, capsys):
    """A checkpoint whose projector overflows (a NaN in a bias): the unpruned cell finishes and is kept;
    the pruned cell stops the run with one line naming the document, image, method and dtype."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-llava"
    shutil.copytree(tiny_llava_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(weights)
    bias = next(k for k in tensors if "multi_modal_projector" in k and k.endswith("bias"))
    tensors[bias][3] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert cli.main(["run", "--methods", "gprune", "--budgets", "64", "--tasks", "testbed_exist", "--limit", "1",
                     "--model", str(broken), "--output", str(out), "--timing-repeats", "0"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error" in line]  # not the progress bars
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(r"^harness run: error: method gprune at budget 64: task testbed_exist doc \d+, image 0 of the "
                     r"document: the features handed to gprune hold \d+ non-finite value\(s\) \(NaN or inf\) of \d+, "
                     r"in float32; the checkpoint's weights or the inputs hold them\. Cells finished before this one are kept in ", lines[0]), lines[0]
    with open(out / "summary.csv") as f:
        kept = {(r["method"], r["metric"]) for r in csv.DictReader(f)}
    assert ("none", "accuracy") in kept and not any(m == "gprune" for m, _ in kept)
    assert torch.isnan(tensors[bias]).any()
