"""LLaVA-1.5 (`LlavaForConditionalGeneration`): where its visual tokens are and what its ViT knows.

Each image is one part: `image_seq_length` tokens (24 x 24 for LLaVA-1.5-7B), found in the prompt
by the image token id, in the order the images fill the batch. Methods may read the ViT feature
layer's states (the projector's input, [CLS] dropped), its [CLS] attention and keys (computed from
that layer's input, `harness.adapters.attention.cls_attention`) and the projector itself. Positions
are 1-D: a method's policy renumbers or keeps them (harness.adapters.base).
"""

from __future__ import annotations

import contextlib
import zlib

import torch

from methods.base import Method

from .attention import cls_attention
from .base import ImageRecord, Part, PruningRun as _BaseRun

__all__ = ["ImageRecord", "PruningRun", "image_seed", "prune"]


def image_seed(pixels: torch.Tensor) -> int:
    """A stable per-image seed: the image's pixels, not its place in the batch."""
    return zlib.crc32(pixels.detach().to(torch.float32).cpu().numpy().tobytes())


def _encoder_layers(tower) -> tuple[str, torch.nn.ModuleList]:
    """The ViT's layer list and its path from the tower (CLIP nests it in `vision_model`, SigLIP may not)."""
    path = "vision_model.encoder.layers" if hasattr(tower, "vision_model") else "encoder.layers"
    return path, tower.get_submodule(path)


def _feature_layer_index(count: int, index: int) -> int:
    """Which of `count` ViT layers outputs LLaVA's `vision_feature_layer` (1-based from the front, or from the back
    when negative: -2 is the penultimate layer's output)."""
    return index - 1 if index > 0 else count + index


def feature_layer(tower, index):
    """The ViT layer whose output LLaVA reads (`vision_feature_layer`, e.g. -2)."""
    _, layers = _encoder_layers(tower)
    if not isinstance(index, int):
        raise ValueError("pruning supports a single vision_feature_layer")
    return layers[_feature_layer_index(len(layers), index)]


class PruningRun(_BaseRun):
    """The LLaVA-1.5 family's hooks (harness.adapters.base.PruningRun)."""

    @staticmethod
    def tokens_per_image(config) -> int:
        return config.image_seq_length

    def _reset(self):
        super()._reset()
        self._pixels = None
        self._vision_in = None  # input of the ViT's feature layer (images, 1 + N, Dv)
        self._vision = None  # the projector's input: feature-layer states, [CLS] dropped (images, N, Dv)

    def _feature_layer(self):
        return feature_layer(self.model.model.vision_tower, self.model.config.vision_feature_layer)

    @classmethod
    def vision_hooked_modules(cls, model) -> list[str]:
        index = model.config.vision_feature_layer
        paths = ["model.vision_tower", "model.multi_modal_projector"]
        if isinstance(index, int):  # else pruning refuses the model: no hook on a feature layer
            path, layers = _encoder_layers(model.model.vision_tower)
            paths.insert(1, f"model.vision_tower.{path}.{_feature_layer_index(len(layers), index)}")  # feature_layer's
        return paths

    def _install_vision_hooks(self, add) -> None:
        add(self.model.model.vision_tower.register_forward_pre_hook(self._on_vision_input, with_kwargs=True))
        add(self._feature_layer().register_forward_pre_hook(self._on_feature_layer_input))
        add(self.model.model.multi_modal_projector.register_forward_pre_hook(self._on_projector_input))

    # The vision tower may run inside LlavaModel.forward or before it (generate() encodes images
    # once, up front): what it saw waits until the language model consumes the images.
    def _on_vision_input(self, module, args, kwargs):
        self._layout = None
        self._pixels = args[0] if args else kwargs["pixel_values"]
        self._images_pending = True

    def _on_feature_layer_input(self, module, args):
        self._vision_in = args[0]

    def _on_projector_input(self, module, args):
        self._vision = args[0]

    def _parts(self, input_ids: torch.Tensor) -> list[Part]:
        n = int(self.tokens_per_image(self.model.config))  # a traced size (fvcore) is a tensor
        rows, cols = (input_ids == self.model.config.image_token_id).nonzero(as_tuple=True)
        if len(rows) % n:
            raise RuntimeError(f"{len(rows)} image tokens in the input ids, not a multiple of {n} per image")
        side = int(round(n ** 0.5))
        grid = (side, n // side) if side * side == n else (1, n)
        return [Part(i, int(rows[i * n]), cols[i * n:(i + 1) * n], grid, self._context(i))
                for i in range(len(rows) // n)]

    def _context(self, i: int) -> dict:
        parts = {}

        def vision_parts():  # [CLS] -> patch attention (heads summed) and keys (heads averaged)
            if not parts and self._vision_in is not None:
                parts["cls"], parts["keys"] = cls_attention(self._feature_layer(), self._vision_in[i])
            return parts

        return {"image_seed": lambda: image_seed(self._pixels[i]),
                "vision_features": None if self._vision is None else self._vision[i],
                "project": self.model.model.multi_modal_projector.forward,  # .forward: not through our hook
                "cls_attention": lambda: vision_parts()["cls"], "vision_keys": lambda: vision_parts()["keys"]}


@contextlib.contextmanager
def prune(model, method: Method | str, budget=None, record_ipr: bool = True, **params):
    """Apply `method` (a registered name with `params`, or an instance) at `budget` to a
    `LlavaForConditionalGeneration` for the duration of the block (harness.adapters.base)."""
    run = PruningRun(model, method, budget, record_ipr=record_ipr, **params)
    with run:
        yield run
