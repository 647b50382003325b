"""LVPruning's decision modules and their file (METHODS.md §4; arXiv 2501.13652, no public code).

A module reads an image's vision tokens and its prompt's text tokens, both as hidden states at the layer
it follows, and gives each vision token two logits (keep, remove):

    x = vision                                    (N, C)
    x = MHA(x, text, text) + x     two blocks, 8 heads: O = softmax(QK^T / sqrt(d)) V + Q
    logits = Linear(C, 2)(LN(Linear(2C, C)(SiLU(Linear(C, 2C)(LN(x))))))

The paper gives no residual around the FFN, nor a norm before the attention: none is added.

The file (safetensors): tensors `stage{s}.{parameter}`, and metadata saying what they belong to:
`hidden` (C), `heads`, `layers` (the decoder layers K_s each module prunes before: it follows layer K_s - 1),
`decoder_layers` (of the model trained on), `targets` (each stage's keep-ratio target in training) and
`training` (the command and settings, provenance). Loading checks every tensor's shape and that it is finite;
`check_model` that the file belongs to a model of this width and depth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .codebook_files import resolve

FORMAT = "vtp-lvpruning/1"
TESTBED_MODULES = "harness/testbed/lvpruning/modules.safetensors"
TRAIN_HINT = "train modules with `harness lvpruning train --model PATH --output FILE`"

#: The paper's placement: modules after LLaMA layers 1, 8 and 16 of LLaVA-1.5-7B's 32, i.e. pruning before
#: those (0-indexed) decoder layers; its keep-ratio targets [rho, rho - 0.2, rho - 0.4] at rho = 0.5.
PAPER_LAYERS, PAPER_DEPTH, PAPER_TARGETS = (1, 8, 16), 32, (0.5, 0.3, 0.1)


def mapped_layers(depth: int) -> tuple[int, ...]:
    """The paper's layers at the same relative depth on a decoder of `depth` layers, floor(depth * l / 32 + 1/2):
    (1, 8, 16) on 32 layers, (0, 1, 2) on the testbed's 3. A clear error where they collide (too shallow)."""
    layers = tuple(int(depth * k / PAPER_DEPTH + 0.5) for k in PAPER_LAYERS)
    if any(b <= a for a, b in zip(layers, layers[1:])) or layers[-1] >= depth:
        raise ModuleFileError(f"the paper's layers {PAPER_LAYERS} of {PAPER_DEPTH} map to {layers} on a decoder of "
                              f"{depth} layers: not {len(layers)} distinct layers inside it; give the layers")
    return layers


class ModuleFileError(ValueError):
    """A module file that is missing, unreadable, of the wrong shape, or of another model."""


class DecisionModule(nn.Module):
    """Keep/remove logits (N, 2) for vision tokens (B, N, C) read against text tokens (B, M, C)."""

    def __init__(self, hidden: int, heads: int = 8, blocks: int = 2):
        super().__init__()
        self.attention = nn.ModuleList(nn.MultiheadAttention(hidden, heads, batch_first=True) for _ in range(blocks))
        self.ffn = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.SiLU(),
                                 nn.Linear(2 * hidden, hidden), nn.LayerNorm(hidden))
        self.decide = nn.Linear(hidden, 2)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_padding: torch.Tensor | None = None):
        """`text_padding` (B, M): True where a text slot is padding (a batch of prompts of several lengths)."""
        x = vision
        for attention in self.attention:
            x = attention(x, text, text, key_padding_mask=text_padding, need_weights=False)[0] + x
        return self.decide(self.ffn(x))


def build(hidden: int, stages: int, heads: int = 8, seed: int = 0) -> nn.ModuleList:
    """`stages` freshly initialised modules (seeded)."""
    if hidden % heads:
        raise ModuleFileError(f"the hidden size {hidden} is not divisible by {heads} heads")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.ModuleList(DecisionModule(hidden, heads) for _ in range(stages))
    finally:
        torch.random.set_rng_state(generator_state)


def save(path: str | os.PathLike, modules: nn.ModuleList, *, layers, decoder_layers: int, targets,
         training: dict | None = None) -> Path:
    """Write `modules` and what they belong to (atomically)."""
    from safetensors.torch import save_file

    if len(layers) != len(modules) or len(targets) != len(modules):
        raise ValueError(f"{len(modules)} modules need as many layers and targets, got {layers} and {targets}")
    first = modules[0]
    meta = {"format": FORMAT, "hidden": first.decide.in_features, "heads": first.attention[0].num_heads,
            "layers": [int(k) for k in layers], "decoder_layers": int(decoder_layers),
            "targets": [float(t) for t in targets], "training": training or {}}
    tensors = {f"stage{s}.{name}": value.detach().to("cpu", torch.float32).contiguous()
               for s, module in enumerate(modules) for name, value in module.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={key: json.dumps(value) for key, value in meta.items()})
    tmp.replace(path)
    return path


def load(path: str | os.PathLike) -> tuple[nn.ModuleList, dict]:
    """The modules (float32, CPU, eval mode, frozen) and the file's metadata; a clear error otherwise."""
    from safetensors import safe_open

    p = resolve(path)
    if not p.is_file():
        raise ModuleFileError(f"LVPruning module file not found: {p} ({TRAIN_HINT})")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # a truncated or foreign file: say which, not where safetensors failed
        raise ModuleFileError(f"LVPruning module file {p} is not a readable safetensors file "
                              f"({type(e).__name__}: {e})") from None
    try:
        meta = {key: json.loads(value) for key, value in raw.items()}
        if meta.get("format") != FORMAT:
            raise KeyError("format")
        hidden, heads, layers = int(meta["hidden"]), int(meta["heads"]), [int(k) for k in meta["layers"]]
        int(meta["decoder_layers"]), [float(t) for t in meta["targets"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ModuleFileError(f"LVPruning module file {p} lacks its metadata ({e}; expected the {FORMAT} keys "
                              f"hidden, heads, layers, decoder_layers, targets: {TRAIN_HINT})") from None
    if len(meta["targets"]) != len(layers) or not layers:
        raise ModuleFileError(f"LVPruning module file {p}: {len(layers)} layers but {len(meta['targets'])} targets")
    modules = build(hidden, len(layers), heads)
    expected = {f"stage{s}.{name}": value.shape for s, module in enumerate(modules)
                for name, value in module.state_dict().items()}
    if set(tensors) != set(expected):
        missing, foreign = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ModuleFileError(f"LVPruning module file {p} does not hold {len(layers)} modules of width {hidden}: "
                              f"missing {missing[:3]}, unexpected {foreign[:3]}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ModuleFileError(f"LVPruning module file {p}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"expected {tuple(shape)} for width {hidden}")
        if not tensors[name].is_floating_point() or not bool(torch.isfinite(tensors[name]).all()):
            raise ModuleFileError(f"LVPruning module file {p}: {name} is not finite floating-point")
    for s, module in enumerate(modules):
        module.load_state_dict({name.split(".", 1)[1]: value.float() for name, value in tensors.items()
                                if name.startswith(f"stage{s}.")})
    modules.eval().requires_grad_(False)
    return modules, meta


def check_model(meta: dict, config, path) -> None:
    """A clear error when the file's modules belong to a decoder of another width or depth."""
    text = getattr(config, "text_config", config)
    want = (int(meta["hidden"]), int(meta["decoder_layers"]))
    have = (text.hidden_size, text.num_hidden_layers)
    if want != have:
        raise ModuleFileError(f"LVPruning module file {path} was trained on a decoder of width {want[0]} and "
                              f"{want[1]} layers; this model's has width {have[0]} and {have[1]} layers: modules "
                              f"belong to the model they were trained on ({TRAIN_HINT})")
