"""`harness bench`: what each method costs and saves, measured side by side in one process.

For every method at each budget, on one prompt (a testbed colour question, one image; `batch`
identical rows of it when asked, as a server prefilling several requests at once would), on the
models of `MODELS`: end to end, the shipped testbed model and a random-weight model of the LLaVA-1.5
architecture scaled to fit a CPU (`SCALED_LLAVA`: CLIP ViT 336/14 with 576 patch tokens, 2-layer GELU
projector, Llama decoder with LLaVA-1.5-7B's proportions); extrapolated from their real-size layers
(harness.bench.cost_model), LLaVA-1.5-7B, LLaVA-NeXT-7B, Qwen2-VL-7B and Qwen2.5-VL-7B
(harness.bench.architectures). Printed and written to `bench.csv` (+ `bench.png`):

  selection_share     selection time / pruned prefill time (time to first token)
  speedup_realized    unpruned prefill time / pruned prefill time, the two timed alternately
  speedup_predicted   unpruned (vision + prefill) operations / pruned ones (harness.metrics.flops)
  realized_vs_predicted
  peak_memory_ratio   pruned / unpruned peak memory of the prefill (harness.metrics.timing)

The codebook methods run on the scaled model with a random codebook of the shipped one's size
(`stand_in_codebook`): the cost is the same, the choices are meaningless.

Times are medians over `repeats` after a warm-up (harness.metrics.timing); ratios are what to compare
across machines, absolute times only with the device named.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from harness.testbed import model as M

from .architectures import ARCHITECTURES
from .models import (
    SCALED_LLAVA,
    SCALED_VOCAB,
    cells,
    stand_in_params,
    prompt,
    scaled_llava,
)

#: end to end, then extrapolated from real-size layers (harness.bench.cost_model)
MODELS = ("testbed", "scaled-llava-1.5", "llava-1.5-7b", *ARCHITECTURES)
BUDGETS = (192, 128, 64)
#: the largest budget every bench model can take: 576 visual tokens an image (LLaVA-1.5 and Qwen at the
#: bench's 672 px image; LLaVA-NeXT's 2880 are more)
TOKENS_PER_IMAGE = 576


def bench_model(name, model, processor, method_names, budgets=BUDGETS, repeats=5, params=None, progress=None,
                batch: int = 1):
    from harness.metrics import flops
    from harness.metrics.timing import paired_prefill_ms, time_cell

    inputs = prompt(processor, batch)
    grid = cells(model, method_names, budgets, params)
    base_time = time_cell(model, inputs, None, repeats=repeats)
    base_flops = flops.count_forward(model, inputs, decode=False)
    base_ops = base_flops["flops_vision"] + base_flops["flops_prefill"]
    rows = []
    for method, budget, scope in grid:
        timed = time_cell(model, inputs, scope, repeats=repeats)
        counted = flops.count_forward(model, inputs, scope, decode=False)
        plain, pruned = paired_prefill_ms(model, inputs, scope, repeats=repeats)
        t, b = timed["medians"], base_time["medians"]
        ops = counted["flops_vision"] + counted["flops_prefill"]
        realized, predicted = statistics.median(plain) / statistics.median(pruned), base_ops / ops
        rows.append({"model": name, "method": method, "budget": budget, "batch": batch, "selection_ms": t["selection_ms"],
                     "prefill_ms": statistics.median(pruned), "prefill_ms_unpruned": statistics.median(plain),
                     "selection_share": t["selection_ms"] / t["prefill_ms"],
                     "speedup_realized": realized, "speedup_predicted": predicted,
                     "realized_vs_predicted": realized / predicted,
                     "peak_memory_ratio": t["peak_memory_mb"] / b["peak_memory_mb"],
                     "device": timed["device"], "attention": timed["attention"]})
        if progress:
            progress(rows[-1])
    return rows


def _shape(dims) -> dict:
    """The dims that shape a model (the vocabulary is set apart: the testbed tokenizer's is smaller)."""
    return {k: v for k, v in asdict(dims).items() if k not in ("vocab_size", "max_positions")}


def run_bench(method_names, output: Path, repeats=5, budgets=BUDGETS, models=MODELS, say=print, batch: int = 1) -> list[dict]:
    import pandas as pd
    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import methods as registry

    output.mkdir(parents=True, exist_ok=True)
    budgeted = [m for m in method_names if registry.get(m).uses_budget]
    rows = []
    bar = tqdm(total=len(models) * len(budgeted) * len(budgets), desc="bench", unit="cell")
    for name in models:
        if name == "llava-1.5-7b":
            from . import cost_model

            say(f"{cost_model.NAME}: {_shape(cost_model.LLAVA_15_7B)}, vocabulary {cost_model.VOCAB}; runs "
                f"{cost_model.VISION_LAYERS} ViT and {cost_model.TEXT_LAYERS} decoder layers (harness.bench.cost_model)")
            rows += cost_model.bench(method_names, budgets, repeats, output, progress=lambda row: bar.update(1),
                                     batch=batch)
        elif name in ARCHITECTURES:
            from . import cost_model

            say(f"{ARCHITECTURES[name].describe()} (harness.bench.architectures, cost_model)")
            rows += cost_model.bench(method_names, budgets, repeats, output, progress=lambda row: bar.update(1),
                                     batch=batch, arch=name)
        else:
            if name == "testbed":
                model = LlavaForConditionalGeneration.from_pretrained(M.CHECKPOINT).eval()
                processor = AutoProcessor.from_pretrained(M.CHECKPOINT)
                params = {}
            else:
                model, processor = scaled_llava()
                params = stand_in_params(model, method_names, output)
                say(f"{name}: {_shape(SCALED_LLAVA)}, vocabulary {SCALED_VOCAB}")
            rows += bench_model(name, model, processor, method_names, budgets, repeats, params=params,
                                progress=lambda row: bar.update(1), batch=batch)
            del model
        pd.DataFrame(rows).to_csv(output / "bench.csv", index=False)  # after each model: a later failure keeps these
    bar.close()
    frame = pd.DataFrame(rows)
    _plot(frame, output / "bench.png")
    columns = ["model", "method", "budget", "batch", "selection_share", "speedup_realized", "speedup_predicted",
               "realized_vs_predicted", "peak_memory_ratio"]
    say(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    say(f"device: {frame['device'].iloc[0]}, attention: {frame['attention'].iloc[0]}; wrote {output / 'bench.csv'}")
    return rows


def _plot(frame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = sns.relplot(data=frame, x="speedup_predicted", y="speedup_realized", hue="method", style="budget",
                       col="model", kind="scatter", facet_kws={"sharex": False, "sharey": False})
    for ax in grid.axes.flat:
        top = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([1, top], [1, top], color="grey", lw=1, ls="--")  # realized = predicted
    grid.set_axis_labels("predicted prefill speedup (operations)", "realized prefill speedup (time)")
    grid.savefig(path, dpi=120)
    plt.close("all")
