"""Operation counts of a LLaVA forward, pruned or not: counted on the real forward, and analytic.

Convention: multiply-accumulates (one multiply-add = 1), as fvcore counts and as the pruning
literature's formula does. `torch.utils.flop_counter` counts 2 per multiply-add; the cross-check
halves it.

Counted (`count_forward`): fvcore traces the real forward under the method's hooks, with a handle for
`aten::scaled_dot_product_attention` (which fvcore skips): B * H * Lq * Lk * (d_qk + d_v). Vision is
the ViT and the projector (every ViT layer that runs, the last one included although LLaVA reads the
penultimate: time is spent on it); prefill is the language model and the LM head on the last position (what
`generate` computes); decode per token is a second step over the cache, minus the first.

Analytic (`prefill_analytic`), per decoder layer with n tokens entering it, hidden d, FFN width m,
H query heads and G key/value heads of width h, vocabulary V:

    n*d*(2*H*h + 2*G*h)     Q, K, V and O projections (grouped-query attention: K, V have G heads)
  + n*n*H*h*2               Q.K^T and attention x V, over every key (as SDPA computes it)
  + 3*n*d*m                 SwiGLU MLP: gate, up and down projections

summed over the layers with each layer's own n (in-LLM methods change n at layer K), plus d*V for
the LM head at the last position. Norms, RoPE and softmax are left out (they are O(n*d)); the two
counts differ by those and by the image-token merge, and agree within 2% (tested).
"""

from __future__ import annotations

import contextlib
import warnings

import torch


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


def _sdpa_handle(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, lq, dqk = q
    lk, dv = k[-2], v[-1]
    n = 1
    for b in batch:
        n *= b
    return n * lq * lk * (dqk + dv)


class _Forward(torch.nn.Module):
    """The traced callable: prefill (LM head on the last position), optionally one decode step."""

    def __init__(self, model, decode: bool):
        super().__init__()
        self.model, self.decode = model, decode

    def forward(self, input_ids, pixel_values, attention_mask):
        # The ViT's last layer runs although LLaVA reads an earlier one: returning its output keeps
        # the trace from dropping it as dead code, so vision counts what is executed.
        tower_out = []
        handle = self.model.model.vision_tower.register_forward_hook(lambda m, a, o: tower_out.append(o[0]))
        try:
            out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             use_cache=self.decode, logits_to_keep=1)
        finally:
            handle.remove()
        if not self.decode:
            return out.logits, *tower_out
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
        step = self.model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values,
                          use_cache=True, logits_to_keep=1)
        return step.logits, *tower_out


def _fvcore(model, inputs, decode: bool):
    from fvcore.nn import FlopCountAnalysis

    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values baked into the trace
        analysis = FlopCountAnalysis(_Forward(model, decode), args)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.by_module(), analysis.by_module_and_operator()


def count_forward(model, inputs, pruning=None, decode: bool = True) -> dict[str, int]:
    """fvcore counts of one batch (normally one sample): vision, prefill and decode per token
    (`decode=False` skips the second trace that decoding needs, and leaves that count out).

    `pruning` is a context manager factory (e.g. `lambda: prune(model, method, budget)`) applied
    around each traced forward, so the counts are those of the pruned model.
    """
    scope = pruning or contextlib.nullcontext
    with torch.no_grad(), scope():
        one, operators = _fvcore(model, inputs, decode=False)
    # What torch's counter also counts: fvcore's total less SDPA (torch counts no CPU SDPA kernel) and
    # the norms fvcore counts (torch counts none).
    matmuls = {name: sum(v for op, v in operators.get(f"model.{name}", {}).items()
                         if op not in ("scaled_dot_product_attention", "layer_norm"))
               for name in ("model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head")}
    vision = one["model.model.vision_tower"] + one["model.model.multi_modal_projector"]
    prefill = one["model.model.language_model"] + one["model.lm_head"]
    counts = {"flops_vision": int(vision), "flops_prefill": int(prefill),
              "torch_comparable": {"vision": matmuls["model.vision_tower"] + matmuls["model.multi_modal_projector"],
                                   "prefill": matmuls["model.language_model"] + matmuls["lm_head"]}}
    if decode:
        with torch.no_grad(), scope():
            two, _ = _fvcore(model, inputs, decode=True)
        counts["flops_decode_per_token"] = int(two["model.model.language_model"] + two["model.lm_head"] - prefill)
    return counts


def count_vision_torch(model, inputs) -> int:
    """Cross-check of the vision count: `torch.utils.flop_counter` over the ViT (every layer it
    runs) and the projector, in MACs: compare with `count_forward(...)["torch_comparable"]["vision"]`."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(pixel_values=inputs["pixel_values"])
    return int(counter.get_total_flops()) // 2


def count_prefill_torch(model, inputs, pruning=None) -> int:
    """Cross-check of the prefill count: `torch.utils.flop_counter` over the language model and the
    LM head, in MACs: compare with `count_forward(...)["torch_comparable"]["prefill"]`."""
    from torch.utils.flop_counter import FlopCounterMode

    scope = pruning or contextlib.nullcontext
    with torch.no_grad(), scope(), FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=False, logits_to_keep=1)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in ("model.language_model", "lm_head")) // 2


def tokens_per_layer(model, inputs, pruning=None) -> list[int]:
    """Tokens entering each decoder layer in one prefill (read with hooks on the layers)."""
    seen: list[int] = []
    layers = model.model.language_model.layers
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


def equivalent_tokens(per_layer: list[int], input_ids, image_token_id: int, tokens_per_image: int) -> float:
    """Visual tokens per image the decoder processes, averaged over its layers (one prompt):
    (1/L) * sum_l (n_l - text tokens) / images. Pre-LLM methods: their budget; in-LLM methods that
    keep k of N from layer K of L: (K*N + (L-K)*k) / L; unpruned: N."""
    n_visual = int((input_ids == image_token_id).sum())
    n_images = max(1, n_visual // tokens_per_image)
    text = input_ids.shape[1] - n_visual
    return sum(n - text for n in per_layer) / len(per_layer) / n_images
