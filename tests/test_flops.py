"""Operation counts: fvcore on the real (pruned) forward, the analytic formula, torch's counter."""

import pytest
import torch

from harness.adapters import prune
from harness.metrics import flops as FL
from harness.testbed import model as M
from harness.testbed import questions as Q
from harness.testbed import world as W


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = M.build_model(M.TINY)
    sample = Q.make_sample("test", "color", 0)
    inputs = processor(images=[[W.render_pil(sample["scenes"][0])]], text=[M.format_prompt(sample["question"])],
                       return_tensors="pt")
    return model, inputs


@pytest.mark.parametrize("method,params", [("none", {}), ("random", {}), ("fastv", {"layer": 1})])
def test_counted_prefill_agrees_with_the_formula_and_torch(tiny, method, params):
    """fvcore and the analytic formula agree within 2% (in-LLM methods add their attention row and
    gathers); fvcore without SDPA equals torch's counter exactly (both count the same matmuls)."""
    model, inputs = tiny
    scope = lambda: prune(model, method, 64, **params)  # noqa: E731
    counts = FL.count_forward(model, inputs, scope)
    per_layer = FL.tokens_per_layer(model, inputs, scope)
    analytic = FL.prefill_analytic(model.config.text_config, per_layer)
    assert abs(counts["flops_prefill"] / analytic - 1) < 0.02
    assert counts["torch_comparable"]["prefill"] == FL.count_prefill_torch(model, inputs, scope)
    assert counts["flops_decode_per_token"] > 0


def test_vision_count_includes_every_vit_layer_that_runs(tiny):
    """LLaVA reads the penultimate ViT layer but HF runs them all: the count is what runs."""
    model, inputs = tiny
    counts = FL.count_forward(model, inputs)
    assert counts["torch_comparable"]["vision"] == FL.count_vision_torch(model, inputs)
    layer = model.config.vision_config
    n, d, m = (layer.image_size // layer.patch_size) ** 2 + 1, layer.hidden_size, layer.intermediate_size
    one_layer = n * (4 * d * d + 2 * d * m)  # projections and MLP of one ViT layer, without attention
    assert counts["torch_comparable"]["vision"] > layer.num_hidden_layers * one_layer


def test_pruning_changes_the_counts_where_it_acts(tiny):
    model, inputs = tiny
    full = FL.count_forward(model, inputs)
    n = inputs["input_ids"].shape[1]
    assert FL.tokens_per_layer(model, inputs) == [n, n]
    pre = FL.count_forward(model, inputs, lambda: prune(model, "random", 64))
    assert FL.tokens_per_layer(model, inputs, lambda: prune(model, "random", 64)) == [n - 512, n - 512]
    inllm = lambda: prune(model, "fastv", 64, layer=1)  # noqa: E731
    assert FL.tokens_per_layer(model, inputs, inllm) == [n, n - 512]
    assert pre["flops_vision"] == full["flops_vision"]  # pre-LLM pruning leaves the ViT alone
    assert pre["flops_prefill"] < FL.count_forward(model, inputs, inllm)["flops_prefill"] < full["flops_prefill"]
    assert pre["flops_decode_per_token"] < full["flops_decode_per_token"]  # a shorter KV cache


def test_analytic_formula_by_hand():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                      vocab_size=10)
    # per layer, n = 3: projections 3*8*(2*2*4 + 2*1*4) = 576; attention 2*9*2*4 = 144; MLP 3*3*8*16 = 1152
    assert FL.prefill_analytic(cfg, [3]) == 576 + 144 + 1152 + 8 * 10


def test_equivalent_tokens(tiny):
    model, inputs = tiny
    image = model.config.image_token_id
    per = lambda scope=None: FL.tokens_per_layer(model, inputs, scope)  # noqa: E731
    assert FL.equivalent_tokens(per(), inputs["input_ids"], image, 576) == 576
    assert FL.equivalent_tokens(per(lambda: prune(model, "random", 64)), inputs["input_ids"], image, 576) == 64
    fastv = per(lambda: prune(model, "fastv", 64, layer=1))  # K = 1 of L = 2
    assert FL.equivalent_tokens(fastv, inputs["input_ids"], image, 576) == (1 * 576 + 1 * 64) / 2
