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
    per = lambda scope=None: FL.tokens_per_layer(model, inputs, scope)  # noqa: E731
    length = inputs["input_ids"].shape[1]
    assert FL.equivalent_tokens(per(), length, visual_tokens=576, images=1) == 576
    assert FL.equivalent_tokens(per(lambda: prune(model, "random", 64)), length, visual_tokens=576, images=1) == 64
    fastv = per(lambda: prune(model, "fastv", 64, layer=1))  # K = 1 of L = 2
    assert FL.equivalent_tokens(fastv, length, visual_tokens=576, images=1) == (1 * 576 + 1 * 64) / 2
    # Two images of 576 in a prompt of 20 text tokens, each kept to 64: 64 an image.
    assert FL.equivalent_tokens([20 + 128] * 3, 20 + 1152, visual_tokens=1152, images=2) == 64


# ------------------------------------------------------------------------------------- every family
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision")
QWEN_PATHS = {"vision_module": "model.visual", "projector_module": "model.visual.merger"}  # the merger is inside


def _paths(family: str) -> dict:
    return QWEN_PATHS if family.startswith("qwen") else {}


@pytest.fixture(scope="module")
def family_prompt():
    """family -> (tiny model, one testbed image and question through its processor), built once."""
    from harness.testbed import tiny_families as TF

    built = {}

    def get(family):
        if family not in built:
            model, processor = TF.build(family)
            sample = Q.make_sample("test", "color", 0)
            if family.startswith("qwen"):
                content = [{"type": "image"}, {"type": "text", "text": sample["question"]}]
                messages = [{"role": "user", "content": content}]
                text = processor.apply_chat_template(messages, add_generation_prompt=True)
            else:
                text = M.format_prompt(sample["question"])
            built[family] = model, processor(images=[W.render_pil(sample["scenes"][0])], text=[text],
                                             return_tensors="pt")
        return built[family]
    return get


def _layer_norm_macs(model, inputs, path: str) -> int:
    """What the counters charge the LayerNorms under `path` in one forward: 5 an element (fvcore's rule)."""
    seen = []
    handles = [m.register_forward_hook(lambda m, a, o: seen.append(5 * a[0].numel()))
               for m in model.get_submodule(path).modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        model(**inputs, use_cache=False, logits_to_keep=1)
    for handle in handles:
        handle.remove()
    return sum(seen)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_formula_is_the_counted_vision_less_norms(family_prompt, family):
    """The analytic vision of each family (LLaVA's tower + projector; NeXT's and OneVision's base view and
    crops; Qwen2-VL's patches, full attention and merger; Qwen2.5-VL's windows, SwiGLU and merger) equals
    what runs, as counted, less the norms, exactly."""
    model, inputs = family_prompt(family)
    counts = FL.count_forward(model, inputs, decode=False, counter="torch", **_paths(family))
    norms = sum(_layer_norm_macs(model, inputs, path) for path in
                ([QWEN_PATHS["vision_module"]] if family.startswith("qwen") else [FL.VISION, FL.PROJECTOR]))
    assert FL.vision_analytic(model.config, inputs) == counts["flops_vision"] - norms


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_counted_with_its_inputs_and_modules(family_prompt, family):
    """The processor's inputs (image_sizes, image_grid_thw, mm_token_type_ids) reach the model; a pre-LLM
    cut shows in prefill (exactly the formula at the counted layer sizes) and decode, never in vision."""
    model, inputs = family_prompt(family)
    full = FL.count_forward(model, inputs, **_paths(family))
    scope = lambda: prune(model, "random", 16, record_ipr=False)  # noqa: E731
    pruned = FL.count_forward(model, inputs, scope, **_paths(family))
    per_layer = FL.tokens_per_layer(model, inputs, scope)
    assert per_layer[0] < inputs["input_ids"].shape[1]
    assert pruned["flops_prefill"] == FL.prefill_analytic(model.config.text_config, per_layer)
    assert full["flops_prefill"] == FL.prefill_analytic(model.config.text_config, FL.tokens_per_layer(model, inputs))
    assert pruned["flops_vision"] == full["flops_vision"] > 0
    assert 0 < pruned["flops_decode_per_token"] < full["flops_decode_per_token"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method,params", [("none", {}), ("random", {}), ("fastv", {"layer": 1})])
def test_eager_counter_agrees_with_fvcore(family_prompt, family, method, params):
    """The eager counter (used where fvcore cannot trace: LLaVA-NeXT, OneVision) gives fvcore's numbers on the
    families both can count, pruned or not. One known difference: the trace drops dead code, CLIP's
    post-layernorm of the pooled [CLS] that LLaVA never reads (5 * Dv)."""
    model, inputs = family_prompt(family)
    scope = None if method == "none" else (lambda: prune(model, method, 16, record_ipr=False, **params))
    traced = FL.count_forward(model, inputs, scope, counter="fvcore", **_paths(family))
    eager = FL.count_forward(model, inputs, scope, counter="torch", **_paths(family))
    dead = 5 * model.config.vision_config.hidden_size if family == "llava" else 0
    assert eager["flops_vision"] - traced["flops_vision"] == dead
    assert {k: v for k, v in eager.items() if k != "flops_vision"} == \
        {k: v for k, v in traced.items() if k != "flops_vision"}


def test_wrong_module_path_is_one_clear_error(tiny):
    model, inputs = tiny
    with pytest.raises(ValueError, match="has no module 'model.visual'"):
        FL.count_forward(model, inputs, vision_module="model.visual")


def test_window_and_view_counts_match_transformers():
    """Qwen2.5-VL's windows and LLaVA-NeXT's views, against transformers' own functions."""
    from transformers import LlavaNextConfig
    from transformers.models.llava_next.modeling_llava_next import (
        image_size_to_num_patches,
    )
    from transformers.models.qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.vision_utils import get_vision_window_index

    vision = Qwen2_5_VLVisionConfig(hidden_size=1280, patch_size=14, spatial_merge_size=2, window_size=112)
    for h, w in [(48, 48), (50, 46), (16, 30)]:
        _, cu = get_vision_window_index(torch.tensor([[1, h, w]]), spatial_merge_size=2, window_size=112, patch_size=14)
        assert sorted(FL.qwen_windows(vision, h, w)) == sorted(cu.diff().tolist())
    assert FL.qwen_windows(vision, 48, 48) == [64] * 36  # a 672 px image: 6x6 windows of 8x8 patches
    config = LlavaNextConfig()  # llava-v1.6-mistral-7b's pinpoints, 336 px ViT
    for size in [(672, 672), (480, 640), (336, 1008), (200, 300), (1000, 1000)]:
        assert FL.anyres_views(config, size) == image_size_to_num_patches(size, config.image_grid_pinpoints, 336)
    assert FL.anyres_views(config, (672, 672)) == 5


def test_qwen_vision_formulas_by_hand():
    """Qwen2-VL-7B's and Qwen2.5-VL-7B's ViT on a 672 px image (48x48 patches, 576 merged tokens)."""
    from transformers.models.qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl import Qwen2VLVisionConfig

    n, d, out = 48 * 48, 1280, 3584
    embed = n * 3 * 2 * 14 * 14 * d  # Conv3d over 3 channels x 2 frames x 14 x 14
    merger = (n // 4) * (4 * d * 4 * d + 4 * d * out)  # 2x2 patches concatenated, MLP 4d -> 4d -> out
    layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * 4 * d
    assert FL.vision_qwen2_vl(Qwen2VLVisionConfig(), [(1, 48, 48)]) == embed + 32 * layer + merger
    v25 = Qwen2_5_VLVisionConfig(hidden_size=1280, intermediate_size=3420, out_hidden_size=out)
    full = 4 * n * d * d + 2 * n * n * d + 3 * n * d * 3420
    window = 4 * n * d * d + 2 * 36 * 64 * 64 * d + 3 * n * d * 3420
    assert FL.vision_qwen2_5_vl(v25, [(1, 48, 48)]) == embed + 4 * full + 28 * window + merger
