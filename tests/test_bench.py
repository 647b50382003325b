"""`harness bench` on a tiny model: every budgeted method gets its ratios (timings not asserted)."""

import math

import torch

import methods
from harness import bench
from harness.codebook import files
from harness.testbed import model as M


def test_bench_rows_for_every_budgeted_method(tmp_path):
    torch.manual_seed(0)
    model, processor = M.build_model(M.TINY)
    names = methods.names()
    path = tmp_path / "cb.pt"
    files.save(path, torch.randn(10, model.config.text_config.hidden_size), ["s"] * 10, {})
    rows = bench.bench_model("tiny", model, processor, names, budgets=(64,), repeats=1,
                             params={"fastv": {"layer": 1}, "codebook_fixed": {"path": str(path)},
                                     "codebook": {"path": str(path)}})
    assert [r["method"] for r in rows] == [n for n in names if methods.get(n).uses_budget]
    for row in rows:
        assert row["speedup_predicted"] > 1  # 64 of 576 tokens: fewer operations, whatever the timer says
        assert row["selection_share"] >= 0 and row["prefill_ms"] > 0
        assert 0 < row["peak_memory_ratio"] < math.inf
    # FastV's attention row is one row, not a matrix: its peak stays under the unpruned one.
    assert next(r for r in rows if r["method"] == "fastv")["peak_memory_ratio"] < 1
    assert abs(rows[0]["realized_vs_predicted"] - rows[0]["speedup_realized"] / rows[0]["speedup_predicted"]) < 1e-9


def test_scaled_llava_has_the_stated_shape():
    model, _ = bench.scaled_llava()
    t, v = model.config.text_config, model.config.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size) == (512, 8, 1376, 32000)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (256, 6, 336, 14)
    assert t.num_key_value_heads == t.num_attention_heads  # LLaVA-1.5: full multi-head attention


def test_cpu_peak_memory_sees_a_transient_tensor():
    from harness.timing import peak_memory_mb

    def work():
        big = torch.ones(4 * 2 ** 20)  # 16 MiB, freed on return
        return float(big.sum())

    peak = peak_memory_mb(work, torch.device("cpu"))
    assert 16 <= peak < 17
