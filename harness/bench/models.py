"""What the bench measures on: the random-weight LLaVA models, their stand-in codebook, the prompt, and
the (method, budget, pruning scope) cells. Shared by the end-to-end bench (measure.py) and the
layer-extrapolated cost model (cost_model.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.testbed import model as M

#: LLaVA-1.5-7B's shape scaled down to run end to end here: ViT 1024x24 -> 512x6 and LLM 4096x32 -> 1024x8,
#: keeping LLaVA's head widths (ViT 64, LLM 128), its MLP ratios (4 and 11008/4096) and full multi-head
#: attention, vocabulary 32000. (Width matters: this CPU runs an 82-row product at 68% of the 594-row
#: rate at width 512, 89% at 1024; at 4096 see harness.bench.cost_model.)
SCALED_LLAVA = M.ModelDims(vision_hidden=512, vision_layers=6, vision_heads=8, text_hidden=1024, text_layers=8,
                           text_heads=8, text_kv_heads=8, text_intermediate=2752)
SCALED_VOCAB = 32000


def random_llava(dims: M.ModelDims, vocab: int):
    """A random-weight LLaVA of these dims and vocabulary (and the testbed processor, whose ids fit it)."""
    from transformers import LlavaForConditionalGeneration

    _, processor = M.build_model(M.TINY)
    config = M.build_config(dims, processor.tokenizer)
    config.text_config.vocab_size = vocab
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def scaled_llava():
    """The random-weight LLaVA-1.5-shaped model that runs end to end here."""
    return random_llava(SCALED_LLAVA, SCALED_VOCAB)


def stand_in_codebook(model, folder: Path) -> Path:
    """A random-weight model has no codebook worth mining; for the cost of the codebook methods, a
    codebook of the shipped one's size (prototype count) in this model's width stands in."""
    from methods import codebook_files as files

    size = files.load(files.TESTBED_CODEBOOK).shape[0]
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(size, model.config.text_config.hidden_size, generator=g)
    return files.save(folder / "stand_in_codebook.pt", prototypes, ["random"] * size, {"note": stand_in_codebook.__doc__})


def prompt(processor, batch: int = 1):
    """The bench's prompt, `batch` identical rows (no padding: every row has the same shapes)."""
    from harness.testbed import questions as Q
    from harness.testbed import world as W

    sample = Q.make_sample("test", "color", 0)
    return processor(images=[[W.render_pil(sample["scenes"][0])]] * batch,
                     text=[M.format_prompt(sample["question"])] * batch, return_tensors="pt")


def cells(model, method_names, budgets, params=None, say=print) -> list[tuple]:
    """(method, budget, pruning scope factory) for each budgeted method; every method is checked first
    (its own validation and the family adapter's `check`), so one that cannot run on this model stops
    the bench before any timing. A method the family refuses outright (it lacks what the method reads:
    Qwen and OneVision have no [CLS] for cls_attention) is left out, and `say` says so."""
    import methods as registry
    from harness.adapters import adapter_for, prune

    params = params or {}
    run = adapter_for(model).PruningRun
    instances = {m: registry.get(m, **params.get(m, {})) for m in method_names}
    for name in [m for m in instances if m in run.refusals]:
        say(f"{model.config.model_type}: {name} left out: {run.refusals[name]}")
        del instances[name]
    for method in instances.values():
        run.check(method, model.config)
    return [(m, b, lambda inst=inst, b=b: prune(model, inst, b, record_ipr=False))
            for m, inst in instances.items() if inst.uses_budget for b in budgets]


def stand_in_params(model, method_names, output: Path) -> dict:
    """Parameters that stand in for what a random-weight model lacks: a codebook (`stand_in_codebook`) for the
    codebook methods, random LVPruning modules (`stand_in_modules`) for lvpruning."""
    params = {}
    for m in method_names:
        if m == "lvpruning":
            params[m] = {"path": str(stand_in_modules(model, output))}
        elif m in ("codebook", "codebook_fixed"):
            params[m] = {"path": str(stand_in_codebook(model, output))}
    return params


def stand_in_modules(model, folder: Path) -> Path:
    """LVPruning modules for a random-weight model: random (seeded), of its width, at the paper's layers mapped
    to its depth and the paper's targets. The cost is the trained modules', the choices are meaningless."""
    from methods import lvpruning_modules as files

    text = model.config.text_config
    layers = files.mapped_layers(text.num_hidden_layers)
    return files.save(folder / "stand_in_lvpruning.safetensors", files.build(text.hidden_size, len(layers)),
                      layers=layers, decoder_layers=text.num_hidden_layers, targets=files.PAPER_TARGETS,
                      training={"note": stand_in_modules.__doc__})
