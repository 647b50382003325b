"""`harness bench` on a tiny model: every budgeted method gets its ratios (timings not asserted)."""

import math

import pytest
import torch

import methods
from harness.bench import measure as bench
from harness.testbed import model as M
from methods import codebook_files as files

from default_methods import default_params, lvpruning_modules


def test_bench_rows_for_every_budgeted_method(tmp_path):
    torch.manual_seed(0)
    model, processor = M.build_model(M.TINY)
    names = methods.names()
    path = tmp_path / "cb.pt"
    files.save(path, torch.randn(10, model.config.text_config.hidden_size), ["s"] * 10, {})
    modules = lvpruning_modules(tmp_path / "lvpruning.safetensors", model.config)
    rows = bench.bench_model("tiny", model, processor, names, budgets=(64,), repeats=1,
                             params={n: default_params(n, path, modules) for n in names})
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
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size) == (1024, 8, 2752, 32000)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (512, 6, 336, 14)
    assert t.num_key_value_heads == t.num_attention_heads  # LLaVA-1.5: full multi-head attention
    # LLaVA-1.5-7B's head widths: 128 in the LLM, 64 in the ViT
    assert t.hidden_size // t.num_attention_heads == 128 and v.hidden_size // v.num_attention_heads == 64


def test_cost_model_is_llava_15_7b():
    from harness.bench import cost_model

    d = cost_model.LLAVA_15_7B
    assert (d.vision_hidden, d.vision_layers, d.vision_heads) == (1024, 24, 16)
    assert (d.text_hidden, d.text_layers, d.text_heads, d.text_kv_heads, d.text_intermediate) == (4096, 32, 32, 32, 11008)
    assert cost_model.VOCAB == 32000


def test_cost_model_extrapolates_from_measured_layers(monkeypatch, tmp_path):
    """On a small stand-in of the same structure: rows for every budgeted method, and the predicted
    speedup is the full-depth count (vision traced + extra ViT layers, analytic decoder layers)."""
    from harness.bench import cost_model
    from harness.metrics import flops

    small = M.ModelDims(vision_hidden=32, vision_layers=5, vision_heads=2, text_hidden=64, text_layers=7,
                        text_heads=4, text_kv_heads=4, text_intermediate=128)
    monkeypatch.setattr(cost_model, "LLAVA_15_7B", small)
    monkeypatch.setattr(cost_model, "VOCAB", 600)
    rows = cost_model.bench(["none", "random", "fastv"], (64,), repeats=1, output=tmp_path)
    assert [r["method"] for r in rows] == ["random", "fastv"]
    model, processor = cost_model.reduced_model()
    inputs = bench.prompt(processor)
    n = inputs["input_ids"].shape[1]
    cfg = model.config.text_config.__class__(**{**model.config.text_config.to_dict(), "num_hidden_layers": 7})
    vision = flops.count_forward(model, inputs, decode=False)["flops_vision"] + \
        3 * cost_model.vision_layer_macs(577, 32, 128)
    expected = {"random": (vision + flops.prefill_analytic(cfg, [n] * 7))
                / (vision + flops.prefill_analytic(cfg, [n - 576 + 64] * 7)),
                "fastv": (vision + flops.prefill_analytic(cfg, [n] * 7))
                / (vision + flops.prefill_analytic(cfg, [n] * 2 + [n - 576 + 64] * 5))}
    for row in rows:
        assert row["speedup_predicted"] == expected[row["method"]] and row["batch"] == 1
        # Timings only exist and are finite here: a tiny model's extrapolated parts are milliseconds of a loaded
        # machine's noise, so even their sign is not a property of the code (the real widths are `harness bench`'s).
        assert all(math.isfinite(row[k]) for k in ("prefill_ms", "prefill_ms_unpruned", "selection_share"))
    # A batch of identical rows: every part counted for each row (vision traced on both images), so the
    # predicted speedup is the one row's.
    batched = cost_model.bench(["random", "fastv"], (64,), repeats=1, output=tmp_path, batch=2)
    for row in batched:
        assert row["batch"] == 2 and row["speedup_predicted"] == pytest.approx(expected[row["method"]], rel=1e-9)


def test_bench_batches_identical_rows():
    """`harness bench --batch-size 2`: rows say their batch; two identical rows leave the operation
    ratio (the predicted speedup) as one row's."""
    torch.manual_seed(0)
    model, processor = M.build_model(M.TINY)
    one, two = (bench.bench_model("tiny", model, processor, ["random", "fastv"], budgets=(64,), repeats=1,
                                  params={"fastv": default_params("fastv")}, batch=b) for b in (1, 2))
    assert [r["batch"] for r in one + two] == [1, 1, 2, 2]
    for a, b in zip(one, two):
        assert b["speedup_predicted"] == pytest.approx(a["speedup_predicted"], rel=1e-9)


def test_cpu_peak_memory_sees_a_transient_tensor():
    from harness.metrics.timing import peak_memory_mb

    def work():
        big = torch.ones(4 * 2 ** 20)  # 16 MiB, freed on return
        return float(big.sum())

    peak = peak_memory_mb(work, torch.device("cpu"))
    assert 16 <= peak < 17


def test_decode_is_timed_token_by_token_in_one_generate():
    """The timing pass stamps each token as generate chooses it: 1 + k stamps for 1 + k tokens, and
    decode per token is the last stamp less the first, over k (no difference of two generates)."""
    from PIL import Image
    from transformers import StoppingCriteriaList

    from harness.metrics import timing

    torch.manual_seed(0)
    model, processor = M.build_model(M.TINY)
    inputs = processor(text=["USER: <image>\nWhat is here? ASSISTANT:"], images=[Image.new("RGB", (336, 336))],
                       return_tensors="pt")
    stamps: list[float] = []
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([timing._Stamp(stamps, torch.device("cpu"))]))
    assert len(stamps) == 5 and stamps == sorted(stamps)
    timed = timing.time_cell(model, inputs, repeats=3, decode_tokens=4)
    decode = timed["spread"]["decode_ms_per_token"]
    assert decode["n"] == 3 and 0 < decode["min"] <= timed["medians"]["decode_ms_per_token"] <= decode["max"]


# ---------------------------------------------------------------------- LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL
def test_architectures_have_the_stated_shape():
    """The checkpoints' widths and depths, read back from the configs the cost model builds at full depth."""
    from harness.bench import architectures as A
    from harness.testbed import tiny_families as TF

    tokenizers = {"llava-next-7b": TF.llava_tokenizer(), "qwen2-vl-7b": TF.qwen_tokenizer(),
                  "qwen2.5-vl-7b": TF.qwen_tokenizer()}
    configs = {name: arch.full_config(tokenizers[name]) for name, arch in A.ARCHITECTURES.items()}
    next_ = configs["llava-next-7b"]
    v, t = next_.vision_config, next_.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size, v.patch_size, next_.vision_feature_layer) == (336, 14, -2)
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == ("mistral", 4096, 32, 32, 8, 14336, 32064)
    assert next_.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b"):
        t = configs[name].text_config
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                t.intermediate_size, t.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
        assert t.rope_parameters["mrope_section"] == [16, 24, 24] and not configs[name].tie_word_embeddings
    v = configs["qwen2-vl-7b"].vision_config
    assert (v.embed_dim, v.depth, v.num_heads, v.mlp_ratio, v.hidden_size, v.patch_size) == (1280, 32, 16, 4, 3584, 14)
    v = configs["qwen2.5-vl-7b"].vision_config
    assert (v.hidden_size, v.depth, v.num_heads, v.intermediate_size, v.out_hidden_size) == (1280, 32, 16, 3420, 3584)
    assert (v.window_size, list(v.fullatt_block_indexes), v.hidden_act) == (112, [7, 15, 23, 31], "silu")
    arch = A.ARCHITECTURES["qwen2.5-vl-7b"]
    assert [arch.layer_kind(configs["qwen2.5-vl-7b"], i) for i in (6, 7, 31)] == ["window", "full", "full"]


def test_bench_images_give_the_stated_token_counts():
    """672x672: LLaVA-NeXT 576 + 48x48 + 48 newlines = 2928 image tokens (5 views); Qwen 24x24 = 576."""
    from harness.bench import architectures as A

    next_ = A.ARCHITECTURES["llava-next-7b"]
    processor = next_.processor(next_.dims)
    inputs = next_.prompt(processor)
    image = processor.tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image).sum()) == 2928
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 336, 336)
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b"):
        arch = A.ARCHITECTURES[name]
        processor = arch.processor(arch.dims)
        inputs = arch.prompt(processor)
        assert inputs["image_grid_thw"].tolist() == [[1, 48, 48]]
        assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 576


@pytest.mark.parametrize("name", ["llava-next-7b", "qwen2-vl-7b", "qwen2.5-vl-7b"])
def test_cost_model_runs_each_architecture(tmp_path, name):
    """A tiny instance of each architecture through the cost model: rows for pre-LLM and in-LLM methods,
    the prediction the full-depth count (the reduced vision counted + the missing ViT layers of each kind,
    analytic; every decoder layer analytic), times positive."""
    from harness.adapters import adapter_for, prune
    from harness.bench import architectures as A
    from harness.bench import cost_model
    from harness.metrics import flops

    arch = A.tiny(name)
    rows = cost_model.bench(["random", "fastv", "cls_attention"], (16,), repeats=1, output=tmp_path, arch=arch)
    # Qwen has no [CLS]: its adapter refuses cls_attention, which the bench leaves out (and says so)
    assert [r["method"] for r in rows] == ["random", "fastv"] + (["cls_attention"] if name == "llava-next-7b" else [])
    assert all(r["model"] == f"{name} (layer-extrapolated)" for r in rows)
    model, processor = arch.build()
    inputs = arch.prompt(processor)
    full = arch.full_config(processor.tokenizer)
    run = adapter_for(model).PruningRun
    vision = flops.count_forward(model, inputs, decode=False, vision_module=run.vision_module,
                                 projector_module=run.projector_module)["flops_vision"]
    vision += flops.vision_analytic(full, inputs) - flops.vision_analytic(model.config, inputs)
    assert flops.vision_analytic(full, inputs) > flops.vision_analytic(model.config, inputs)
    n = inputs["input_ids"].shape[1]
    kept = flops.tokens_per_layer(model, inputs, lambda: prune(model, "random", 16, record_ipr=False))[0]
    assert kept < n
    layers = full.text_config.num_hidden_layers
    base = vision + flops.prefill_analytic(full.text_config, [n] * layers)
    pre_llm = base / (vision + flops.prefill_analytic(full.text_config, [kept] * layers))
    expected = {"random": pre_llm, "cls_attention": pre_llm,
                "fastv": base / (vision + flops.prefill_analytic(full.text_config, [n] * 2 + [kept] * (layers - 2)))}
    for row in rows:
        assert row["speedup_predicted"] == pytest.approx(expected[row["method"]], rel=1e-12)
        # Timings only exist and are finite here: a tiny model's extrapolated parts are milliseconds of a loaded
        # machine's noise, so even their sign is not a property of the code (the real widths are `harness bench`'s).
        assert all(math.isfinite(row[k]) for k in ("prefill_ms", "prefill_ms_unpruned", "selection_share"))
