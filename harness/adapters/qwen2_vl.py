"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`):
where their visual tokens are and what their vision tower knows.

Dynamic resolution: each image becomes t*h*w / merge**2 `<|image_pad|>` tokens (its `image_grid_thw`
row (t, h, w) in ViT patches; merge = 2), so counts vary per image (`tokens_per_image` is None): a count
budget is capped at each image's tokens, a fraction applies to each image. Tokens are pruned after the
2x2 merger, as the LLM reads them. Each image is one part, grid (h / merge, w / merge); a video
(`<|video_pad|>`, `video_grid_thw`) is one image of t parts, one per temporal step (two frames), in
the order the batch holds them; each step gets the budget (a frame is an image to the methods). The
grids come from the vision tower's calls (generate() encodes the media before the prefill, and drops
the grids from the model's inputs): the images' call, then the videos'. Methods may read each part's
pixels (its seed) and `vision_features`: the merger's input, the last ViT block's states of the 2x2
patches merged into one token, concatenated (n, 4 * Dv), in raster order (Qwen2.5-VL's window order
undone). There is no [CLS] and the merger maps 2x2 patches, not single ViT tokens: `cls_attention` is
refused, and no `project` is given.

Positions are 3-D M-RoPE ids (temporal, height, width; generate() passes a text row first: (4, B, T)),
computed by the model from the unpruned ids and grids. The kept tokens keep theirs, gathered from the
unpruned positions (`gathers_positions`), never recomputed from the pruned ids: an image's remaining
tokens stay where they were on its grid, and the text after it where it was. Decoding continues from
the unpruned sequence: generate() numbers new tokens from its own (4, B, T) positions at full length,
and the model's own numbering (no position ids given) from `rope_deltas`, both computed before pruning,
plus the full-length attention mask it is given; only that mask is cut to the kept columns. Cache
positions: transformers 5.23's Qwen text model takes none; new keys are appended to each layer's cache
(pruned layers hold only the kept tokens) and the mask is built from the cache's own length, which is
why the mask, not the positions, is cut. A decoding call with neither mask nor positions would be
numbered from the pruned cache's length: it gets the positions the unpruned model would give it
(unpruned length + `rope_deltas`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import InputError

from .base import Part, PruningRun as _BaseRun
from .llava import image_seed


class MediaNotEncoded(InputError):
    """Visual tokens whose images were encoded before the pruning block (precomputed `mm_encoder_outputs`):
    the adapter would not know their grids and pixels, and would leave them unpruned without a word."""


@dataclass
class _Media:
    """One call of the vision tower: the images' (or videos') patches, grids and merger input."""

    pixels: torch.Tensor  # (sum t*h*w, C * temporal_patch * patch**2)
    grid: torch.Tensor  # (n, 3): t, h, w in ViT patches
    merger_input: torch.Tensor | None = None  # (sum t*h*w, Dv), the order the merger reads them
    raster: torch.Tensor | None = None  # the merger input in raster order, one row per LLM token (once a call)


class PruningRun(_BaseRun):
    """The Qwen2-VL / Qwen2.5-VL hooks (harness.adapters.base.PruningRun)."""

    gathers_positions = True
    vision_module, projector_module = "model.visual", "model.visual.merger"  # the merger is the projector
    refusals = {"cls_attention": "it needs the ViT's [CLS] attention and a projector of single ViT tokens; "
                                 "Qwen's ViT has no [CLS] and its merger maps 2x2 patches"}

    @staticmethod
    def _split_positions(position_ids):
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:  # generate(): text row, then M-RoPE's
            return position_ids[0], position_ids[1:]
        if position_ids.ndim == 3:  # the model's own (3, B, T): the mask needs no text row (the first stands in)
            return position_ids[0], position_ids
        return position_ids, position_ids

    def _reset(self):
        super()._reset()
        self._media: list[_Media] = []

    @classmethod
    def vision_hooked_modules(cls, model) -> list[str]:
        return ["model.visual", "model.visual.merger"]

    def _install_vision_hooks(self, add) -> None:
        visual = self.model.model.visual
        add(visual.register_forward_pre_hook(self._on_vision_input, with_kwargs=True))
        add(visual.merger.register_forward_pre_hook(self._on_merger_input))

    def _on_vision_input(self, module, args, kwargs):
        if not self._images_pending:  # a new prompt's media
            self._media = []
        self._layout = None
        pixels = args[0] if args else kwargs["hidden_states"]
        grid = args[1] if len(args) > 1 else kwargs["grid_thw"]
        self._media.append(_Media(pixels, grid))
        self._images_pending = True

    def _on_merger_input(self, module, args):
        self._media[-1].merger_input = args[0]

    def _on_model_input(self, module, args, kwargs):
        super()._on_model_input(module, args, kwargs)
        cache = kwargs.get("past_key_values")
        if (cache is None or cache.get_seq_length() == 0) and kwargs.get("mm_encoder_outputs") \
                and not self._images_pending:
            raise MediaNotEncoded("pruning needs the images and videos encoded inside the prune() block: pass "
                                  "pixel_values / pixel_values_videos, not precomputed mm_encoder_outputs")
        deltas = getattr(module, "rope_deltas", None)
        if (self.method.stage == "pre_llm" and self._is_continuation(kwargs) and deltas is not None
                and kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None):
            # Qwen would number the step from the pruned cache's length: number it as it would unpruned
            layout, embeds = self._layout, kwargs.get("inputs_embeds")
            new = (embeds if embeds is not None else kwargs["input_ids"]).shape[1]
            seen = layout.full_length + cache.get_seq_length() - layout.index.shape[1]
            steps = torch.arange(seen, seen + new, device=deltas.device)
            positions = (steps[None, None] + deltas[None]).expand(3, -1, -1)
            return args, {**kwargs, "position_ids": positions}
        return None

    # ------------------------------------------------------------------ parts
    def _parts(self, input_ids: torch.Tensor) -> list[Part]:
        config = self.model.config
        merge = config.vision_config.spatial_merge_size
        kinds = [(token, int((input_ids == token).sum())) for token in (config.image_token_id, config.video_token_id)]
        kinds = [(token, n) for token, n in kinds if n]
        calls = self._media[len(self._media) - len(kinds):] if kinds else []  # images' call, then videos'
        if len(calls) < len(kinds):
            raise RuntimeError("visual tokens in the input ids but the vision tower did not encode them")
        media = []  # (row, first column, call, index in call, columns, is a video)
        for (token, count), call in zip(kinds, calls):
            sizes = (call.grid.prod(-1) // merge ** 2).tolist()
            if sum(sizes) != count:
                raise RuntimeError(f"{count} visual tokens in the input ids, the grids {call.grid.tolist()} "
                                   f"give {sum(sizes)}")
            rows, cols = (input_ids == token).nonzero(as_tuple=True)
            for i, (r, c) in enumerate(zip(rows.split(sizes), cols.split(sizes))):
                media.append((int(r[0]), int(c[0]), call, i, c, token == config.video_token_id))
        media.sort(key=lambda m: m[:2])
        parts = []
        for image, (row, _, call, i, columns, video) in enumerate(media):
            t, h, w = call.grid[i].tolist()
            n = h * w // merge ** 2
            for step in range(t):  # a video's steps are its frames: each gets the budget (base.Part.frame)
                context = self._context(call, i, step, merge)
                parts.append(Part(image, row, columns[step * n:(step + 1) * n], (h // merge, w // merge), context,
                                  frame=video))
        return parts

    def _context(self, call: _Media, i: int, step: int, merge: int) -> dict:
        """Part `step` of medium `i` of `call`: its pixel rows (seed) and merger input rows (vision features)."""
        patches = call.grid.prod(-1)
        _, h, w = call.grid[i].tolist()
        start = int(patches[:i].sum()) + step * h * w
        pixels = call.pixels[start:start + h * w]
        context = {"image_seed": lambda: image_seed(pixels)}
        if call.merger_input is not None:
            if call.raster is None:
                call.raster = self._raster_groups(call, merge)  # (tokens of the call, merge**2 * Dv)
            context["vision_features"] = call.raster[start // merge ** 2:(start + h * w) // merge ** 2]
        return context

    def _raster_groups(self, call: _Media, merge: int) -> torch.Tensor:
        """The merger's input, one row per LLM token (its 2x2 patches concatenated), in raster order."""
        x = call.merger_input
        groups = x.reshape(-1, merge ** 2 * x.shape[-1])
        visual = self.model.model.visual
        if hasattr(visual, "window_size"):  # Qwen2.5-VL: the merger reads tokens in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(call.grid, merge, visual.window_size, visual.patch_size)
            groups = groups[torch.argsort(window_index.to(groups.device))]
        return groups
