"""`harness leaderboard`: rendered from a real (tiny-model) run, checked against its summary; the protocol
config; bad input; sorting in a headless browser when one is installed."""

import base64
import csv
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from harness import cli, protocol
from harness.cli.run import config_from
from harness.reports import leaderboard, run_folder

METHODS = ("random", "uniform", "cls_attention")  # pre-LLM: FastV's layer 2 is past the tiny model's 2 layers
TASKS = ("testbed_exist", "testbed_color")
LATER_ACCURACY = 0.25  # what the second run says about random@64 on testbed_exist


def _cli(argv: list[str]) -> int:
    """`harness leaderboard ...` in-process, through the CLI (which reports bad input: one line, exit 2)."""
    return cli.main(argv)


def _later_run(first, folder):
    """A second run folder: uniform@32 relabelled as an adaptive `codebook` cell (the tiny model cannot
    run the shipped codebook), and random@64 on testbed_exist again, with another accuracy."""
    folder.mkdir()
    (folder / "samples").mkdir()
    with (first / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    later = []
    for row in rows:
        if (row["method"], row["budget"]) == ("uniform", "32"):
            later.append({**row, "method": "codebook", "budget": "adaptive"})
        elif (row["method"], row["budget"], row["task"]) == ("random", "64", "testbed_exist"):
            value = LATER_ACCURACY if row["metric"] == "accuracy" else row["value"]
            later.append({**row, "value": value})
    with (folder / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(later)
    for task in TASKS:
        shutil.copy(first / "samples" / f"uniform_32_{task}.jsonl",
                    folder / "samples" / f"codebook_adaptive_{task}.jsonl")
    shutil.copy(first / "samples" / "random_64_testbed_exist.jsonl", folder / "samples")


@pytest.fixture(scope="module")
def board(tiny_llava_dir, tmp_path_factory):
    """One tiny-model run (none + 3 methods x 2 budgets x 2 tasks x 2 documents), a later run merged over
    it, and the leaderboard rendered from both."""
    root = tmp_path_factory.mktemp("leaderboard")
    first = root / "run"
    assert cli.main(["run", "--methods", ",".join(METHODS), "--budgets", "64,32", "--tasks", ",".join(TASKS),
                     "--limit", "2", "--model", str(tiny_llava_dir), "--output", str(first),
                     "--timing-repeats", "1"]) == 0
    _later_run(first, root / "later")
    out = root / "board"
    assert _cli(["leaderboard", "--from", str(first), str(root / "later"), "--output", str(out)]) == 0
    return {"first": first, "later": root / "later", "out": out}


def _summary(board) -> dict:
    """(method, budget, task, metric) -> value over both runs, the later one winning."""
    value = {}
    for folder in (board["first"], board["later"]):
        with (folder / "summary.csv").open() as f:
            for row in csv.DictReader(f):
                value[(row["method"], row["budget"], row["task"], row["metric"])] = float(row["value"])
    return value


def _number(text: str) -> float:
    """A leaderboard.csv number; an empty field is a missing value."""
    return float(text) if text else float("nan")


def _mean(values) -> float:
    """The mean of the values that are not NaN (NaN when none is)."""
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else float("nan")


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table: rows of cells, the header first, the separator left out."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_render_writes_every_file(board):
    out = board["out"]
    for name in ("leaderboard.md", "leaderboard.csv", "index.html", "ranking.png", "accuracy_vs_kept_tokens.png",
                 "consistency_vs_flops.png", "speedup_vs_relative_accuracy.png", "relative_accuracy_by_task.png",
                 "kept_tokens_testbed_color_0.png", "kept_tokens_testbed_color_1.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    from PIL import Image

    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_markdown_has_a_row_per_method_and_the_stated_columns(board):
    text = (board["out"] / "leaderboard.md").read_text()
    assert "**Ranking rule.** Methods are ranked by their mean rel. accuracy" in text
    assert "equal means in the order of their mean agreement" in text
    assert text.index("Ranking rule") < text.index("| rank |")  # the rule is stated above the table
    ranking, cells = _tables(text)
    header, rows = ranking[0], ranking[1:]
    assert header[:2] == ["rank", "method"] and "mean rel. accuracy" in header
    assert sorted(r[1] for r in rows) == sorted([*METHODS, "codebook (adaptive)"])
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
    adaptive = next(r for r in rows if r[1] == "codebook (adaptive)")
    assert adaptive[header.index("budgets")] == "adaptive (32.0 kept)"
    assert cells[0] == ["rank", "method", "budget", "accuracy", "rel. accuracy", "rel. accuracy 95%", "agreement",
                        "flips c→w", "first-token KL", "FLOPs ratio", "prefill speedup", "kept tokens"]
    assert header[header.index("mean rel. accuracy") + 1] == "95% interval"
    assert all(re.fullmatch(r"\d\.\d{3}–\d\.\d{3}|—", r[header.index("95% interval")]) for r in rows)
    assert "Ranks admit ties" in text
    assert cells[1][:3] == ["ref", "none", "full"]
    assert {(r[1], r[2]) for r in cells[2:]} == {(m, b) for m in METHODS for b in ("64", "32")} | {
        ("codebook", "adaptive")}
    assert "measured on cpu (sdpa attention)" in text  # where the speedups were timed


def test_csv_numbers_are_the_summarys(board):
    value = _summary(board)
    # The tiny random model may answer every task all wrong: its relative accuracy is then missing (NaN).
    with (board["out"] / "leaderboard.csv").open() as f:
        rows = {(r["method"], r["budget"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("none", "full"), ("codebook", "adaptive")} | {(m, b) for m in METHODS for b in ("64", "32")}
    for (method, budget), row in rows.items():
        for metric in ("accuracy", "agreement", "flip_correct_to_wrong", "first_token_kl"):
            expected = _mean([value[(method, budget, t, metric)] for t in TASKS])
            assert _number(row[metric]) == pytest.approx(expected, nan_ok=True), (method, budget, metric)
        # relative accuracy: a ratio of the summed accuracies, not a mean of per-task ratios
        reference = sum(value[("none", "full", t, "accuracy")] for t in TASKS)
        expected = sum(value[(method, budget, t, "accuracy")] for t in TASKS) / reference if reference else float("nan")
        assert _number(row["relative_accuracy"]) == pytest.approx(expected, nan_ok=True), (method, budget)

        flops = np.mean([(value[(method, budget, t, "flops_prefill")] + value[(method, budget, t, "flops_vision")])
                         / (value[("none", "full", t, "flops_prefill")] + value[("none", "full", t, "flops_vision")])
                         for t in TASKS])
        speedup = np.mean([value[("none", "full", t, "prefill_ms")] / value[(method, budget, t, "prefill_ms")]
                           for t in TASKS])
        assert float(row["flops_ratio"]) == pytest.approx(flops)
        assert float(row["prefill_speedup"]) == pytest.approx(speedup)
    # the later run won on random@64 / testbed_exist
    assert float(rows[("random", "64")]["accuracy"]) == pytest.approx(
        _mean([LATER_ACCURACY, value[("random", "64", "testbed_color", "accuracy")]]))
    # kept tokens per image, from the stored kept indices
    assert float(rows[("none", "full")]["visual_tokens_kept_per_image"]) == 576
    for method in METHODS:
        assert float(rows[(method, "32")]["visual_tokens_kept_per_image"]) == 32
    assert float(rows[("codebook", "adaptive")]["visual_tokens_kept_per_image"]) == 32
    assert rows[("none", "full")]["rank"] == "" and {rows[(m, "64")]["rank"] for m in METHODS} <= {"1", "2", "3", "4"}


def test_cell_intervals_are_those_the_run_wrote(board):
    """The leaderboard resamples each cell's documents as the run did (the same draws per task), so every
    cell's interval equals its `all_tasks` rows of summary.csv; the unpruned cell's paired ones have no width."""
    with (board["out"] / "leaderboard.csv").open() as f:
        rows = {(r["method"], r["budget"]): r for r in csv.DictReader(f)}
    written = run_folder.over_tasks(run_folder.read_summary(board["first"] / "summary.csv"))
    compared = 0
    for method, budget, metric, value in written[["method", "budget", "metric", "value"]].itertuples(index=False):
        if "_ci_" in metric and (method, budget) in rows:
            got = _number(rows[(method, budget)][metric])
            assert got == pytest.approx(value, nan_ok=True), (method, budget, metric)
            compared += 1
    assert compared >= 7 * 2 * 5  # every cell of the first run, every figure's two bounds
    none = rows[("none", "full")]
    assert none["relative_accuracy_ci_low"] == none["relative_accuracy_ci_high"] and _number(none[
        "relative_accuracy_ci_low"]) in (1.0, float("nan")) or math.isnan(_number(none["relative_accuracy_ci_low"]))
    assert float(none["agreement_ci_low"]) == float(none["agreement_ci_high"]) == 1.0


def _ranked(resampled: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """(rank, position) per method of a one-model table whose methods' scores per resample are given."""
    rows = [dict(model="m", method=method, budget="64", entry=method, relative_accuracy=float(np.mean(values)),
                 agreement=0.5) for method, values in resampled.items()]
    ranked = leaderboard.rank(pd.DataFrame(rows), leaderboard.RULES["relative_accuracy"],
                              {("m", method): values for method, values in resampled.items()})
    return {r.method: (int(r.rank), int(r.position)) for r in ranked.itertuples()}


def test_ranks_admit_ties_from_the_paired_bootstrap():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, 2000)  # what the drawn documents do to every method alike
    got = _ranked({"a": 0.80 + noise, "b": 0.79 + noise + rng.normal(0, 0.002, 2000),  # b below a in every draw...
                   "c": 0.80 + noise + rng.normal(0, 0.05, 2000),  # ...c neither above nor below a or b
                   "d": 0.50 + noise})
    # a and b: marginal intervals overlapping almost wholly, yet a beats b in every common resample
    assert got["a"][0] == 1 and got["b"][0] == 2
    assert got["c"][0] == 1  # nothing beats c with 95% confidence: tied with a
    assert got["d"] == (4, 4)  # beaten by all three
    same = _ranked({"x": 0.7 + noise, "y": 0.7 + noise})  # indistinguishable methods share the rank
    assert same["x"][0] == same["y"][0] == 1


def test_without_samples_ranks_follow_the_point_figures():
    rows = [dict(model="m", method=m, budget="64", entry=m, relative_accuracy=v, agreement=0.5)
            for m, v in (("a", 0.9), ("b", 0.8))]
    ranked = leaderboard.rank(pd.DataFrame(rows), leaderboard.RULES["relative_accuracy"])
    assert list(ranked["rank"]) == [1, 2] and ranked["score_low"].isna().all()


def test_relative_accuracy_is_a_ratio_of_means_a_floor_task_cannot_dominate():
    """Two tasks: one answered at 0.9 unpruned, one at the floor (0.03). A method that loses half the
    first and gains 0.1 on the second kept (0.45 + 0.13) / 0.93 of the accuracy; a mean of per-task
    ratios would call it (0.5 + 4.33) / 2 = 2.4, better than unpruned."""
    rows = []
    for method, budget, accuracies in (("none", "full", (0.9, 0.03)), ("random", "64", (0.45, 0.13))):
        for task, acc in zip(("a", "b"), accuracies):
            rows += [("m", method, budget, task, "accuracy", acc), ("m", method, budget, task, "flops_prefill", 1.0),
                     ("m", method, budget, task, "flops_vision", 1.0), ("m", method, budget, task, "prefill_ms", 1.0)]
    summary = pd.DataFrame(rows, columns=list(run_folder.SUMMARY_COLUMNS))
    cells = leaderboard.cell_table(leaderboard.task_table(summary, {})).set_index("method")
    assert cells.loc["random", "relative_accuracy"] == pytest.approx((0.45 + 0.13) / 0.93)
    assert cells.loc["none", "relative_accuracy"] == pytest.approx(1.0)
    assert cells.loc["random", "accuracy"] == pytest.approx(0.29)


def test_html_is_self_contained_with_embedded_plots(board):
    page = (board["out"] / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "<script src" not in page and "@import" not in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(list(board["out"].glob("*.png")))
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert page.count('<table class="sortable"') == 2 and "<script>" in page


@pytest.mark.parametrize("case", ["missing folder", "no summary", "missing config", "unknown key", "with run dir"])
def test_bad_input_is_one_clear_line_and_exit_2(case, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "board.yaml"
    config.write_text("limit: 30\nmodels: all\n")
    argv, message = {
        "missing folder": (["--from", str(tmp_path / "nowhere")], f"run folder not found: {tmp_path / 'nowhere'}"),
        "no summary": (["--from", str(empty)], f"{empty} has no summary.csv"),
        "missing config": (["--config", str(tmp_path / "no.yaml")], f"config file not found: {tmp_path / 'no.yaml'}"),
        "unknown key": (["--config", str(config)], "unknown key(s) 'models'; accepted: model, model_name"),
        "with run dir": (["--from", str(empty), "--run-dir", str(empty)], "--run-dir goes with --config"),
    }[case]
    assert _cli(["leaderboard", *argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_shipped_config_is_the_default_protocol():
    config = leaderboard.load_config(leaderboard.DEFAULT_CONFIG)
    run_defaults = config_from(cli.build_parser().parse_args(["run"]))
    assert config.model is None  # the shipped testbed model
    assert config.tasks == ",".join(protocol.DEFAULT_TASKS)
    assert config.budgets == ",".join(map(str, protocol.DEFAULT_BUDGETS))
    assert config.limit == protocol.DEFAULT_LIMIT == run_defaults.limit
    assert config.methods == "all" and config.timing_repeats == run_defaults.timing_repeats == 5


def test_a_seed_the_runner_cannot_honour_is_refused(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("seed: 3\n")
    with pytest.raises(leaderboard.LeaderboardError, match="seed must be 0"):
        leaderboard.load_config(path)


def test_config_runs_the_protocol_then_renders(tiny_llava_dir, tmp_path, capsys):
    config = tmp_path / "board.yaml"
    config.write_text(f"model: {tiny_llava_dir}\ntasks: [testbed_exist]\nbudgets: [64]\nlimit: 2\nseed: 0\n"
                      "methods: [random]\ntiming_repeats: 0\n")
    run_dir, out = tmp_path / "run", tmp_path / "board"
    assert _cli(["leaderboard", "--config", str(config), "--run-dir", str(run_dir), "--output", str(out)]) == 0
    assert (run_dir / "results.sqlite").is_file() and (out / "index.html").is_file()
    with (out / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "full"), ("random", "64")]
    assert rows[1]["prefill_speedup"] == ""  # no timing pass: no speedup, not a made-up one
    assert "| 1 | random |" in capsys.readouterr().out


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_sorting_in_a_headless_browser(board, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium on this machine: apt install chromium")
    # The page as shipped, plus a script that clicks the cell table's `method` header twice and records
    # the row order before and after each click.
    probe = """<script>
    function order() { return Array.prototype.map.call(document.querySelectorAll("#cells tbody tr"),
                                                        function (r) { return r.cells[1].textContent; }); }
    var th = Array.prototype.find.call(document.querySelectorAll("#cells th"),
                                       function (h) { return h.textContent === "method"; });
    var seen = [order()]; th.click(); seen.push(order()); th.click(); seen.push(order());
    var pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(seen);
    document.body.appendChild(pre);
    </script></body>"""
    page = tmp_path / "index.html"
    page.write_text((board["out"] / "index.html").read_text().replace("</body>", probe))
    dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    assert '<table class="sortable" id="ranking">' in dom and "<td>random</td>" in dom  # the tables rendered
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, "the probe script did not run"
    initial, ascending, descending = json.loads(found.group(1).replace("&quot;", '"'))
    assert initial[0] == "none" and sorted(initial) == ascending and descending == ascending[::-1]
    assert ascending != initial or descending != initial  # clicking a header reorders the rows
