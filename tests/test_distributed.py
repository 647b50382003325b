"""Data parallel `harness run` under torchrun: two gloo processes on CPU give every non-timing figure of one
process on the same documents, rank 0 alone writes the store and runs the timing pass, and a run whose rank
dies mid-cell resumes from the last finished cell (the testbed model, two tasks: generation and multiple choice).

Exactly equal where each document's batch is padded alike (the testbed's prompts of a task have one length, so
its batches have no padding): a rank's batches hold other documents than one process's, and left padding shifts
float reductions. With padding, answers and counts are still equal and float figures agree to ~1e-7 (tested on
a tiny model whose prompts differ in length), as between two batch sizes in one process."""

import csv
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from harness.evaluation.distributed import Ranks
from harness.evaluation.merge import is_timing

HERE = Path(__file__).parent
# 7 documents: ranks of 4 and 3 (lmms-eval pads the short rank with a copy of its last request)
GRID = ["--methods", "random,fastv", "--budgets", "64", "--tasks", "testbed_color,testbed_color_mc", "--limit", "7",
        "--timing-repeats", "1", "--batch-size", "8"]
# One thread a process, as torchrun gives each rank: float reductions (an SVD's, for delta IPR) depend on it.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}


def _launch(args, ranks: int | None = None, script=None, **env) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks \
        else [sys.executable]
    entry = [str(script)] if script else ["-m", "harness.cli"]
    return subprocess.run(head + entry + args, env={**ENV, **env}, capture_output=True, text=True, timeout=300,
                          cwd=HERE.parent)


def _figures(folder: Path) -> list[tuple]:
    with open(folder / "summary.csv") as f:
        return [tuple(row.values()) for row in csv.DictReader(f) if not is_timing(row["metric"])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    one = _launch(["run", *GRID, "--output", str(root / "one")])
    two = _launch(["run", *GRID, "--output", str(root / "two")], ranks=2)
    for done in (one, two):
        assert done.returncode == 0, done.stderr[-3000:]
    return root, one, two


def test_two_ranks_give_every_non_timing_figure_of_one_process(runs):
    root, _, two = runs
    figures = _figures(root / "one")
    assert len(figures) > 100 and _figures(root / "two") == figures  # same rows, same order, same values
    assert "data parallel over 2 ranks" in two.stdout
    for name in ("random_64_testbed_color.jsonl", "fastv_64_testbed_color_mc.jsonl"):  # the per-document records
        assert (root / "two" / "samples" / name).read_text() == (root / "one" / "samples" / name).read_text()


def test_rank_0_alone_writes_the_store_and_times(runs):
    root, _, two = runs
    with sqlite3.connect(root / "two" / "results.sqlite") as db:
        cells = db.execute("SELECT method, budget, details FROM cells").fetchall()
        samples = db.execute("SELECT count(*) FROM samples").fetchone()[0]
        provenance = db.execute("SELECT provenance FROM runs").fetchall()
    assert sorted((m, b) for m, b, _ in cells) == [("fastv", "64"), ("none", "None"), ("random", "64")]
    assert all('"timing_rank": "0 of 2"' in details for _, _, details in cells)
    assert samples == 3 * 2 * 7  # every document of both ranks, once
    assert len(provenance) == 1 and '"ranks": 2' in provenance[0][0]
    assert two.stdout.count("harness run: model") == 1  # one voice


def test_a_run_whose_rank_dies_mid_cell_resumes_from_the_last_finished_cell(runs, tmp_path):
    root, _, _ = runs
    args = ["run", *GRID, "--output", str(tmp_path)]
    died = _launch(args, ranks=2, script=HERE / "rank_dies.py", METHOD_DIES="fastv", RANK_DIES="1")
    assert died.returncode != 0
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        finished = sorted(m for (m,) in db.execute("SELECT method FROM cells"))
    assert finished == ["none", "random"]  # committed before rank 1 died; nothing of the fastv cell
    again = _launch(args, ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 2
    assert _figures(tmp_path) == _figures(root / "one")


def test_padded_batches_give_equal_answers_and_float_figures_to_1e_7(tiny_llava_dir, tmp_path):
    grid = [*GRID, "--model", str(tiny_llava_dir), "--budgets", "32", "--batch-size", "4", "--timing-repeats", "0",
            "--params", "fastv:layer=1"]  # the tiny model has two decoder layers
    for folder, ranks in (("one", None), ("two", 2)):
        done = _launch(["run", *grid, "--output", str(tmp_path / folder)], ranks=ranks)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = _figures(tmp_path / "one"), _figures(tmp_path / "two")
    assert [row[:5] for row in one] == [row[:5] for row in two]
    exact = ("accuracy", "n_samples", "agreement", "visual_tokens_kept", "evidence_recall", "flops_prefill")
    for a, b in zip(one, two):
        if a[4] in exact:
            assert a == b
        elif a[5] != "nan":
            assert abs(float(a[5]) - float(b[5])) <= 1e-6 * max(1.0, abs(float(a[5]))), (a, b)


def test_ranks_come_from_the_launcher_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0) and not Ranks().parallel
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    ranks = Ranks.from_env(env)
    assert ranks == Ranks(3, 4, 1) and ranks.device("cuda") == "cuda:1" and ranks.device("cpu") == "cpu"
    assert Ranks().device("cuda:2") == "cuda:2" and Ranks().share(5) == 5 and Ranks().gather(5) == [5]
    for bad, what in (({"RANK": "4", "WORLD_SIZE": "4"}, "RANK must be in"),
                      ({"RANK": "x"}, "must be integers"),
                      ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR")):
        with pytest.raises(ValueError, match=what):
            Ranks.from_env(bad)
