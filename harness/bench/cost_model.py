"""Real 7B models' prefill cost on this machine, from their real layer shapes (`harness bench`).

A whole 7B model does not fit this CPU's time budget, but its cost is a sum over layers of identical
shape. So a model of the real architecture's exact widths (LLaVA-1.5-7B: `LLAVA_15_7B`, CLIP ViT-L/14-336
1024 wide, Llama 4096 wide with 32 heads and MLP 11008, vocabulary 32000; the others in
harness.bench.architectures: LLaVA-NeXT-7B, Qwen2-VL-7B, Qwen2.5-VL-7B) is built with only a few ViT and
decoder layers, random weights. Each method runs on it through the family's adapter, so its selection is
timed on real-size inputs (576 tokens of width 4096 for LLaVA-1.5, ViT-L's [CLS] attention). One
decoder layer and one ViT layer of each kind (Qwen2.5-VL: a windowed and a full-attention one) are timed
alone, the ViT layer on the inputs it receives in the bench's prefill, the decoder layer at the token counts
the cell has, in turns with the cell's reduced prefill (`round_robin_ms`: this machine's speed drifts by
up to 20% within a session, and a ratio of figures timed minutes apart would carry it). The full-depth
prefill is then

    T_full = T_reduced + sum over ViT kinds of (full count - reduced count) * t_vit(kind)
                       + sum over decoder layers l >= reduced depth of t_dec(n_l)

where T_reduced is the reduced model's measured pruned prefill (embedding, projector, selection,
hooks and LM head included) and n_l the tokens entering layer l (an in-LLM method's pruned count
from its layer on). The unpruned T_full is built the same way from the pruned run's parts outside
the layers. The predicted speedup uses the same depths: the counted reduced vision part (fvcore or
torch's counter, harness.metrics.flops) plus the analytic count of the missing ViT layers
(`flops.vision_analytic` at full depth less at reduced depth), and `flops.prefill_analytic` over every
decoder layer (the selection's own operations are not in the prediction: its time is in the realized one).
These are extrapolations from measured layers, labelled as such, not an end-to-end run.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch

from harness.testbed import model as M

from .architectures import ARCHITECTURES, Architecture

LLAVA_15_7B = M.ModelDims(vision_hidden=1024, vision_layers=24, vision_heads=16, text_hidden=4096, text_layers=32,
                          text_heads=32, text_kv_heads=32, text_intermediate=11008)
VOCAB = 32000
VISION_LAYERS = 2  # the penultimate layer needs two; both run
TEXT_LAYERS = 3  # FastV's default K = 2 needs a layer after it
NAME = "llava-1.5-7b (layer-extrapolated)"


def llava_15() -> Architecture:
    """LLaVA-1.5-7B (read from `LLAVA_15_7B` and `VOCAB` when called): the testbed's LLaVA class and
    processor (one 336 px image, 576 tokens; its token ids fit any vocabulary) at these widths."""
    import dataclasses

    from harness.testbed import tiny_families as TF

    def config(dims, vision_layers, text_layers, tokenizer):
        shape = dataclasses.replace(dims["shape"], vision_layers=vision_layers, text_layers=text_layers)
        config = M.build_config(shape, tokenizer)
        config.text_config.vocab_size = dims["vocab"]
        return config

    return Architecture("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration",
                        {"shape": LLAVA_15_7B, "vocab": VOCAB}, vision_layers=LLAVA_15_7B.vision_layers,
                        text_layers=LLAVA_15_7B.text_layers, reduced=(VISION_LAYERS, TEXT_LAYERS), image=(336, 336),
                        vision_blocks="model.vision_tower.encoder.layers",
                        processor=lambda dims: M.build_processor(TF.llava_tokenizer()), config=config)


def reduced_model(arch: Architecture | None = None):
    """(model, processor): the architecture's widths (default LLaVA-1.5-7B) at its reduced depths, random weights."""
    return (arch or llava_15()).build()


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
    rope = lm.rotary_emb(hidden, positions)  # M-RoPE (Qwen) takes 1-D positions as its three rows

    @torch.no_grad()
    def run():
        lm.layers[0](hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
    return run


class _Recorded(Exception):
    """Raised to stop a forward once the ViT layers' inputs are recorded."""


def vision_layers(model, inputs, arch: Architecture) -> dict[str, object]:
    """A callable per kind of ViT layer: the reduced model's first layer of that kind, run on what it
    receives in the bench's prefill (its inputs recorded once: hidden states, position embeddings,
    Qwen's attention segments), so each kind is timed on its real shape (views, windows)."""
    blocks = model.get_submodule(arch.vision_blocks)
    first: dict[str, int] = {}
    for i in range(len(blocks)):
        first.setdefault(arch.layer_kind(model.config, i), i)
    seen: dict[int, tuple] = {}
    handles = [blocks[i].register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.setdefault(i, (args, kwargs)), with_kwargs=True)
        for i in first.values()]

    def stop(module, args, kwargs):  # the vision side has run: the language model is not needed
        raise _Recorded

    handles.append(model.model.language_model.register_forward_pre_hook(stop, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)
    except _Recorded:
        pass
    finally:
        for handle in handles:
            handle.remove()

    def timer(i):
        args, kwargs = seen[i]

        @torch.no_grad()
        def run():
            blocks[i](*args, **kwargs)
        return run
    return {kind: timer(i) for kind, i in first.items()}


def vision_layer_macs(n: int, d: int, m: int) -> int:
    """One ViT layer in multiply-accumulates: Q, K, V, O projections, attention, the 2-layer MLP."""
    from harness.metrics.flops import vit_layer_macs

    return vit_layer_macs([n], d, m)


def bench(method_names, budgets, repeats: int, output, progress=None, batch: int = 1,
          arch: Architecture | str | None = None) -> list[dict]:
    """Rows like `bench.bench_model`'s, for a real architecture (default LLaVA-1.5-7B; else one of
    `architectures.ARCHITECTURES` or an `Architecture`) extrapolated from its layers (the codebook methods
    with a random stand-in codebook of the shipped one's size, in `output`), on `batch` identical rows
    (operations are counted for all of them, as times are measured)."""
    from harness.adapters import adapter_for
    from harness.metrics import flops

    import methods as registry

    from .models import cells, stand_in_params

    arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch or llava_15()
    name = f"{arch.name} (layer-extrapolated)"
    model, processor = arch.build()
    inputs = arch.prompt(processor, batch)
    params = stand_in_params(model, method_names, output)
    # A multi-stage method's later stages sit deeper than the few decoder layers that run here: the formula's
    # tokens per missing layer would be its last stage's count from the reduced depth on, which it is not.
    reduced = model.config.text_config.num_hidden_layers
    for m in [m for m in method_names if len(registry.get(m, **params.get(m, {})).stage_layers()) > 1]:
        print(f"{name}: {m} left out: its pruning stages need the full decoder depth, and this extrapolation "
              f"runs {reduced} decoder layers")
        method_names = [n for n in method_names if n != m]
    grid = cells(model, method_names, budgets, params)
    full_config = arch.full_config(processor.tokenizer)
    run = adapter_for(model).PruningRun
    paths = {"vision_module": run.vision_module, "projector_module": run.projector_module}
    # The reduced model's vision counted, plus the missing ViT layers (full depth less reduced, analytic).
    extra_vit = flops.vision_analytic(full_config, inputs) - flops.vision_analytic(model.config, inputs)
    vision_ops = flops.count_forward(model, inputs, decode=False, **paths)["flops_vision"] + extra_vit
    text_layers = full_config.text_config.num_hidden_layers
    reduced_text = model.config.text_config.num_hidden_layers
    n_full = inputs["input_ids"].shape[1]
    base_ops = vision_ops + batch * flops.prefill_analytic(full_config.text_config, [n_full] * text_layers)
    kinds_full = Counter(arch.layer_kind(full_config, i) for i in range(arch.vision_layers))
    reduced_vit = len(model.get_submodule(arch.vision_blocks))
    kinds_reduced = Counter(arch.layer_kind(model.config, i) for i in range(reduced_vit))
    vits = vision_layers(model, inputs, arch)
    rows = []
    for method, budget, scope in grid:
        per_layer = flops.tokens_per_layer(model, inputs, scope)
        per_layer_full = per_layer + [per_layer[-1]] * (text_layers - len(per_layer))
        selection = []

        def pruned_prefill(scope=scope, selection=selection):
            with torch.no_grad(), scope() as run:
                model(**inputs, use_cache=True, logits_to_keep=1)
            selection.append(1000 * run.selection_seconds)

        # The cell's parts, timed in turns: its reduced prefill, one ViT layer of each kind, one decoder
        # layer at every token count its layers see and at the unpruned count.
        parts = {"prefill": pruned_prefill} | {("vit", k): fn for k, fn in vits.items()} | \
            {n: decoder_layer(model, n, batch) for n in {n_full, *per_layer_full}}
        med = {k: statistics.median(v) for k, v in round_robin_ms(parts, repeats).items()}
        sel = statistics.median(selection[1:])  # less the warm-up's
        vit_reduced = sum(count * med["vit", k] for k, count in kinds_reduced.items())
        outside = med["prefill"] - sum(med[n] for n in per_layer) - vit_reduced - sel
        pruned_full = med["prefill"] + sum((kinds_full[k] - kinds_reduced[k]) * med["vit", k] for k in kinds_full) + \
            sum(med[n] for n in per_layer_full[reduced_text:])
        plain_full = outside + sum(count * med["vit", k] for k, count in kinds_full.items()) + \
            text_layers * med[n_full]
        ops = vision_ops + batch * flops.prefill_analytic(full_config.text_config, per_layer_full)
        realized, predicted = plain_full / pruned_full, base_ops / ops
        rows.append({"model": name, "method": method, "budget": budget, "batch": batch,
                     "selection_ms": sel, "prefill_ms": pruned_full, "prefill_ms_unpruned": plain_full,
                     "selection_share": sel / pruned_full,
                     "speedup_realized": realized, "speedup_predicted": predicted,
                     "realized_vs_predicted": realized / predicted, "peak_memory_ratio": float("nan"),
                     "device": "cpu", "attention": model.config._attn_implementation})
        if progress:
            progress(rows[-1])
    return rows
