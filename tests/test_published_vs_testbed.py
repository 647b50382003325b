"""results/published_vs_testbed.csv and scripts/published_vs_testbed.py: every published figure carries its
source and table, the testbed columns match the committed protocol, and Kendall's tau is right on cases
whose answer is known. Pandas and scipy only: no model, no network."""

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("published_vs_testbed",
                                                  ROOT / "scripts" / "published_vs_testbed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _script()


@pytest.fixture(scope="module")
def published():
    return S.read_published()


def test_columns_and_provenance(published):
    assert tuple(published.columns) == S.COLUMNS
    assert len(published) > 0
    for col in ("source", "table", "benchmarks", "published_metric", "transcription"):
        blank = published[published[col].isna() | (published[col].astype(str).str.strip() == "")]
        assert blank.empty, f"rows without {col}: {blank[['method', 'budget']].values.tolist()}"
    assert published.table.str.contains(r"Table \d", regex=True).all(), "every row names its table number"
    assert published.source.str.contains(r"arXiv \d{4}\.\d{4,5}", regex=True).all(), "every source has an arXiv id"
    assert published.transcription.str.match(r"(primary|secondary):").all()
    assert set(published.budget) <= {"64", "128"}
    assert (published.published_score > 0).all()
    assert not published.duplicated(["method", "budget", "source", "table"]).any()


def test_methods_are_testbed_cells(published):
    protocol = pd.read_csv(S.PROTOCOL, dtype={"budget": str})
    cells = set(zip(protocol.method, protocol.budget))
    assert set(zip(published.method, published.budget)) <= cells


def test_testbed_columns_match_the_protocol(published):
    """The CSV's accuracy kept and both ranks are what the script recomputes from the committed protocol."""
    protocol = pd.read_csv(S.PROTOCOL, dtype={"budget": str})
    kept = S.testbed_kept(protocol)
    fresh = S.side_by_side(published, kept, S.testbed_intervals(protocol))
    assert S.stale(published, fresh) == []
    # each testbed figure lies in its interval (the protocol's all_tasks rows)
    assert (fresh.testbed_ci_low <= fresh.testbed_accuracy_kept + 1e-4).all()
    assert (fresh.testbed_accuracy_kept <= fresh.testbed_ci_high + 1e-4).all()
    # One figure by hand: FastV at 64 keeps 7.400 of the unpruned 7.425 summed accuracies (README: 0.997).
    assert kept[("fastv", "64")] == pytest.approx(7.400 / 7.425, abs=1e-4)


def test_testbed_kept_is_a_ratio_of_sums():
    protocol = pd.DataFrame({
        "model": "m", "metric": "accuracy",
        "method": ["none", "none", "a", "a"], "budget": ["full", "full", "64", "64"],
        "task": ["t1", "t2", "t1", "t2"], "value": [1.0, 0.5, 0.5, 0.25]})
    assert S.testbed_kept(protocol) == {("a", "64"): pytest.approx(0.5)}


def test_kendall_on_known_cases():
    assert S.kendall([1, 2, 3, 4], [10, 20, 30, 40]) == (pytest.approx(1.0), 4)
    assert S.kendall([1, 2, 3, 4], [40, 30, 20, 10]) == (pytest.approx(-1.0), 4)
    assert S.kendall([1, 2, 3], [1, 3, 2])[0] == pytest.approx(1 / 3)  # one swapped pair of three
    tau, n = S.kendall([5], [1])
    assert math.isnan(tau) and n == 1


def test_ranks_and_tau_within_each_source(tmp_path):
    """Two sources at one budget: ranks and tau are per source (their scores are on different scales)."""
    rows = []
    for source, scores in (("A, arXiv 0000.00001", [90, 80, 70, 60]), ("B, arXiv 0000.00002", [1, 2, 3, 4])):
        for method, score in zip(("m1", "m2", "m3", "m4"), scores):
            rows.append({"method": method, "budget": "64", "source": source, "table": "Table 1",
                         "published_score": score})
    d = S.side_by_side(pd.DataFrame(rows), {(m, "64"): k for m, k in zip(("m1", "m2", "m3", "m4"),
                                                                        (0.9, 0.8, 0.7, 0.6))})
    assert d.testbed_rank.tolist() == [1, 2, 3, 4] * 2
    assert d.published_rank.tolist() == [1, 2, 3, 4, 4, 3, 2, 1]
    t = S.taus(d).set_index("source")
    assert t.loc["A, arXiv 0000.00001", "tau"] == pytest.approx(1.0)
    assert t.loc["B, arXiv 0000.00002", "tau"] == pytest.approx(-1.0)
    assert t.informative.all()  # n = 4


def test_main_prints_the_table_and_tau(capsys):
    assert S.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "64 visual tokens of 576" in out and "128 visual tokens of 576" in out
    assert "Kendall tau-b" in out and "not informative" in out


def test_stale_csv_is_caught(tmp_path, published):
    changed = published.copy()
    changed.loc[0, "testbed_accuracy_kept"] += 0.01
    path = tmp_path / "published.csv"
    changed.to_csv(path, index=False)
    assert S.main(["--published", str(path), "--check"]) == 1
