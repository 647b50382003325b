"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): where its visual tokens are and what its ViT knows.

Anyres: an image is encoded as a base view (the whole image at the ViT's size, 24 x 24 tokens for
LLaVA-1.6) plus a grid of high-res crops chosen from `image_grid_pinpoints`. The model packs them as
the base view's tokens, then the crops' tokens joined into one feature map, unpadded to the image's
aspect ratio, row by row, each row followed by an `image_newline` token. All of them fill the
`<image>` tokens of the prompt. Newline tokens are never pruned, never handed to a method and never
counted as visual tokens (in or kept); `visual_tokens_per_row` leaves them out too.

Parts (what a method chooses among), following G-Prune's official NeXT code (METHODS.md §2), which
builds two graphs per image:
- `budget_scope="image"` (default): part 0 the base view (its ViT grid), part 1 all crops after
  unpadding, newlines left out (grid: the unpadded map's (h, w)). The image's budget k is split over
  the two in proportion to their tokens, so a fraction keeps that fraction of each graph (G-Prune's
  keep_ratio) and a count keeps k tokens per image.
- `budget_scope="part"`: "per crop": part 0 the base view, then each crop on its own (its unpadded
  rows and columns; a crop unpadding removed entirely is no part), each given the budget. Only here
  is a crop its own part: splitting the default's crops part per crop would break G-Prune's single
  crops graph. The codebook's per-crop application (METHODS.md §1.4) is per token in threshold mode,
  so either scope gives it the same result.
`run.images[i].kept` indexes the image's parts concatenated: base tokens, then the crop tokens in
sequence order (scope "image") or crop by crop (scope "part"); `extra` records `budget_scope` and
`part_sizes`.

Where each token came from: generate() encodes images before the prefill and drops `image_sizes`,
so no module sees them. The packed tokens are exact copies of the projector's outputs and of
`image_newline`, so each `<image>` column's source (ViT crop and token, or newline) is found by value,
exactly, from the sequence the language model receives; the layout (base block, equal rows each ending
in a newline) is then checked. This follows the model's own packing whatever it is (tested against
`pack_image_features` run on index tensors, `packed_sources`). Two bit-identical tokens (identical
crops) are interchangeable: everything a method reads about them is identical too.

Methods may read, per token, the ViT feature layer's state (the projector's input, [CLS] dropped),
the [CLS] attention and keys of the crop (or base view) the token came from (each crop is its own ViT
forward, so its own [CLS]), the projector, and a seed from the image's pixels plus the part's index.
Positions are 1-D (the Llama / Mistral / Vicuna decoder's RoPE), as for LLaVA-1.5: newlines keep their
place among the kept tokens; the method's policy renumbers the kept columns or keeps their original
positions, and decoding continues from the pruned or the unpruned last position accordingly
(harness.adapters.base).
"""

from __future__ import annotations

import torch

from .attention import cls_attention
from . import llava
from .base import ImageRecord, Part
from .llava import image_seed

__all__ = ["ImageRecord", "NEWLINE", "PruningRun", "packed_sources"]

#: The source of a newline token (`packed_sources`, `PruningRun.sources`).
NEWLINE = -1


def _tokens_per_view(config) -> tuple[int, int]:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side, side


def packed_sources(model, image_sizes) -> list[torch.Tensor]:
    """For each image of `image_sizes` ((H, W) rows, the processor's): the source of each of its packed
    tokens, as the model itself packs them (`pack_image_features` run on index tensors of width 1):
    view * n + token (view 0 the base, then the crops; n tokens a view), or NEWLINE."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    h, w = _tokens_per_view(config)
    views = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
             for size in image_sizes]
    index = [torch.arange(v * h * w, dtype=torch.float64).view(v, h * w, 1) for v in views]
    packed, _ = model.model.pack_image_features(index, image_sizes, config.vision_feature_select_strategy,
                                                image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64))
    return [p[:, 0].long() for p in packed]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """(N, D) floats as (N, D') int16 bit patterns: equality is exact (NaN, -0.0 included)."""
    return x.contiguous().view(torch.int16)


def match_rows(queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(N,) for each row of `queries` (N, D) the index of a bit-identical row of `table` (M, D), -1 if none.
    Rows are keyed by an exact integer hash (float64 sums of int16 x 15-bit weights stay below 2^53, so
    any summation order gives the same key; elementwise, not a matmul, so FLOP counters see no model
    work), sorted and searched; a key shared by different rows falls back to a direct search."""
    q, t = _bits(queries), _bits(table)
    weights = torch.randint(1, 2 ** 15, (q.shape[1],), generator=torch.Generator().manual_seed(0))
    weights = weights.to(q.device, torch.float64)

    def keys(bits):
        return torch.cat([(chunk.double() * weights).sum(-1) for chunk in bits.split(512)]) if len(bits) \
            else weights[:0]

    table_keys, order = keys(t).sort()
    query_keys = keys(q)
    at = torch.searchsorted(table_keys, query_keys).clamp(max=max(len(order) - 1, 0))
    found = order[at]
    ok = (table_keys[at] == query_keys) & (q == t[found]).all(-1)
    found = torch.where(ok, found, torch.full_like(found, -1))
    for i in (~ok).nonzero().flatten().tolist():  # hash collisions only (or no match at all)
        same = (t == q[i]).all(-1).nonzero().flatten()
        if len(same):
            found[i] = same[0]
    return found


class PruningRun(llava.PruningRun):
    """The LLaVA-NeXT family's hooks: LLaVA-1.5's vision side (pixels, the feature layer), its own packing;
    see the module docstring."""

    @staticmethod
    def tokens_per_image(config) -> None:
        return None  # anyres: varies with the image's size

    @classmethod
    def check(cls, method, config) -> None:
        super().check(method, config)
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise ValueError("LLaVA-NeXT pruning needs one vision_feature_layer and vision_feature_select_strategy "
                             f"'default' (every LLaVA-NeXT checkpoint's), got {config.vision_feature_layer!r} and "
                             f"{config.vision_feature_select_strategy!r}")

    @staticmethod
    def visual_tokens_per_row(model, inputs) -> list[int]:
        """Each row's image tokens less its newline tokens (from `image_sizes`, the model's packing)."""
        counts = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        sizes = inputs.get("image_sizes")
        images = packed_sources(model, sizes) if sizes is not None and len(sizes) else []
        out, i = [], 0
        for count in counts:
            filled = newlines = 0
            while filled < count and i < len(images):
                filled, newlines, i = filled + len(images[i]), newlines + int((images[i] == NEWLINE).sum()), i + 1
            if filled != count:
                raise ValueError(f"{count} image tokens in a row do not match the images of image_sizes")
            out.append(count - newlines)
        return out

    def _reset(self):
        super()._reset()  # pixels, feature-layer input and projector input, here of every view of every image
        self._projected = None  # the projector's output (views, n, D)
        #: (N,) for each `<image>` column of the last prompt (row-major), its source: view * n + token
        #: over the batch's views, or NEWLINE (for tests and analyses)
        self.sources = None

    def _install_vision_hooks(self, add) -> None:
        model = self.model.model
        add(model.vision_tower.register_forward_pre_hook(self._on_vision_input, with_kwargs=True))
        add(self._feature_layer().register_forward_pre_hook(self._on_feature_layer_input))
        add(model.multi_modal_projector.register_forward_hook(self._on_projector))

    def _on_projector(self, module, args, output):
        self._vision, self._projected = args[0], output

    # ------------------------------------------------------------------ where each token came from
    def _sources(self, rows, cols) -> torch.Tensor:
        """(N,) the source of each `<image>` column (module docstring), checked."""
        embeds = self._lm_embeds[rows, cols]  # the prefill's unpruned input (base.PruningRun)
        projected = self._projected.flatten(0, 1).to(embeds.dtype)
        newline = self.model.model.image_newline.to(embeds.dtype)
        sources = match_rows(embeds, projected)
        is_newline = (_bits(embeds) == _bits(newline[None])).all(-1)
        unmatched = (sources < 0) & ~is_newline
        sources[is_newline] = NEWLINE
        if bool(unmatched.any()):
            raise RuntimeError(f"{int(unmatched.sum())} image-token features are neither projector outputs nor "
                               "image_newline: LLaVA-NeXT pruning needs the model's own image features")
        return sources.to(cols.device)

    def _parts(self, input_ids: torch.Tensor) -> list[Part]:
        if self._projected is None or self._lm_embeds is None:
            return []
        rows, cols = (input_ids == self.model.config.image_token_id).nonzero(as_tuple=True)  # the packing order
        self.sources = sources = self._sources(rows, cols)
        src = sources.tolist()
        n = self._projected.shape[1]
        views = self._projected.shape[0]
        starts = [i for i in range(len(src) - n + 1)  # a base view: one view's n tokens in order, no newline
                  if src[i] >= 0 and src[i] % n == 0 and src[i:i + n] == list(range(src[i], src[i] + n))]
        if not starts or starts[0] != 0:
            raise RuntimeError("the image tokens do not start with a base view")
        parts = []
        bounds = starts[1:] + [len(src)]
        first_views = [src[s] // n for s in starts] + [views]
        for image, (start, end) in enumerate(zip(starts, bounds)):
            image_views = (first_views[image], first_views[image + 1])
            parts += self._image_parts(image, rows, cols, sources, start, end, n, image_views)
        return parts

    def _image_parts(self, image, rows, cols, sources, start, end, n, views) -> list[Part]:
        src = sources[start:end].tolist()
        rest = src[n:]  # the crops' rows, each ending in a newline
        lines = [i for i, s in enumerate(rest) if s == NEWLINE]
        width = lines[0] if lines else 0
        if not lines or len(rest) != len(lines) * (width + 1) or \
                any(rest[i] != NEWLINE for i in range(width, len(rest), width + 1)):
            raise RuntimeError(f"image {image}'s tokens are not a base view then rows ending in a newline")
        row = int(rows[start])
        seed = lambda: image_seed(self._pixels[views[0]:views[1]])
        context = self._context(views, n)
        index = torch.arange(start, end, device=cols.device)
        base = index[:n]
        crop_tokens = torch.tensor([i for i, s in enumerate(rest) if s != NEWLINE], dtype=torch.long,
                                   device=cols.device)
        groups = [(base, _tokens_per_view(self.model.config))]
        if len(crop_tokens):
            if self.budget_scope == "part":  # each crop its own part, its unpadded rows and columns
                crop_of = sources[start + n + crop_tokens] // n
                for view in crop_of.unique().tolist():
                    tokens = crop_tokens[crop_of == view]
                    height = len((tokens // (width + 1)).unique())
                    groups.append((index[n + tokens], (height, len(tokens) // height)))
            else:
                groups.append((index[n + crop_tokens], (len(lines), width)))
        return [Part(image, row, cols[at], grid, context(sources[at], seed, number))
                for number, (at, grid) in enumerate(groups)]

    def _context(self, views: tuple[int, int], n: int):
        """part sources -> the part's VisualContext fields; one image's ViT [CLS] rows are computed once."""
        cache = {}

        def vision_parts():  # each view's [CLS] -> patch attention (heads summed) and keys (heads averaged)
            if not cache and self._vision_in is not None:
                layer = self._feature_layer()
                per_view = [cls_attention(layer, self._vision_in[v]) for v in range(*views)]
                cache["cls"] = torch.cat([a for a, _ in per_view])
                cache["keys"] = torch.cat([k for _, k in per_view])
            return cache

        def context(source: torch.Tensor, seed, number: int) -> dict:
            local = source - views[0] * n  # into this image's views
            vision = None if self._vision is None else self._vision.flatten(0, 1)[source.to(self._vision.device)]
            return {"image_seed": lambda: seed() + number, "vision_features": vision,
                    "project": self.model.model.multi_modal_projector.forward,  # .forward: not through our hook
                    "cls_attention": lambda: vision_parts()["cls"][local.to(vision_parts()["cls"].device)],
                    "vision_keys": lambda: vision_parts()["keys"][local.to(vision_parts()["keys"].device)]}

        return context
