"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): where its visual tokens are and what its
vision tower knows.

Images (`<image>`, transformers' `pack_image_features`): an image alone in its prompt is its base view
(s x s tokens, s = ViT image size / patch), then its anyres grid: the crops tiled, the processor's
padding rows or columns cut ("unpadded"), bilinearly reduced when larger than `anyres_max_N` crops,
with one `image_newline` after every grid row. An image among several in its prompt is its base view
and one newline. Parts, as LLaVA-NeXT's adapter (G-Prune's two graphs an image): the base view, then
with `budget_scope="image"` (default) the whole grid, newlines left out, its k split over the two in
proportion; with "part" each crop's rectangle of the grid on its own, crop by crop, each given k (a
reduced grid has no crops left: it stays one part). `extra` records `budget_scope` and `part_sizes`.

Videos (`<video>`, `get_video_features`): each frame through the ViT and projector, 2x2 bilinear
pooling (ceil(s/2)^2 tokens a frame), frames in order, then ONE newline per video. One part per frame.
A video's budget applies to each frame on its own, whatever `budget_scope`: a frame is an image to the
methods (METHODS.md 1.4, the per-frame codebook), so a 4-frame video keeps 4k tokens at budget k.

Newlines are never pruned (they are in no part). The layout is read from the merged sequence, because
generate() encodes the media before the prefill and drops `image_sizes` and `batch_num_images` from
the model's inputs: newlines are the `image_newline` vector itself, as the model writes it into
`inputs_embeds`, and delimit the grid rows; where the crops meet follows from which projector output
(view, patch) the grid's first token is, compared exactly. Context: `image_seed` (a hash of the base
view's or the frame's pixels, and the part's index), `vision_features` (the projector's input, a token
each: base views and crops; not frames, pooled after the projector, nor a reduced grid) with `project`.
SigLIP has no [CLS] (strategy "full"): `cls_attention` is refused.

Positions are 1-D (a Qwen2 decoder) and cache positions follow the cache, as in LLaVA-1.5: a method's
policy renumbers or keeps them (harness.adapters.base).
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from dataclasses import dataclass

import torch

from .base import Part, PruningRun as _BaseRun
from .llava import image_seed


@dataclass
class _Call:
    """One call of the vision tower (the images' views, or the videos' frames) and its projector's I/O."""

    pixels: torch.Tensor  # (n, C, H, W)
    inputs: torch.Tensor | None = None  # projector input (n, s*s, Dv)
    outputs: torch.Tensor | None = None  # projector output (n, s*s, D)


def _find(rows: torch.Tensor, target: torch.Tensor, start: int = 0) -> int | None:
    """The first index >= start of `rows` (n, ...) exactly equal to `target`; their first scalars filter."""
    lead = rows[start:][(slice(None),) + (0,) * target.dim()]
    for j in (lead == target.reshape(-1)[0]).nonzero().flatten().tolist():
        if torch.equal(rows[start + j], target):
            return start + j
    return None


def _bands(n: int, offset: int, side: int) -> list[tuple[int, int, int]]:
    """(start, length, start within the crop) of the crops' bands along a grid axis of `n` tokens whose
    first token sits at `offset` in its crop of `side` tokens."""
    bands, start = [], 0
    while start < n:
        length = min(side - offset, n - start)
        bands.append((start, length, offset))
        start, offset = start + length, 0
    return bands


def _runs(columns: torch.Tensor) -> list[torch.Tensor]:
    """Ascending columns split where they stop being contiguous."""
    breaks = ((columns[1:] - columns[:-1]) != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(columns, breaks.tolist()))


def _seed(pixels: torch.Tensor, part: int) -> int:
    return zlib.crc32(part.to_bytes(4, "little"), image_seed(pixels))


def anyres_grid(config, image_size) -> tuple[int, int]:
    """(rows, columns) of the anyres grid of an image of `image_size` (H, W), unpadded and reduced."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    nh, nw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(0, nh * side, nw * side), image_size).shape[1:]
    most = int(getattr(config, "vision_aspect_ratio", "anyres_max_9").removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (most * side ** 2))
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)


class PruningRun(_BaseRun):
    """The LLaVA-OneVision hooks (harness.adapters.base.PruningRun)."""

    refusals = {"cls_attention": "it needs the ViT's [CLS] attention; OneVision's SigLIP has no [CLS] token "
                                 "(vision_feature_select_strategy 'full')"}

    @staticmethod
    def tokens_per_image(config) -> None:
        return None  # anyres grids vary with the image's size, videos with their frames

    @staticmethod
    def visual_tokens_per_row(model, inputs) -> list[int]:
        """Image and video tokens per row, less the newlines (one a grid row, one a lone image, one a video)."""
        config = model.config
        ids = inputs["input_ids"]
        counts = _BaseRun.visual_tokens_per_row(model, inputs)
        side = config.vision_config.image_size // config.vision_config.patch_size
        images = (ids == config.image_token_id).sum(-1).tolist()
        if inputs.get("image_sizes") is not None and sum(images):
            per_prompt = inputs.get("batch_num_images")
            alone = [True] * len(inputs["image_sizes"]) if per_prompt is None else \
                [int(n) == 1 for n in per_prompt for _ in range(int(n))]
            row = 0
            for size, patched in zip(torch.as_tensor(inputs["image_sizes"]).tolist(), alone):
                h, w = anyres_grid(config, size) if patched else (1, 0)
                while row < len(images) - 1 and images[row] <= 0:
                    row += 1
                images[row] -= side * side + h * (w + 1)
                counts[row] -= h
            if any(images):
                raise RuntimeError("the image tokens of the input ids do not fit the images' sizes")
        videos = inputs.get("pixel_values_videos")
        if videos is not None:
            per_video = videos.shape[1] * math.ceil(side / 2) ** 2 + 1
            for row, n in enumerate((ids == config.video_token_id).sum(-1).tolist()):
                counts[row] -= n // per_video
        return counts

    def _reset(self):
        super()._reset()
        self._calls: list[_Call] = []

    @classmethod
    def vision_hooked_modules(cls, model) -> list[str]:
        return ["model.vision_tower", "model.multi_modal_projector"]

    def _install_vision_hooks(self, add) -> None:
        model = self.model.model
        add(model.vision_tower.register_forward_pre_hook(self._on_vision_input, with_kwargs=True))
        add(model.multi_modal_projector.register_forward_hook(self._on_projector))

    def _on_vision_input(self, module, args, kwargs):
        if not self._images_pending:  # a new prompt's media
            self._calls = []
        self._layout = None
        self._calls.append(_Call(args[0] if args else kwargs["pixel_values"]))
        self._images_pending = True

    def _on_projector(self, module, args, output):
        if self._calls:
            self._calls[-1].inputs, self._calls[-1].outputs = args[0], output

    # ------------------------------------------------------------------ parts
    def _parts(self, input_ids: torch.Tensor) -> list[Part]:
        config, embeds = self.model.config, self._lm_embeds  # the prefill's unpruned input (base.PruningRun)
        newline = self.model.model.image_newline.to(embeds.device, embeds.dtype)
        kinds = [input_ids == config.image_token_id, input_ids == config.video_token_id]
        # newlines: visual tokens equal to image_newline (one scalar filters, to spare a (B, T, D) comparison)
        rows, columns = ((kinds[0] | kinds[1]) & (embeds[..., 0] == newline[0])).nonzero(as_tuple=True)
        is_newline = torch.zeros_like(kinds[0])
        is_newline[rows, columns] = (embeds[rows, columns] == newline).all(-1)
        present = [bool(kind.any()) for kind in kinds]
        calls = self._calls[len(self._calls) - sum(present):] if any(present) else []  # images' call, then videos'
        if len(calls) < sum(present) or any(call.outputs is None for call in calls):
            raise RuntimeError("visual tokens in the input ids but the vision tower did not encode them")
        media = []  # (row, first column, [(columns, grid, context)], is a video)
        if present[0]:
            media += self._image_media(kinds[0], is_newline, embeds, calls[0])
        if present[1]:
            media += self._video_media(kinds[1], is_newline, calls[-1])
        media.sort(key=lambda m: m[:2])
        return [Part(i, row, columns, grid, context, frame=video)  # a video's budget is per frame
                for i, (row, _, parts, video) in enumerate(media) for columns, grid, context in parts]

    def _image_media(self, is_image, is_newline, embeds, call: _Call) -> list:
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        outputs = call.outputs.to(embeds.dtype)
        media, view = [], 0
        for row in range(is_image.shape[0]):
            for run in _runs(is_image[row].nonzero().flatten()):
                for base, grid in self._split_images(run, is_newline[row, run], side * side):
                    found = _find(outputs, embeds[row, base], view)
                    if found is None:
                        raise RuntimeError(f"image tokens at row {row}, column {int(base[0])} match no base view "
                                           "of the vision tower's output")
                    view = found + 1
                    features = None if call.inputs is None else call.inputs[found]
                    parts = [(base, (side, side), self._context(call, found, 0, features))]
                    if grid is not None:
                        crops = self._crops(row, grid, embeds, outputs, side, found)
                        parts += self._grid_parts(grid, crops, call, found, side)
                    media.append((row, int(base[0]), parts, False))
        return media

    @staticmethod
    def _split_images(columns, newline, base: int) -> list:
        """One run of image tokens into images: (base view columns, grid columns (R, C) or None)."""
        images, i, n = [], 0, len(columns)
        while i < n:
            if i + base > n or newline[i:i + base].any():
                raise RuntimeError(f"image tokens at column {int(columns[i])}: no {base}-token base view")
            start, i = i, i + base
            if i < n and newline[i]:  # an image among several: base view and one newline
                images.append((columns[start:start + base], None))
                i += 1
                continue
            ahead = newline[i:].nonzero().flatten()
            if not len(ahead):
                raise RuntimeError(f"image tokens at column {int(columns[start])}: a grid without newlines")
            width, rows = int(ahead[0]), []
            while i + width < n and newline[i + width] and not newline[i:i + width].any():
                rows.append(columns[i:i + width])
                i += width + 1
            images.append((columns[start:start + base], torch.stack(rows)))
        return images

    def _crops(self, row, grid, embeds, outputs, side: int, base: int) -> list | None:
        """The grid's crops, (rows, columns, view, window in the view) each, found exactly among the views
        after the base view; None where they are not (a reduced grid: crops no longer exist)."""
        tokens = embeds[row, grid.flatten()].view(*grid.shape, -1)
        views = outputs.view(len(outputs), side, side, -1)
        first = _find(outputs[base + 1:].flatten(0, 1), tokens[0, 0])
        if first is None:
            return None
        top, left = divmod(first % (side * side), side)
        crops = []
        for (r0, h, lr), (c0, w, lc) in itertools.product(_bands(grid.shape[0], top, side),
                                                          _bands(grid.shape[1], left, side)):
            view = _find(views[:, lr:lr + h, lc:lc + w], tokens[r0:r0 + h, c0:c0 + w], base + 1)
            if view is None:
                return None
            crops.append((slice(r0, r0 + h), slice(c0, c0 + w), view, (slice(lr, lr + h), slice(lc, lc + w))))
        return crops

    def _grid_parts(self, grid, crops, call: _Call, base: int, side: int) -> list:
        """Scope "part": each crop a part; scope "image": the whole grid one part (G-Prune's crops graph,
        as LLaVA-NeXT's adapter), its features assembled from the crops'."""
        inputs = None if call.inputs is None else call.inputs.view(len(call.inputs), side, side, -1)
        if crops is not None and self.budget_scope == "part":
            return [(grid[rows, cols].flatten(), tuple(grid[rows, cols].shape),
                     self._context(call, base, number, None if inputs is None else inputs[view][window].flatten(0, 1)))
                    for number, (rows, cols, view, window) in enumerate(crops, 1)]
        features = None
        if crops is not None and inputs is not None:
            features = inputs.new_empty(*grid.shape, inputs.shape[-1])
            for rows, cols, view, window in crops:
                features[rows, cols] = inputs[view][window]
            features = features.flatten(0, 1)
        return [(grid.flatten(), tuple(grid.shape), self._context(call, base, 1, features))]

    def _context(self, call: _Call, base: int, part: int, features: torch.Tensor | None) -> dict:
        """Part `part` of the image whose base view is `base` in the call: its seed (the base view's pixels
        and the part's index) and its tokens' projector inputs (where each token has one)."""
        context = {"image_seed": functools.partial(_seed, call.pixels[base], part)}
        if features is not None:
            context.update(vision_features=features, project=self.model.model.multi_modal_projector.forward)
        return context

    def _video_media(self, is_video, is_newline, call: _Call) -> list:
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        pooled = math.ceil(side / 2)
        per_frame, media, frame = pooled * pooled, [], 0
        for row in range(is_video.shape[0]):
            columns = is_video[row].nonzero().flatten()
            ends = is_newline[row, columns].nonzero().flatten().tolist()
            start = 0
            for end in ends:
                frames = columns[start:end]
                if len(frames) % per_frame or not len(frames):
                    raise RuntimeError(f"{len(frames)} video tokens before a newline at row {row}, not frames of "
                                       f"{per_frame}")
                parts = [(frames[f * per_frame:(f + 1) * per_frame], (pooled, pooled),
                          {"image_seed": functools.partial(_seed, call.pixels[frame + f], f)})
                         for f in range(len(frames) // per_frame)]
                media.append((row, int(frames[0]), parts, True))
                frame, start = frame + len(parts), end + 1
            if start != len(columns):
                raise RuntimeError(f"video tokens at row {row} after its last newline")
        if frame != len(call.pixels):
            raise RuntimeError(f"{frame} video frames in the input ids, the vision tower encoded {len(call.pixels)}")
        return media
