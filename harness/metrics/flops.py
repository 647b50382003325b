"""Operation counts of a multimodal forward, pruned or not: counted on the real forward, and analytic.

Convention: multiply-accumulates (one multiply-add = 1), as fvcore counts and as the pruning
literature's formula does. `torch.utils.flop_counter` counts 2 per multiply-add; the cross-checks
halve it.

Counted (`count_forward`): the real forward runs under the method's hooks and its operations are
counted per module. Vision is the vision encoder and the projector (every ViT layer that runs, the last
one included although LLaVA reads the penultimate: time is spent on it; Qwen's merger is inside its
encoder); prefill is the language model and the LM head on the last position (what `generate`
computes); decode per token is one step over the cache. The module paths come from the caller (the
family adapter's `vision_module` / `projector_module`), every tensor of the processor's output goes in.
Two counters, the same convention:

- fvcore traces the forward (TorchScript trace), with a handle for `aten::scaled_dot_product_attention`
  (which fvcore skips): B * H * Lq * Lk * (d_qk + d_v). LLaVA-1.5 and Qwen2-VL / 2.5-VL.
- LLaVA-NeXT and LLaVA-OneVision cannot be traced: their `unpad_image` computes with tensor shapes,
  which the tracer turns into tensors (`round(Tensor)` fails). They run eagerly under
  `torch.utils.flop_counter` with fvcore's rules added (`_fvcore_conventions`: the CPU SDPA kernel by the
  formula above, layer norms 5 per element, bilinear resizing 4 per output element), each operation
  credited to the module whose `forward` runs it, as the trace credits it (`_Scoped`: a pruning hook's
  own work goes to the calling module). The two counters agree exactly on LLaVA-1.5 and Qwen2-VL, pruned
  or not, but for dead code the trace drops: CLIP's post-layernorm of the pooled [CLS], 5*Dv (tested).

Analytic prefill (`prefill_analytic`), per decoder layer with n tokens entering it, hidden d, FFN width
m, H query heads and G key/value heads of width h, vocabulary V:

    n*d*(2*H*h + 2*G*h)     Q, K, V and O projections (grouped-query attention: K, V have G heads)
  + n*n*H*h*2               Q.K^T and attention x V, over every key (as SDPA computes it)
  + 3*n*d*m                 SwiGLU MLP: gate, up and down projections

summed over the layers with each layer's own n (in-LLM methods change n at layer K), plus d*V for
the LM head at the last position. Norms, RoPE and softmax are left out (they are O(n*d)); the two
counts differ by those and by the image-token merge, and agree within 2% (tested). The same formula
holds for every family's decoder (Llama, Mistral, Qwen2); what differs is n, which the vision side sets.

Analytic vision (`vision_analytic`, per family below): ViT layers by `vit_layer_macs`, the patch
embedding and the projector / merger; norms and position embeddings left out. Each equals the counted
vision operations less the norms exactly on tiny models of every family (tested).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

#: the language model and the LM head, as paths from the model: the same in every family
LANGUAGE_MODEL, LM_HEAD = "model.language_model", "lm_head"
#: LLaVA's vision encoder and projector (the defaults; Qwen: "model.visual" with the merger inside it)
VISION, PROJECTOR = "model.vision_tower", "model.multi_modal_projector"
#: model_type -> why fvcore's trace cannot follow its forward (counted eagerly instead)
UNTRACEABLE = {
    "llava_next": "unpad_image computes with tensor shapes, which a TorchScript trace makes tensors",
    "llava_onevision": "unpad_image computes with tensor shapes, which a TorchScript trace makes tensors",
}


def prefill_analytic(text_config, tokens_per_layer: list[int]) -> int:
    """The formula above, for the given number of tokens entering each decoder layer."""
    d = text_config.hidden_size
    m = text_config.intermediate_size
    heads = text_config.num_attention_heads
    kv = text_config.num_key_value_heads
    h = getattr(text_config, "head_dim", None) or d // heads
    total = 0
    for n in tokens_per_layer:
        total += n * d * (2 * heads * h + 2 * kv * h) + 2 * n * n * heads * h + 3 * n * d * m
    return total + d * text_config.vocab_size


# ----------------------------------------------------------------------------------------------- vision
def vit_layer_macs(segments: list[int], d: int, m: int, gated: bool = False) -> int:
    """One pre-norm ViT layer over n = sum(segments) tokens, each segment attending only within itself
    (an image or view; a frame; a Qwen2.5-VL window):

        4*n*d*d                 Q, K, V and O projections (full multi-head: K, V as wide as Q)
      + 2*d * sum(s*s)          Q.K^T and attention x V within each segment of s tokens
      + 2*n*d*m  or  3*n*d*m    MLP: fc1, fc2 (GELU) or gate, up, down (SwiGLU, `gated`)
    """
    n = sum(segments)
    return 4 * n * d * d + 2 * d * sum(s * s for s in segments) + (3 if gated else 2) * n * d * m


def _llava_view(config) -> int:
    """One view (image or crop) through a LLaVA-style tower: the patch embedding (3*p*p*Dv a patch), every
    ViT layer over the patches (+ [CLS] for CLIP) and the 2-layer projector over the tokens it reads
    (`vision_feature_select_strategy` "default" drops [CLS]): P*(Dv*k*D + D*D), k feature layers."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    n = patches + (1 if v.model_type.startswith("clip") else 0)  # SigLIP (OneVision) has no [CLS]
    read = patches if config.vision_feature_select_strategy == "default" else n
    layers = config.vision_feature_layer
    k = len(layers) if isinstance(layers, (list, tuple)) else 1
    d, big = v.hidden_size, config.text_config.hidden_size
    embed = patches * v.num_channels * v.patch_size ** 2 * d
    return embed + v.num_hidden_layers * vit_layer_macs([n], d, v.intermediate_size) + read * (d * k * big + big * big)


def anyres_views(config, image_size) -> int:
    """LLaVA-NeXT / OneVision: views the ViT runs for an image of (height, width): the base view plus the
    crops of the pinpoint resolution that fits it best (transformers' `select_best_resolution`; crops of
    the ViT's input size: `image_size_to_num_patches`, models/llava_next/modeling_llava_next.py:73, and
    `select_best_resolution`, image_processing_utils.py:642, in transformers 5.23)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(tuple(int(x) for x in image_size), config.image_grid_pinpoints)
    crop = config.vision_config.image_size
    return 1 + math.ceil(height / crop) * math.ceil(width / crop)


def vision_llava(config, views: int = 1) -> int:
    """LLaVA-1.5: `views` images of one view each (the tower, every layer run, then the projector on the
    feature layer's patches: `get_image_features`, transformers 5.23 models/llava/modeling_llava.py:146)."""
    return views * _llava_view(config)


def vision_llava_next(config, image_sizes, video_frames: int = 0) -> int:
    """LLaVA-NeXT / OneVision: every view of every image through the ViT and the projector (base + crops,
    `anyres_views`; 5 views of 577 tokens for a 672x672 image on LLaVA-NeXT-7B); the projector runs
    on all of them before unpadding (transformers 5.23 models/llava_next/modeling_llava_next.py:339
    `get_image_features`, then :266 `pack_image_features`, :110 `unpad_image`). Unpadding and the newline
    tokens add no multiply-adds (a slice and a concatenated parameter); they set the LLM's count:
    576 + 48*48 + 48 = 2928 for 672x672.
    OneVision's frames are one view each (`video_frames`); its pooling and anyres_max resizing are left out."""
    return (sum(anyres_views(config, size) for size in image_sizes) + video_frames) * _llava_view(config)


def _qwen_common(v, width: int, out: int, grid) -> tuple[int, int]:
    """(patch embedding, merger) of one Qwen image or video: Conv3d over 3 x temporal_patch x p x p a patch
    (an image is its frame twice), and the merger: each 2x2 group of patches concatenated (4*Dv), an
    MLP 4*Dv -> 4*Dv -> D (transformers 5.23: PatchMerger, models/qwen2_vl/modeling_qwen2_vl.py:279;
    Qwen2_5_VLPatchMerger, models/qwen2_5_vl/modeling_qwen2_5_vl.py:180)."""
    t, h, w = (int(x) for x in grid)
    n = t * h * w
    unit = v.spatial_merge_size ** 2
    embed = n * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * width
    merger = (n // unit) * ((unit * width) ** 2 + unit * width * out)
    return embed, merger


def vision_qwen2_vl(vision_config, grid_thw) -> int:
    """Qwen2-VL: the ViT on every 14x14 patch (4x the LLM's visual tokens), full attention within each
    frame (`get_vision_cu_seqlens`, vision_utils.py:42: one segment of h*w per frame), GELU MLP of
    mlp_ratio*Dv, then the 2x2 merger (`_qwen_common`). transformers 5.23 models/qwen2_vl/modeling_qwen2_vl.py:681
    (`Qwen2VisionTransformerPretrainedModel.forward`), :344 (its attention, one SDPA call per segment)."""
    v = vision_config
    d = v.embed_dim
    total = 0
    for t, h, w in (tuple(int(x) for x in g) for g in grid_thw):
        embed, merger = _qwen_common(v, d, v.hidden_size, (t, h, w))  # Qwen2-VL's name for the output width
        total += embed + merger + v.depth * vit_layer_macs([h * w] * t, d, int(d * v.mlp_ratio))
    return total


def qwen_windows(vision_config, h: int, w: int) -> list[int]:
    """Patches in each attention window of one frame of h x w patches (Qwen2.5-VL): windows of
    window_size px = window_size / (merge * patch) merged tokens a side (112 px: 4 merged, 8x8 patches),
    tiled from the top left, the last row and column cut short (`get_vision_window_index`, transformers 5.23
    vision_utils.py:130; tested against it)."""
    merge = vision_config.spatial_merge_size
    side = vision_config.window_size // merge // vision_config.patch_size
    gh, gw = h // merge, w // merge
    return [min(side, gh - i) * min(side, gw - j) * merge * merge
            for i in range(0, gh, side) for j in range(0, gw, side)]


def vision_qwen2_5_vl(vision_config, grid_thw) -> int:
    """Qwen2.5-VL: as Qwen2-VL, but the layers in `fullatt_block_indexes` attend over the whole frame and
    the others within windows (`qwen_windows`), and the MLP is SwiGLU of intermediate_size
    (transformers 5.23 models/qwen2_5_vl/modeling_qwen2_5_vl.py:382 `Qwen2_5_VisionTransformerPretrainedModel`,
    its forward choosing full or windowed segments per layer; :79 the SwiGLU MLP; its norms are RMSNorm)."""
    v = vision_config
    d = v.hidden_size
    full_layers = sum(1 for i in range(v.depth) if i in set(v.fullatt_block_indexes))
    total = 0
    for t, h, w in (tuple(int(x) for x in g) for g in grid_thw):
        embed, merger = _qwen_common(v, d, v.out_hidden_size, (t, h, w))
        full = vit_layer_macs([h * w] * t, d, v.intermediate_size, gated=True)
        windowed = vit_layer_macs(qwen_windows(v, h, w) * t, d, v.intermediate_size, gated=True)
        total += embed + merger + full_layers * full + (v.depth - full_layers) * windowed
    return total


def vision_analytic(config, inputs) -> int:
    """The analytic vision operations of one batch (a processor's output) on a model of `config`,
    by its family (`config.model_type`)."""
    family = config.model_type
    if family in ("qwen2_vl", "qwen2_5_vl"):
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
                 for g in inputs[key].tolist()]
        fn = vision_qwen2_vl if family == "qwen2_vl" else vision_qwen2_5_vl
        return fn(config.vision_config, grids)
    if family in ("llava_next", "llava_onevision"):
        sizes = inputs["image_sizes"].tolist() if inputs.get("image_sizes") is not None else []
        videos = inputs.get("pixel_values_videos")
        frames = 0 if videos is None else videos.shape[0] * videos.shape[1]
        return vision_llava_next(config, sizes, frames)
    if family == "llava":
        return vision_llava(config, inputs["pixel_values"].shape[0])
    raise ValueError(f"no analytic vision formula for model_type {family!r}")


# --------------------------------------------------------------------------------------------- counted
def _sdpa_handle(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, lq, dqk = q
    lk, dv = k[-2], v[-1]
    n = 1
    for b in batch:
        n *= b
    return n * lq * lk * (dqk + dv)


def _torch_sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _torch_norm(x, normalized_shape, weight=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x) * (5 if weight is not None else 4)


def _torch_resize(*args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * math.prod(out_shape)


def _fvcore_conventions() -> dict:
    """torch.utils.flop_counter formulas (2 per multiply-add) for what fvcore counts and torch does not."""
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: _torch_sdpa, aten.native_layer_norm: _torch_norm,
            aten.upsample_bilinear2d: _torch_resize}


#: fvcore's operators torch's counter leaves out: subtracted for the cross-check (`torch_comparable`)
_NOT_IN_TORCH = ("scaled_dot_product_attention", "layer_norm", "upsample_bilinear2d")


def _cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config())


def _next_step(model, out, attention_mask) -> dict:
    """One decoding step's inputs after a prefill `out`: the chosen token, the mask one longer and the
    token's position as `generate` gives it (passed: Qwen, given none, would number the whole mask)."""
    nxt = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
    positions = mask.long().sum(-1, keepdim=True) - 1
    deltas = getattr(model.model, "rope_deltas", None)
    if deltas is not None:  # M-RoPE (Qwen): the prefill's offset added, one row (1, B, 1)
        positions = (positions + deltas)[None]
    return {"input_ids": nxt, "attention_mask": mask, "past_key_values": out.past_key_values,
            "position_ids": positions}


class _Forward(torch.nn.Module):
    """The traced callable: prefill (LM head on the last position), optionally one decode step."""

    def __init__(self, model, decode: bool, keys, constants: dict, vision_module: str):
        super().__init__()
        self.model, self.decode, self.keys, self.constants = model, decode, tuple(keys), constants
        self.vision_module = vision_module

    def forward(self, *tensors):
        inputs = dict(zip(self.keys, tensors), **self.constants)
        # The ViT's last layer runs although LLaVA reads an earlier one: returning its output keeps
        # the trace from dropping it as dead code, so vision counts what is executed.
        tower_out = []
        tower = self.model.get_submodule(self.vision_module)
        handle = tower.register_forward_hook(lambda m, a, o: tower_out.append(o[0]))
        try:  # a cache of our own: Qwen's text model makes none while tracing
            out = self.model(**inputs, use_cache=self.decode, logits_to_keep=1,
                             past_key_values=_cache(self.model) if self.decode else None)
        finally:
            handle.remove()
        if not self.decode:
            return out.logits, *tower_out
        step = self.model(**_next_step(self.model, out, inputs["attention_mask"]), use_cache=True, logits_to_keep=1)
        return step.logits, *tower_out


def _fvcore(model, inputs, decode: bool, vision_module: str):
    """fvcore's (by module, by module and operator), keyed by paths from the model."""
    from fvcore.nn import FlopCountAnalysis

    keys = [k for k, v in inputs.items() if torch.is_tensor(v)]  # traced; anything else is a constant
    constants = {k: v for k, v in inputs.items() if k not in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values baked into the trace
        analysis = FlopCountAnalysis(_Forward(model, decode, keys, constants, vision_module),
                                     tuple(inputs[k] for k in keys))
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_module, by_operator = analysis.by_module(), analysis.by_module_and_operator()
    # The traced wrapper holds the model as `.model`: names without that prefix are paths from the model.
    return ({k.removeprefix("model."): v for k, v in by_module.items() if k.startswith("model.")},
            {k.removeprefix("model."): v for k, v in by_operator.items() if k.startswith("model.")})


class _Scoped:
    """torch.utils.flop_counter's counts attributed as fvcore's trace attributes them: each operation to the
    innermost module whose `forward` is running (not its hooks: a pruning hook's own work belongs to the
    caller's module, as in the trace), totalled over each module's path prefix. Hooks registered inside the
    pruning scope bracket `forward` only: pre-hooks run after the adapter's, post-hooks before them."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False, custom_mapping=_fvcore_conventions())
        self.stack, self.last, self.innermost = [""], {}, {}
        self.handles = []
        for name, module in self.model.named_modules():
            if name:
                self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._move(name)))
                self.handles.append(module.register_forward_hook(lambda m, a, o: self._move(None), prepend=True))
        self.mode.__enter__()
        return self

    def _flush(self):
        """Credit what ran since the last flush to the module on top of the stack."""
        top = self.innermost.setdefault(self.stack[-1], {})
        for op, v in self.mode.flop_counts["Global"].items():
            if v != self.last.get(op, 0):
                top[op] = top.get(op, 0) + v - self.last.get(op, 0)
                self.last[op] = v

    def _move(self, entering):
        """At a module's forward boundary: flush, then enter `entering` (None: leave the top one)."""
        self._flush()
        if entering is None:
            self.stack.pop()
        else:
            self.stack.append(entering)

    def __exit__(self, *exc):
        self._flush()
        self.mode.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        return False

    def counts(self, paths) -> tuple[dict, dict]:
        """(by module, by module and operator) for `paths`, in multiply-adds (torch counts 2 per)."""
        by_operator = {}
        for path in paths:
            ops: dict[str, int] = {}
            for name, counted in self.innermost.items():
                if name == path or name.startswith(path + "."):
                    for op, v in counted.items():
                        key = str(op).removeprefix("aten.")
                        ops[key] = ops.get(key, 0) + v // 2
            by_operator[path] = ops
        return {k: sum(v.values()) for k, v in by_operator.items()}, by_operator


def _eager(model, inputs, decode: bool, scope, paths):
    """The prefill's counts and, with `decode`, one decode step's, counted eagerly in one pruning scope."""
    with torch.no_grad(), scope():
        with _Scoped(model) as first:
            out = model(**inputs, use_cache=decode, logits_to_keep=1)
        step = None
        if decode:
            with _Scoped(model) as step:
                model(**_next_step(model, out, inputs["attention_mask"]), use_cache=True, logits_to_keep=1)
    return first.counts(paths), None if step is None else step.counts(paths)[0]


def count_forward(model, inputs, pruning=None, decode: bool = True, vision_module: str = VISION,
                  projector_module: str = PROJECTOR, counter: str | None = None) -> dict[str, int]:
    """Counts of one batch (normally one sample): vision, prefill and decode per token (`decode=False`
    skips the decoding step, and leaves that count out).

    `inputs`: the processor's output, every entry passed to the model (image_sizes, image_grid_thw,
    mm_token_type_ids included). `vision_module`, `projector_module`: paths from the model (the family
    adapter's `vision_module` / `projector_module`); a projector inside the vision module (Qwen's merger)
    is counted once. `pruning` is a context manager factory (e.g. `lambda: prune(model, method, budget)`)
    applied around each forward, so the counts are those of the pruned model. `counter`: "fvcore" or
    "torch"; by default fvcore, and torch for the families in `UNTRACEABLE`.
    """
    counter = counter or ("torch" if model.config.model_type in UNTRACEABLE else "fvcore")
    if counter not in ("fvcore", "torch"):
        raise ValueError(f"counter must be 'fvcore' or 'torch', got {counter!r}")
    vision_parts = [vision_module] + ([] if projector_module.startswith(vision_module + ".") else [projector_module])
    for path in vision_parts:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {path!r}: pass the family adapter's "
                             "vision_module and projector_module") from None
    scope = pruning or contextlib.nullcontext
    if counter == "fvcore":
        with torch.no_grad(), scope():
            one, operators = _fvcore(model, inputs, decode=False, vision_module=vision_module)
        not_in_torch = _NOT_IN_TORCH
    else:
        (one, operators), step = _eager(model, inputs, decode, scope, (*vision_parts, LANGUAGE_MODEL, LM_HEAD))
        not_in_torch = tuple(str(op).removeprefix("aten.") for op in _fvcore_conventions())
    # What torch's counter alone counts: the total less SDPA (torch counts no CPU SDPA kernel) and the
    # norms and resizing fvcore counts (torch counts none).
    matmuls = {name: sum(v for op, v in operators.get(name, {}).items() if op not in not_in_torch)
               for name in (*vision_parts, LANGUAGE_MODEL, LM_HEAD)}
    prefill = one.get(LANGUAGE_MODEL, 0) + one.get(LM_HEAD, 0)
    counts = {"flops_vision": int(sum(one.get(name, 0) for name in vision_parts)), "flops_prefill": int(prefill),
              "torch_comparable": {"vision": sum(matmuls[name] for name in vision_parts),
                                   "prefill": matmuls[LANGUAGE_MODEL] + matmuls[LM_HEAD]}}
    if decode and counter == "fvcore":
        with torch.no_grad(), scope():
            two, _ = _fvcore(model, inputs, decode=True, vision_module=vision_module)
        counts["flops_decode_per_token"] = int(two[LANGUAGE_MODEL] + two[LM_HEAD] - prefill)
    elif decode:
        counts["flops_decode_per_token"] = int(step.get(LANGUAGE_MODEL, 0) + step.get(LM_HEAD, 0))
    return counts


def count_vision_torch(model, inputs, vision_module: str = VISION, projector_module: str = PROJECTOR) -> int:
    """Cross-check of the vision count: `torch.utils.flop_counter` over the vision encoder (every layer
    it runs) and the projector during one forward, in MACs: compare with
    `count_forward(...)["torch_comparable"]["vision"]`."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=False, logits_to_keep=1)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    parts = [vision_module] + ([] if projector_module.startswith(vision_module + ".") else [projector_module])
    return sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in parts) // 2


def count_prefill_torch(model, inputs, pruning=None) -> int:
    """Cross-check of the prefill count: `torch.utils.flop_counter` over the language model and the
    LM head, in MACs: compare with `count_forward(...)["torch_comparable"]["prefill"]`."""
    from torch.utils.flop_counter import FlopCounterMode

    scope = pruning or contextlib.nullcontext
    with torch.no_grad(), scope(), FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=False, logits_to_keep=1)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in (LANGUAGE_MODEL, LM_HEAD)) // 2


def tokens_per_layer(model, inputs, pruning=None) -> list[int]:
    """Tokens entering each decoder layer in one prefill (read with hooks on the layers)."""
    seen: list[int] = []
    layers = model.get_submodule(LANGUAGE_MODEL).layers
    scope = pruning or contextlib.nullcontext
    with torch.no_grad(), scope():
        # Registered inside the pruning scope, after its hooks: they see what each layer receives.
        handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1]), with_kwargs=True)
                   for layer in layers]
        try:
            model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
    return seen


def equivalent_tokens(per_layer: list[int], sequence_length: int, *, visual_tokens: int, images: int) -> float:
    """Visual tokens per image the decoder processes, averaged over its layers (one prompt of
    `sequence_length` tokens holding `images` images of `visual_tokens` prunable tokens in all; what is
    not prunable counts as text, e.g. LLaVA-NeXT's newlines): (1/L) * sum_l (n_l - text) / images.
    Pre-LLM methods: their budget; in-LLM methods that keep k of N from layer K of L:
    (K*N + (L-K)*k) / L; unpruned: N."""
    text = sequence_length - visual_tokens
    return sum(n - text for n in per_layer) / len(per_layer) / max(1, images)
