"""`harness run --shard I/N` and `harness merge`: a grid run as two shards and merged equals the grid run once
(tiny model, one testbed task, two documents)."""

import csv
import json
import re
import shutil
import sqlite3

import pytest

from harness import cli, protocol
from harness.evaluation import runner
from harness.evaluation.merge import is_timing

GRID = ["--methods", "random,uniform", "--budgets", "64,32", "--tasks", "testbed_exist", "--limit", "2",
        "--timing-repeats", "0"]  # no timing pass (seconds a cell): the timing rule is tested on edited copies


def _summary(folder) -> list[dict]:
    with open(folder / "summary.csv") as f:
        return list(csv.DictReader(f))


def _error(captured) -> str:
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def sweep(tiny_llava_dir, tmp_path_factory):
    """The grid none + {random, uniform} x {64, 32} run once, and as shards 1/2 and 2/2 in two folders."""
    root = tmp_path_factory.mktemp("sweep")
    for name, shard in (("full", []), ("a", ["--shard", "1/2"]), ("b", ["--shard", "2/2"])):
        assert cli.main(["run", *GRID, *shard, "--model", str(tiny_llava_dir), "--output", str(root / name)]) == 0
    return root


def test_a_shard_is_the_reference_and_every_nth_other_cell():
    grid = runner.cells(["none", "random", "uniform"], [64, 32, 16])
    others = grid[1:]
    shards = [runner.shard_cells(grid, (i, 3)) for i in (1, 2, 3)]
    assert shards[0] == [("none", None), ("random", 64), ("uniform", 64)]
    assert all(s[0] == ("none", None) for s in shards)  # every shard has the unpruned reference
    assert sorted(c for s in shards for c in s[1:]) == sorted(others)  # every other cell in one shard only
    assert runner.shard_cells(grid, (1, 1)) == grid == runner.shard_cells(grid, None)
    assert runner.shard_cells(grid, (4, 9)) == [("none", None), ("uniform", 64)]
    assert runner.shard_cells(grid, (9, 9)) == [("none", None)]  # more jobs than cells: the reference only
    assert protocol.parse_shard(" 2/5 ") == (2, 5) and protocol.parse_shard(None) is None
    from harness.cli.run import config_from

    parse = cli.build_parser().parse_args
    assert config_from(parse(["run", "--shard", "2/3"])).shard == "2/3" and config_from(parse(["run"])).shard is None


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1/0", "a/b", "2", "1/2/3", "-1/2", "", "1.5/2"])
def test_a_bad_shard_is_one_line_before_the_model_loads(tiny_llava_dir, tmp_path, capsys, bad):
    out = tmp_path / "out"
    assert cli.main(["run", *GRID, f"--shard={bad}", "--model", str(tiny_llava_dir), "--output", str(out)]) == 2
    captured = capsys.readouterr()
    line = _error(captured)
    assert line == (f"harness run: error: --shard: expected I/N with 1 <= I <= N (this job's number, counted from 1, "
                    f"and the number of jobs), e.g. 1/4, got {bad!r}")
    assert "loaded in" not in captured.out and not out.exists()


def test_shards_merged_equal_the_grid_run_once(sweep, tiny_llava_dir, tmp_path, capsys):
    full, merged = sweep / "full", tmp_path / "merged"
    assert {(r["method"], r["budget"]) for r in _summary(sweep / "a")} == {("none", "full"), ("random", "64"),
                                                                            ("uniform", "64")}
    assert {(r["method"], r["budget"]) for r in _summary(sweep / "b")} == {("none", "full"), ("random", "32"),
                                                                            ("uniform", "32")}
    capsys.readouterr()
    assert cli.main(["merge", str(sweep / "a"), str(sweep / "b"), "--output", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert "5 cell(s) added, 1 duplicate(s) kept once" in printed and "timing differs" not in printed

    # Same cells, same values, in the grid's order (the shards' none, random@64, uniform@64 / none, random@32, ...).
    once, joined = _summary(full), _summary(merged)
    assert joined == once and len({r["method"] + r["budget"] for r in joined}) == 5
    for files in ("samples", "results"):  # the cells' files, copied from the shard that ran each
        assert sorted(p.name for p in (merged / files).iterdir()) == sorted(p.name for p in (full / files).iterdir())
    with sqlite3.connect(merged / "results.sqlite") as db, sqlite3.connect(full / "results.sqlite") as ref:
        assert sorted(db.execute("SELECT cell_key FROM cells")) == sorted(ref.execute("SELECT cell_key FROM cells"))
        assert db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 5 * 2
        provenance = db.execute("SELECT provenance FROM runs ORDER BY run_id").fetchall()
        shards = [json.loads(p)["config"]["shard"] for (p,) in provenance]
        assert shards == ["1/2", "2/2"]  # both invocations' provenance, the shard recorded
        runs_of = dict(db.execute("SELECT method || budget, run_id FROM cells"))
        assert runs_of["random64"] == 1 and runs_of["random32"] == 2 and runs_of["noneNone"] == 1

    # The reports read it as a run: the leaderboard's loader and the regression check against the single run.
    from harness.reports.leaderboard.loading import load_run

    run = load_run(merged)
    assert run.models == [tiny_llava_dir.name]
    assert len(run.kept) == 5 * 2  # kept indices of every cell and document, from the copied samples/
    assert cli.main(["regress", "--baseline", str(full), "--current", str(merged),
                     "--output", str(tmp_path / "r")]) == 0

    # The cells' keys are a full run's: `harness run` on the merged folder computes nothing.
    capsys.readouterr()
    assert cli.main(["run", *GRID, "--model", str(tiny_llava_dir), "--output", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 5 and " ..." not in printed


def _edit_cell(folder, method: str, edit) -> None:
    with sqlite3.connect(folder / "results.sqlite") as db:
        key, rows = db.execute("SELECT cell_key, rows FROM cells WHERE method = ?", (method,)).fetchone()
        db.execute("UPDATE cells SET rows = ? WHERE cell_key = ?", (json.dumps(edit(json.loads(rows))), key))


def test_a_conflicting_duplicate_is_an_error_and_writes_nothing(sweep, tmp_path, capsys):
    changed = tmp_path / "b"
    shutil.copytree(sweep / "b", changed)
    _edit_cell(changed, "none", lambda rows: [{**r, "value": 0.25} if r["metric"] == "agreement" else r for r in rows])
    out = tmp_path / "merged"
    assert cli.main(["merge", str(sweep / "a"), str(changed), "--output", str(out)]) == 2
    line = _error(capsys.readouterr())
    assert re.search(r"^harness merge: error: cell none@full \(key \w{24}\) of .*a and .*b conflict: metric agreement "
                     r"of task testbed_exist is 1.0 in one, 0.25 in the other", line), line
    assert not out.exists()

    # The same rows but another answer for one document: the per-document views are compared too.
    shutil.rmtree(changed)
    shutil.copytree(sweep / "b", changed)
    with sqlite3.connect(changed / "results.sqlite") as db:
        key = db.execute("SELECT cell_key FROM cells WHERE method = 'none'").fetchone()[0]
        (text,) = db.execute("SELECT view FROM samples WHERE cell_key = ? AND doc_id = 1", (key,)).fetchone()
        view = json.loads(text)
        db.execute("UPDATE samples SET view = ? WHERE cell_key = ? AND doc_id = 1",
                   (json.dumps({**view, "answer": view["answer"] + "x"}), key))
    assert cli.main(["merge", str(sweep / "a"), str(changed), "--output", str(out)]) == 2
    assert "conflict: the answer of document 1 of task testbed_exist differs" in _error(capsys.readouterr())
    assert not out.exists()


def test_a_duplicate_differing_only_in_timing_keeps_the_first(sweep, tmp_path, capsys):
    """Each machine measures its own timing: the reference cell of two shards agrees on everything else."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, ms in ((a, 5.0), (b, 7.0)):
        shutil.copytree(sweep / folder.name, folder)
        _edit_cell(folder, "none", lambda rows, ms=ms: rows + [{**rows[0], "metric": m, "value": ms * k} for k, m in
                                                              enumerate(("prefill_ms", "decode_ms_per_token",
                                                                         "peak_memory_mb"), 1)])
    out = tmp_path / "merged"
    assert cli.main(["merge", str(a), str(b), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"cell none@full \(key \w{24}\) of .*a and .*b: timing differs \(prefill_ms, decode_ms_per_token, "
                     r"peak_memory_mb\), measured per machine: kept .*a's", printed), printed
    timing = {r["metric"]: float(r["value"]) for r in _summary(out) if is_timing(r["metric"])}
    assert timing == {"prefill_ms": 5.0, "decode_ms_per_token": 10.0, "peak_memory_mb": 15.0}
    assert [r for r in _summary(out) if not is_timing(r["metric"])] == _summary(sweep / "full")
    # A timing metric in one copy only is not a timing difference: the cells are not the same measurement.
    _edit_cell(b, "none", lambda rows: [r for r in rows if r["metric"] != "prefill_ms"])
    assert cli.main(["merge", str(a), str(b), "--output", str(tmp_path / "again")]) == 2
    assert "conflict: metric prefill_ms of task testbed_exist is in one only" in _error(capsys.readouterr())


def test_merging_a_folder_with_itself_or_its_copy_deduplicates(sweep, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(sweep / "a", copy)
    for inputs in ([sweep / "a", sweep / "a"], [sweep / "a", copy]):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert cli.main(["merge", *map(str, inputs), "--output", str(out)]) == 0
        assert "timing differs" not in capsys.readouterr().out  # identical copies, timing included
        assert _summary(out) == _summary(sweep / "a")
        with sqlite3.connect(out / "results.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 3
            assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1  # the same invocation once


def test_merging_into_a_result_folder_adds_to_it(sweep, tmp_path, capsys):
    """The output may be a result folder of the same protocol, one of the inputs too: the others are added."""
    target = tmp_path / "a"
    shutil.copytree(sweep / "a", target)
    assert cli.main(["merge", str(target), str(sweep / "b"), "--output", str(target)]) == 0
    assert "2 cell(s) added, 1 duplicate(s) kept once" in capsys.readouterr().out  # b's pruned cells
    joined = [r for r in _summary(target) if not is_timing(r["metric"])]
    assert joined == [r for r in _summary(sweep / "full") if not is_timing(r["metric"])]


def _other_protocol(folder, **changes) -> None:
    with sqlite3.connect(folder / "results.sqlite") as db:
        for table, column, key in (("runs", "provenance", "run_id"), ("cells", "determined_by", "cell_key")):
            for k, text in db.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                db.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (json.dumps({**json.loads(text),
                                                                                           **changes}), k))


def test_inputs_and_outputs_that_cannot_merge_are_one_line_before_anything_is_written(sweep, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(sweep / "b", other)
    _other_protocol(other, limit=3)
    not_results = tmp_path / "notes"
    not_results.mkdir()
    (not_results / "x.txt").write_text("mine")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.sqlite").write_text("not a database")
    renamed = tmp_path / "renamed"  # random@32 again under another key: another parameter, say
    shutil.copytree(sweep / "b", renamed)
    with sqlite3.connect(renamed / "results.sqlite") as db:
        db.execute("UPDATE cells SET cell_key = 'k' || cell_key, method_repr = 'RandomPruning(seed=1)' "
                   "WHERE method = 'random'")
    out = tmp_path / "out"
    for args, message in (
            ([str(sweep / "a"), str(other)], (r"^harness merge: error: .*other and .*a are results of different "
                                              r"protocols \(limit 2 vs 3\): only runs of one model, tasks, limit")),
            ([str(sweep / "a"), str(tmp_path / "nowhere")], r"input .*nowhere is not a folder"),
            ([str(sweep / "a"), str(not_results)], r"input .*notes is not a result folder: it has no results.sqlite"),
            ([str(broken)], r"input .*broken: .*results.sqlite is not a results store: file is not a database"),
            ([str(sweep / "full"), str(renamed)], (r"two different cells of random@32: RandomPruning\(.*\) \(key \w+\) "
                                                   r"and RandomPruning\(seed=1\) \(key k\w+, .*renamed\)")),
            ([str(sweep / "a"), "--output", str(not_results)], r"--output .*notes exists and is not a result folder"),
            ([str(sweep / "a"), "--output", str(not_results / "x.txt")], r"--output .*x.txt is a file")):
        argv = ["merge", *args] + ([] if "--output" in args else ["--output", str(out)])
        assert cli.main(argv) == 2
        assert re.search(message, _error(capsys.readouterr()))
        assert not out.exists() and sorted(p.name for p in not_results.iterdir()) == ["x.txt"]
    # Adding into a result folder of another protocol is refused the same way, the folder untouched.
    before = (other / "summary.csv").read_text()
    assert cli.main(["merge", str(sweep / "a"), "--output", str(other)]) == 2
    assert "are results of different protocols (limit 3 vs 2)" in _error(capsys.readouterr())
    assert (other / "summary.csv").read_text() == before
