"""`harness regress`: unchanged code passes (and keeps passing), injected regressions are caught,
unusable input is refused with exit code 2, the paired tests' thresholds, history, and the CI path."""

import csv
import json
import re
import shutil
import sqlite3

import pytest

from harness import cli
from harness.reports import regress
from harness.reports.regress import Thresholds

TASKS = "testbed_exist,testbed_color_mc"


def harness(*argv) -> int:
    """`harness ...` in-process, through the CLI (which reports bad input: one line, exit 2)."""
    return cli.main([str(a) for a in argv])


def tiny_run(model_dir, out, limit="3", methods="random"):
    assert harness("run", "--methods", methods, "--budgets", "64", "--tasks", TASKS, "--limit", limit,
                   "--model", model_dir, "--output", out, "--timing-repeats", "1") == 0
    return out


@pytest.fixture(scope="module")
def runs(tiny_llava_dir, tmp_path_factory):
    """Three runs of unchanged code on the tiny random model, and one with a different limit."""
    root = tmp_path_factory.mktemp("regress-runs")
    return {name: tiny_run(tiny_llava_dir, root / name, limit) for name, limit in
            (("a", "3"), ("b", "3"), ("c", "3"), ("limit2", "2"))}


def statuses(run_dir):
    with (run_dir / "regress.csv").open() as f:
        return [(r["method"], r["budget"], r["task"], r["check"], r["status"]) for r in csv.DictReader(f)]


def test_unchanged_code_passes_and_repeats_never_flip_the_verdict(runs, tmp_path, capsys):
    for base, cur in (("a", "b"), ("a", "c"), ("b", "c"), ("c", "a")):
        for repeat in range(3):
            out = tmp_path / f"{base}{cur}{repeat}"
            assert harness("regress", "--baseline", runs[base], "--current", runs[cur], "--output", out) == 0
            # every check but latency is exact here: the same code gives the same per-sample results
            assert all(s in ("ok", "n/a") for *_, check, s in statuses(out) if check != "prefill_ratio")
    printed = capsys.readouterr().out
    assert "Verdict: pass" in printed and "REGRESSION" not in printed
    # the default output is the current run's folder
    assert harness("regress", "--baseline", runs["a"], "--current", runs["b"]) == 0
    assert (runs["b"] / "regress.md").read_text().startswith("# harness regress")


def test_a_method_keeping_fewer_tokens_is_caught(tiny_llava_dir, runs, tmp_path, monkeypatch, capsys):
    import methods.random as R

    # as an adaptive method whose threshold drifted would: the adapter checks fixed budgets, not these
    original = R.RandomPruning.select
    monkeypatch.setattr(R.RandomPruning, "adaptive", True)
    monkeypatch.setattr(R.RandomPruning, "select", lambda self, ctx, k: original(self, ctx, k - 8))
    broken = tiny_run(tiny_llava_dir, tmp_path / "broken")
    assert harness("regress", "--baseline", runs["a"], "--current", broken, "--output", tmp_path / "out") == 1
    printed = capsys.readouterr().out
    assert "Verdict: REGRESSION" in printed and "random@64/testbed_exist" in printed
    rows = statuses(tmp_path / "out")
    assert ("random", "64", "testbed_exist", "kept_tokens", "REGRESSION") in rows
    assert ("random", "64", "testbed_exist", "flops_prefill", "improved") in rows  # fewer operations: no regression
    assert all(s in ("ok", "n/a") for m, *_, check, s in rows if m == "none" and check != "prefill_ratio")


def test_a_method_keeping_the_wrong_tokens_is_caught(tmp_path, monkeypatch, capsys):
    """The shipped testbed model: codebook_fixed made to keep its *most* redundant tokens keeps the
    same number of tokens and operations; accuracy, agreement and evidence recall catch it."""
    import methods.codebook as C

    def run(out):
        assert harness("run", "--methods", "codebook_fixed", "--budgets", "64", "--tasks", "testbed_color",
                       "--limit", "20", "--output", out, "--timing-repeats", "0") == 0
        return out

    good = run(tmp_path / "good")
    score = C.CodebookFixed.score
    monkeypatch.setattr(C.CodebookFixed, "score", lambda self, ctx: -score(self, ctx))
    bad = run(tmp_path / "bad")
    assert harness("regress", "--baseline", good, "--current", bad, "--output", tmp_path / "out") == 1
    assert "codebook_fixed@64/testbed_color" in capsys.readouterr().out
    rows = statuses(tmp_path / "out")
    for check in ("accuracy", "agreement", "evidence_recall"):
        assert ("codebook_fixed", "64", "testbed_color", check, "REGRESSION") in rows
    for check in ("kept_tokens", "flops_prefill", "flops_vision"):
        assert ("codebook_fixed", "64", "testbed_color", check, "ok") in rows


def _edit_metric(run_dir, method, task, metric, new_value):
    """Change one value in both summary.csv and the store (they must agree)."""
    with (run_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if (r["method"], r["task"], r["metric"]) == (method, task, metric):
            r["value"] = repr(float(new_value))
    with (run_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with sqlite3.connect(run_dir / "results.sqlite") as db:
        (key, cell_rows), = db.execute("SELECT cell_key, rows FROM cells WHERE method = ?", (method,)).fetchall()
        cell_rows = json.loads(cell_rows)
        for r in cell_rows:
            if (r["task"], r["metric"]) == (task, metric):
                r["value"] = float(new_value)
        db.execute("UPDATE cells SET rows = ? WHERE cell_key = ?", (json.dumps(cell_rows), key))


def test_flops_are_exact_an_increase_is_a_regression(runs, tmp_path, capsys):
    cur = shutil.copytree(runs["b"], tmp_path / "cur")
    value = next(float(r["value"]) for r in csv.DictReader((cur / "summary.csv").open())
                 if (r["method"], r["task"], r["metric"]) == ("random", "testbed_color_mc", "flops_vision"))
    _edit_metric(cur, "random", "testbed_color_mc", "flops_vision", value + 1)
    assert harness("regress", "--baseline", runs["a"], "--current", cur) == 1
    assert "random@64/testbed_color_mc" in capsys.readouterr().out
    assert ("random", "64", "testbed_color_mc", "flops_vision", "REGRESSION") in statuses(cur)


def test_different_protocol_is_unusable(runs, capsys):
    assert harness("regress", "--baseline", runs["a"], "--current", runs["limit2"]) == 2
    err = capsys.readouterr().err
    assert "different protocol" in err and "limit: 3 (baseline) vs 2 (current)" in err
    assert not (runs["limit2"] / "regress.md").exists()


def test_missing_cells_and_files_are_unusable(runs, tmp_path, capsys):
    cur = shutil.copytree(runs["b"], tmp_path / "cur")
    with (cur / "summary.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["method"] != "random"]
    with (cur / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert harness("regress", "--baseline", runs["a"], "--current", cur) == 2
    err = capsys.readouterr().err
    assert "missing in the current run: random@64/testbed_color_mc, random@64/testbed_exist" in err

    (cur / "results.sqlite").unlink()
    assert harness("regress", "--baseline", runs["a"], "--current", cur) == 2
    assert "results.sqlite is missing" in capsys.readouterr().err
    assert harness("regress", "--baseline", tmp_path / "nowhere", "--current", runs["a"]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert harness("regress", "--baseline", runs["a"]) == 2
    assert "give --baseline DIR and --current DIR" in capsys.readouterr().err


def test_summary_and_store_of_different_runs_are_unusable(runs, tmp_path, capsys):
    cur = shutil.copytree(runs["b"], tmp_path / "cur")
    shutil.copy(runs["limit2"] / "summary.csv", cur / "summary.csv")
    assert harness("regress", "--baseline", runs["a"], "--current", cur) == 2
    assert "from different runs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the paired tests themselves

def views(correct, answers=None, recall=None):
    return {i: {"correct": c, "answer": (answers or ["x"] * len(correct))[i],
                "recall": None if recall is None else recall[i]} for i, c in enumerate(correct)}


def test_accuracy_drop_needs_mcnemar_significance():
    base = views([True] * 30)
    assert regress.check_accuracy(base, views([False] * 6 + [True] * 24)).status == "REGRESSION"  # p = 2/64
    # p = 1/16, but no resample of 5 one-way losses shows a gain: the interval alone says so, a warning
    edge = regress.check_accuracy(base, views([False] * 5 + [True] * 25))
    assert edge.status == "warning" and edge.ci[1] < 0 and "the exact test does not" in edge.note
    assert regress.check_accuracy(base, views([False] * 3 + [True] * 27)).status == "ok"  # neither: p = 1/4
    mixed = views([False] * 6 + [True] * 24)
    # six lost and one gained: McNemar p = 2 * 8/128, not significant; the interval excludes 0: a warning
    check = regress.check_accuracy(views([True] * 29 + [False]), views([False] * 6 + [True] * 24))
    assert check.status == "warning" and check.p == pytest.approx(0.125) and "-6/+1" in check.note  # the edge
    assert regress.check_accuracy(mixed, base).status == "improved"
    assert regress.check_accuracy(base, base).p == 1.0


def test_the_interval_and_mcnemar_agree_on_the_committed_baseline():
    """Every pruned cell of the committed baseline against its unpruned cell, on accuracy and on agreement: the
    paired bootstrap interval excludes the unpruned value exactly when McNemar's p < 0.05, except at the known
    edge (k documents lost, none gained, of n: the interval excludes once (1 - k/n)^n < 2.5%, the exact test
    once 2 / 2^k < 0.05, so k = 4 or 5 of 30), which is a warning."""
    config, baseline = regress.load_ci_config()
    base = regress.load_run(baseline)
    reference = {task: docs for (m, b, task), docs in base.samples.items() if (m, b) == ("none", "full")}
    compared, edges = 0, []
    for (method, budget, task), docs in base.samples.items():
        if method == "none":
            continue
        ref = reference[task]
        pairs = {"accuracy": ([ref[d]["correct"] for d in sorted(docs)], [docs[d]["correct"] for d in sorted(docs)]),
                 "agreement": ([True] * len(docs), [docs[d]["answer"] == ref[d]["answer"] for d in sorted(docs)])}
        for name, (b, c) in pairs.items():
            check = regress.checks._paired(name, b, c, 0.05)
            low, high = check.ci
            lost, gained = sum(x and not y for x, y in zip(b, c)), sum(y and not x for x, y in zip(b, c))
            by_interval, by_test = low > 0 or high < 0, check.p < 0.05
            compared += 1
            if by_interval != by_test:
                n = len(b)
                assert gained == 0 and (1 - lost / n) ** n < 0.025 and 2 / 2 ** lost >= 0.05, (method, task, name)
                assert check.status == "warning"
                edges.append((method, budget, task, name, lost))
            else:
                assert check.status == {True: "REGRESSION" if lost > gained else "improved", False: "ok"}[by_test]
    assert compared == 2 * 5 * 3  # five pruned cells x three tasks, accuracy and agreement
    assert len(edges) <= 2, edges  # today: codebook_fixed@64 on testbed_color_mc, 4 lost of 30, both figures


def test_agreement_is_paired_against_each_runs_own_reference():
    ref = views([True] * 20, answers=["a"] * 20)
    same = views([True] * 20, answers=["a"] * 20)
    drifted = views([True] * 20, answers=["b"] * 7 + ["a"] * 13)
    assert regress.check_agreement(same, ref, drifted, ref).status == "REGRESSION"
    # the reference moved with the cell: answers still agree, nothing to report
    assert regress.check_agreement(same, ref, drifted, drifted).status == "ok"
    assert regress.check_agreement(same, None, same, ref).status == "n/a"


def test_evidence_recall_needs_a_systematic_and_large_fall():
    base = views([True] * 20, recall=[0.8] * 20)
    assert regress.check_recall(base, views([True] * 20, recall=[0.2] * 20)).status == "REGRESSION"
    # systematic but tiny (every doc loses 0.01): below the 0.05 tolerance
    assert regress.check_recall(base, views([True] * 20, recall=[0.79] * 20)).status == "ok"
    # large but unsystematic: half up, half down
    assert regress.check_recall(base, views([True] * 20, recall=[0.2, 1.0] * 10)).status == "ok"
    assert regress.check_recall(views([True] * 3), views([True] * 3)).status == "n/a"


def test_kept_tokens_latency_and_flops_thresholds():
    assert regress.check_tokens({"visual_tokens_kept": 64.0}, {"visual_tokens_kept": 64.4}).status == "ok"
    assert regress.check_tokens({"visual_tokens_kept": 64.0}, {"visual_tokens_kept": 63.0}).status == "REGRESSION"
    th = Thresholds()
    assert regress.check_latency(0.5, 0.6, th).status == "ok"  # +20%
    assert regress.check_latency(0.5, 0.7, th).status == "warning"  # +40%
    assert regress.check_latency(0.5, 0.7, Thresholds(strict_latency=True)).status == "REGRESSION"
    assert regress.check_latency(0.5, 0.2, th).status == "ok"  # faster is never a failure
    assert regress.check_latency(None, 0.2, th).status == "n/a"
    flops = {c.name: c.status for c in regress.check_flops({"flops_vision": 10.0, "flops_prefill": 5.0},
                                                           {"flops_vision": 10.0, "flops_prefill": 4.0})}
    assert flops == {"flops_vision": "ok", "flops_prefill": "improved", "flops_decode_per_token": "n/a"}


# ----------------------------------------------------------------------------- history and CI

def test_history_records_and_plots(runs, tmp_path):
    history = tmp_path / "history.csv"
    assert harness("regress", "--record", runs["a"], "--history-file", history) == 0
    assert harness("regress", "--record", runs["b"], "--history-file", history) == 0
    with history.open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 and lines[0]["protocol"] == lines[1]["protocol"]
    figures = json.loads(lines[0]["headline"])
    assert set(figures) == {"none@full", "random@64"} and figures["random@64"]["visual_tokens_kept"] == 64
    assert harness("regress", "--history", "--history-file", history, "--output", tmp_path / "trend.png") == 0
    assert (tmp_path / "trend.png").stat().st_size > 0
    assert harness("regress", "--history", "--history-file", tmp_path / "none.csv") == 2


def test_ci_writes_a_compact_baseline_then_passes(tiny_llava_dir, tmp_path, capsys):
    config = tmp_path / "ci.yaml"
    config.write_text(f"methods: [random]\nbudgets: [64]\ntasks: [{TASKS}]\nlimit: 2\ntiming_repeats: 1\n"
                      f"model: {tiny_llava_dir}\nbaseline: {tmp_path / 'baseline'}\n")
    assert harness("regress", "--ci", "--ci-config", config) == 2  # no baseline yet: refused before running
    assert re.search(r"run folder not found: \S*baseline\b", capsys.readouterr().err)
    assert harness("regress", "--ci", "--ci-config", config, "--write-baseline") == 0
    assert sorted(p.name for p in (tmp_path / "baseline").iterdir()) == ["results.sqlite", "summary.csv"]
    with sqlite3.connect(tmp_path / "baseline" / "results.sqlite") as db:
        assert {r for (r,) in db.execute("SELECT records FROM samples")} == {"[]"}
    assert harness("regress", "--ci", "--ci-config", config) == 0
    assert "Verdict: pass" in capsys.readouterr().out
    assert harness("regress", "--ci", "--ci-config", config, "--current", tmp_path / "kept") == 0
    assert (tmp_path / "kept" / "regress.md").exists()
    assert harness("regress", "--ci", "--ci-config", config, "--current", tmp_path / "kept") == 2  # not fresh


def test_the_committed_baseline_is_the_ci_protocol():
    config, baseline = regress.load_ci_config()
    base = regress.load_run(baseline)
    tasks, methods = config.tasks.split(","), config.methods.split(",")
    assert base.protocol["limit"] == config.limit
    assert base.protocol["tasks"] == sorted(tasks)
    assert {m for m, _, _ in base.metrics} == set(methods)
    assert {t for _, _, t in base.metrics} == set(tasks)
    from harness.evaluation.store import model_hash
    from harness.testbed.model import CHECKPOINT

    assert base.protocol["model"] == model_hash(CHECKPOINT), \
        "the testbed model changed: remake the baseline with `harness regress --ci --write-baseline`"
