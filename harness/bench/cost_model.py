"""LLaVA-1.5-7B's prefill cost on this machine, from its real layer shapes (`harness bench`).

The whole model (7B parameters) does not fit this CPU's time budget, but its cost is a sum over
layers of identical shape. So a model of LLaVA-1.5-7B's exact widths (`LLAVA_15_7B`: CLIP ViT-L/14-336
1024 wide, Llama 4096 wide with 32 heads and MLP 11008, vocabulary 32000) is built with only
`VISION_LAYERS` ViT and `TEXT_LAYERS` decoder layers, random weights. Each method runs on it through
the adapter, so its selection is timed on real-size inputs (576 tokens of width 4096, ViT-L's
[CLS] attention). One decoder layer and one ViT layer are timed alone at the token counts the cell
has, in turns with the cell's reduced prefill (`round_robin_ms`: this machine's speed drifts by up
to 20% within a session, and a ratio of figures timed minutes apart would carry it). The full-depth
prefill is then

    T_full = T_reduced + (24 - VISION_LAYERS) * t_vit + sum over decoder layers l >= TEXT_LAYERS of t_dec(n_l)

where T_reduced is the reduced model's measured pruned prefill (embedding, projector, selection,
hooks and LM head included) and n_l the tokens entering layer l (an in-LLM method's pruned count
from its layer on). The unpruned T_full is built the same way from the pruned run's parts outside
the layers. The predicted speedup uses the same depths: fvcore's count of the reduced vision part
plus the analytic count of the extra ViT layers, and `flops.prefill_analytic` over all 32 decoder
layers (the selection's own operations are not in the prediction: its time is in the realized one). These are extrapolations from measured layers, labelled as such, not an end-to-end run.
"""

from __future__ import annotations

import statistics

import torch

from harness.testbed import model as M

LLAVA_15_7B = M.ModelDims(vision_hidden=1024, vision_layers=24, vision_heads=16, text_hidden=4096, text_layers=32,
                          text_heads=32, text_kv_heads=32, text_intermediate=11008)
VOCAB = 32000
VISION_LAYERS = 2  # the penultimate layer needs two; both run
TEXT_LAYERS = 3  # FastV's default K = 2 needs a layer after it
NAME = "llava-1.5-7b (layer-extrapolated)"


def reduced_model():
    """LLaVA-1.5-7B's widths with VISION_LAYERS ViT and TEXT_LAYERS decoder layers, random weights."""
    import dataclasses

    from .models import random_llava

    return random_llava(dataclasses.replace(LLAVA_15_7B, vision_layers=VISION_LAYERS, text_layers=TEXT_LAYERS),
                        VOCAB)


def round_robin_ms(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Each callable timed `repeats` times, taking turns run by run (after `warmup` untimed rounds),
    so that drift in the machine's speed (20% within a session here) reaches every figure alike."""
    import time

    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - started) * 1000)
    return times


def decoder_layer(model, n: int, batch: int = 1):
    """A callable running one decoder layer on `batch` rows of n tokens (causal attention, as in a prefill)."""
    lm = model.model.language_model
    hidden = torch.randn(batch, n, lm.config.hidden_size)
    positions = torch.arange(n)[None]
    rope = lm.rotary_emb(hidden, positions)

    @torch.no_grad()
    def run():
        lm.layers[0](hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
    return run


def vision_layer(model, batch: int = 1):
    """A callable running one ViT layer on the 577 tokens of each of `batch` images."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # transformers 4.x nests the transformer one level down
    hidden = torch.randn(batch, tower.embeddings.num_positions, tower.config.hidden_size)

    @torch.no_grad()
    def run():
        tower.encoder.layers[0](hidden, attention_mask=None)
    return run


def vision_layer_macs(n: int, d: int, m: int) -> int:
    """One ViT layer in multiply-accumulates: Q, K, V, O projections, attention, the 2-layer MLP."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def bench(method_names, budgets, repeats: int, output, progress=None, batch: int = 1) -> list[dict]:
    """Rows like `bench.bench_model`'s, for LLaVA-1.5-7B extrapolated from its layers (the codebook
    methods with a random stand-in codebook of the shipped one's size, in `output`), on `batch`
    identical rows (operations are counted for all of them, as times are measured)."""
    from harness.metrics import flops

    from .models import cells, codebook_params, prompt

    model, processor = reduced_model()
    inputs = prompt(processor, batch)
    grid = cells(model, method_names, budgets, codebook_params(model, method_names, output))
    text_config = model.config.text_config
    full = LLAVA_15_7B
    n_image = model.config.image_seq_length
    n_text = inputs["input_ids"].shape[1] - n_image
    extra_vit_macs = batch * (full.vision_layers - VISION_LAYERS) * vision_layer_macs(
        n_image + 1, full.vision_hidden, 4 * full.vision_hidden)
    vision_ops = flops.count_forward(model, inputs, decode=False)["flops_vision"] + extra_vit_macs
    full_config = text_config.__class__(**{**text_config.to_dict(), "num_hidden_layers": full.text_layers})
    n_full = n_text + n_image
    base_ops = vision_ops + batch * flops.prefill_analytic(full_config, [n_full] * full.text_layers)
    vit = vision_layer(model, batch)
    rows = []
    for method, budget, scope in grid:
        per_layer = flops.tokens_per_layer(model, inputs, scope)
        per_layer_full = per_layer + [per_layer[-1]] * (full.text_layers - len(per_layer))
        selection = []

        def pruned_prefill():
            with torch.no_grad(), scope() as run:
                model(**inputs, use_cache=True, logits_to_keep=1)
            selection.append(1000 * run.selection_seconds)

        # The cell's parts, timed in turns: its reduced prefill, one ViT layer, one decoder layer at
        # every token count its layers see and at the unpruned count.
        parts = {"prefill": pruned_prefill, "vit": vit} | {n: decoder_layer(model, n, batch) for n in {n_full, *per_layer_full}}
        med = {k: statistics.median(v) for k, v in round_robin_ms(parts, repeats).items()}
        sel = statistics.median(selection[1:])  # less the warm-up's
        outside = med["prefill"] - sum(med[n] for n in per_layer) - VISION_LAYERS * med["vit"] - sel
        pruned_full = med["prefill"] + (full.vision_layers - VISION_LAYERS) * med["vit"] + \
            sum(med[n] for n in per_layer_full[TEXT_LAYERS:])
        plain_full = outside + full.vision_layers * med["vit"] + full.text_layers * med[n_full]
        ops = vision_ops + batch * flops.prefill_analytic(full_config, per_layer_full)
        realized, predicted = plain_full / pruned_full, base_ops / ops
        rows.append({"model": NAME, "method": method, "budget": budget, "batch": batch,
                     "selection_ms": sel, "prefill_ms": pruned_full, "prefill_ms_unpruned": plain_full,
                     "selection_share": sel / pruned_full,
                     "speedup_realized": realized, "speedup_predicted": predicted,
                     "realized_vs_predicted": realized / predicted, "peak_memory_ratio": float("nan"),
                     "device": "cpu", "attention": model.config._attn_implementation})
        if progress:
            progress(rows[-1])
    return rows

