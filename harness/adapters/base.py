"""What every model family's adapter shares: choosing tokens with a method, and removing them from
the language model's sequence (`PruningRun`). A family's module subclasses it and says only what
differs between families: where its visual tokens sit in the sequence and what its vision tower
knows about them (`_install_vision_hooks`, `_parts`), and how its positions are numbered.

    from harness.adapters import prune
    with prune(model, "fastv", budget=64) as run:
        out = model.generate(**inputs, max_new_tokens=8)
    run.images  # per image: its batch row, tokens in, kept indices

Two insertion points, chosen by the method's `stage`:

- `pre_llm`: at the language model's input, each part's visual tokens (the projector outputs, as
  they sit in `inputs_embeds`) are scored, and the dropped ones leave `inputs_embeds`, the
  attention mask and the position ids.
- `in_llm` (before decoder layer K): layers < K see every token; the last token's attention row at
  layer K-1 is computed from that layer's queries and keys (one row, any attention backend); at
  layer K the hidden states, mask and position embeddings are gathered, so the KV cache of layers
  >= K holds only the kept tokens.

A *part* is what a method chooses among: an image (LLaVA, Qwen), a view of an image (LLaVA-NeXT's
base view and its crops) or a video frame. The budget is per image; an image of several parts
splits its tokens over them in proportion to their sizes (`budget_scope="image"`), or each part
gets the budget on its own (`budget_scope="part"`); a video's frames always get it each (a frame
is an image to the methods). An image of several parts records the scope and its part sizes.

Rows stay left-padded (a row that lost more tokens gets more padding), so batches of any size give
the answers batch 1 gives. During decoding, the 2D attention mask `generate()` keeps at full
length is cut to the kept columns, and the new token's position follows the method's policy:
`renumber` (as if the kept tokens had been the whole input) or `original` (the position the token
had before pruning). Positions may carry leading axes (M-RoPE's (3, B, T)): they are gathered, never
recomputed.

Only hooks are used: on exit every hook is removed and the model is exactly as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import methods
from methods.base import Method, Selection, VisualContext

from harness.budget import DEFAULT_BUDGET_SCOPE, check_budget, check_scope, for_method, tokens_to_keep
from harness.metrics.ipr import ipr

from .attention import last_token_attention
from .checks import check_finite


@dataclass
class Part:
    """One group of visual tokens a method chooses among, and where they sit in the batch."""

    image: int  # the image (or video) it belongs to, numbered in the order the batch holds them
    row: int  # its batch row
    columns: torch.Tensor  # (n,) its tokens' columns in the full sequence, ascending
    grid: tuple[int, int]  # (h, w), h * w == n
    #: the rest of its VisualContext (image_seed, vision_features, project, cls_attention, vision_keys)
    context: dict = field(default_factory=dict)
    #: a video frame (or Qwen's two-frame step): it gets the budget on its own, whatever the scope
    frame: bool = False

    @property
    def size(self) -> int:
        return len(self.columns)


@dataclass
class ImageRecord:
    tokens_in: int
    kept: torch.Tensor  # indices into the image's tokens (its parts' in order), ascending
    extra: dict = field(default_factory=dict)
    row: int = 0  # the batch row holding the image


@dataclass
class _Layout:
    """How the pruned sequence maps onto the full one, for one batch (set at prefill)."""

    index: torch.Tensor  # (B, T') columns of the full sequence each pruned column takes (left-padded)
    mask: torch.Tensor  # (B, T') attention mask of the pruned prefix
    full_length: int  # T: length of the full prefix
    shift: torch.Tensor  # (B,) full position - renumbered position of the last prefix token


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """k tokens over parts of `sizes`, in proportion (largest remainders first, earlier parts on ties)."""
    total = sum(sizes)
    shares = [k * n / total for n in sizes]
    counts = [int(s) for s in shares]
    order = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:k - sum(counts)]:
        counts[i] += 1
    return counts


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions (..., B, T) at the columns `index` (B, T') of each row: (..., B, T')."""
    return positions.gather(-1, index.expand(*positions.shape[:-2], -1, -1))


class PruningRun:
    """The hooks that apply one method at one budget to one model; see the module docstring.

    A family's subclass implements `_install_vision_hooks` and `_parts`, and may override
    `tokens_per_image`, `refusals`, `visual_tokens_per_row` and `_split_positions`."""

    #: True where positions are M-RoPE ids (Qwen): they are gathered (`original`) whatever the method's policy
    gathers_positions = False
    #: the vision encoder and the projector, as paths from the model (operation counts name them)
    vision_module = "model.vision_tower"
    projector_module = "model.multi_modal_projector"

    def __init__(self, model, method: Method | str, budget=None, record_ipr: bool = True,
                 budget_scope: str = DEFAULT_BUDGET_SCOPE, **params):
        if isinstance(method, str):
            method = methods.get(method, **params)
        check_scope(budget_scope)
        self.model = model
        self.method = method
        self.budget = for_method(method, check_budget(budget, self.tokens_per_image(model.config)))
        self.budget_scope = budget_scope
        self.layer = getattr(method, "layer", None)  # K, for in-LLM methods
        self.check(method, model.config)
        self.position_policy = "original" if self.gathers_positions else method.position_policy
        self.images: list[ImageRecord] = []
        self.record_ipr = record_ipr  # off in timing and FLOPs passes: the SVD is measurement, not method
        self.selection_seconds = 0.0  # time spent in the method's select() (scores and choice)
        #: (B,) the position whose attention scores the image (in-LLM methods), when it is not each
        #: row's last real token: scoring a continuation, the last prompt token (set by the caller).
        self.query_positions: torch.Tensor | None = None
        self._handles = []
        self._reset()

    # ------------------------------------------------------------------ what a family says
    @staticmethod
    def tokens_per_image(config) -> int | None:
        """The visual tokens of one image, when every image has the same count (the largest integer
        budget); None where the count varies per image (a count budget is then capped per image)."""
        return None

    @classmethod
    def check(cls, method: Method, config) -> None:
        """A ValueError (one line) when `method` cannot run on this model: the method's own check
        (FastV's K inside the decoder, a codebook's width), then what it needs that the family lacks
        (`refusals`). Called when pruning starts, and by the runner and bench before any cell."""
        method.validate(config)
        name = getattr(method, "name", type(method).__name__)
        if name in cls.refusals:
            raise ValueError(f"{name} cannot run on {config.model_type}: {cls.refusals[name]}")

    #: registered method name -> why this family cannot run it (what it needs that the family lacks)
    refusals: dict[str, str] = {}

    @staticmethod
    def visual_tokens_per_row(model, inputs) -> list[int]:
        """The prunable visual tokens of each row of `inputs` (a processor's output), as the unpruned
        model reads them: the image (and video) tokens; a family with tokens never pruned (LLaVA-NeXT's
        newlines) leaves them out."""
        config = model.config
        ids = inputs["input_ids"]
        counted = torch.zeros_like(ids, dtype=torch.bool)
        for name in ("image_token_id", "video_token_id"):
            token = getattr(config, name, None)
            if token is not None:
                counted |= ids == token
        return counted.sum(-1).tolist()

    def _install_vision_hooks(self, add) -> None:
        """Register (through `add(handle)`) the hooks that capture what `_parts` needs from the
        vision side, and set `self._images_pending = True` when a forward encodes images."""
        raise NotImplementedError

    def _parts(self, input_ids: torch.Tensor) -> list[Part]:
        """The batch's parts, in image order, from the prompt's ids (and what the vision hooks saw)."""
        raise NotImplementedError

    @staticmethod
    def _split_positions(position_ids):
        """(text positions (B, T), rotary positions) of the language model's `position_ids`: the same
        tensor for 1-D RoPE; Qwen's (4, B, T) carry the text row first, then M-RoPE's three."""
        return position_ids, position_ids

    # ------------------------------------------------------------------ lifecycle
    def _reset(self):
        self._input_ids = None
        self._images_pending = False
        self._selections = None  # [(part, Selection)] waiting for the sequence to be cut
        self._layout = None
        self._lm_kwargs = {}
        self._pruned_kwargs = {}
        #: the prefill's unpruned `inputs_embeds` (B, T, D), while `_parts` may read it (a family that finds
        #: its layout in the merged sequence: LLaVA-NeXT, OneVision)
        self._lm_embeds = None

    @property
    def language_model(self):
        return self.model.model.language_model

    def __enter__(self):
        lm = self.language_model
        add = self._handles.append
        self._install_vision_hooks(add)
        add(self.model.model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
        add(lm.register_forward_pre_hook(self._on_lm_input, with_kwargs=True))
        if self.method.stage == "in_llm":
            add(lm.layers[self.layer - 1].register_forward_pre_hook(self._on_layer_before_k, with_kwargs=True))
            for layer in lm.layers[self.layer:]:
                add(layer.register_forward_pre_hook(self._on_pruned_layer, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset()
        return False

    def columns(self) -> torch.Tensor | None:
        """(B, T') the full-sequence column of each position of the last pruned forward's output
        (None when nothing was pruned): to find a token's logits after pruning."""
        return None if self._layout is None else self._layout.index

    def _on_model_input(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:  # a new prompt: its ids locate the visual tokens
            self._input_ids = kwargs.get("input_ids", args[0] if args else None)
            self._layout = None
        return None

    # ------------------------------------------------------------------ choosing
    def _select_all(self, parts: list[Part], features_of, attention_rows=None) -> list[tuple[Part, Selection]]:
        """Each part's selection, image by image (`features_of(part)`: its (n, D) features)."""
        by_image: dict[int, list[Part]] = {}
        for part in parts:
            by_image.setdefault(part.image, []).append(part)
        out = []
        for image, group in by_image.items():
            out += self._select_image(image, group, features_of, attention_rows)
        return out

    def _select_image(self, image: int, parts: list[Part], features_of, attention_rows):
        sizes = [part.size for part in parts]
        scope = "frame" if parts[0].frame else self.budget_scope
        if scope == "image":
            ks = split_budget(tokens_to_keep(self.budget, sum(sizes)), sizes)
        else:
            ks = [tokens_to_keep(self.budget, n) for n in sizes]
        name = getattr(self.method, "name", type(self.method).__name__)
        chosen, kept, all_features, kept_features, offset = [], [], [], [], 0
        for part, k in zip(parts, ks):
            features = features_of(part)
            row = None if attention_rows is None else attention_rows[part.row, part.columns]
            ctx = VisualContext(features=features, grid=part.grid, attention_row=row, **part.context)
            # Once per part: NaN or inf features (an fp16 overflow) would be chosen from silently.
            check_finite(image, name, features=features, vision_features=ctx.vision_features, attention_row=row)
            selection = self._timed_select(ctx, k)
            chosen.append((part, selection))
            kept.append(selection.kept.cpu() + offset)
            offset += part.size
            if self.record_ipr:
                all_features.append(features)
                kept_features.append(selection.features if selection.features is not None
                                     else features[selection.kept])
        extra = dict(chosen[0][1].extra) if len(chosen) == 1 else {"budget_scope": scope, "part_sizes": sizes}
        if self.record_ipr:
            extra["delta_ipr"] = ipr(torch.cat(kept_features)) - ipr(torch.cat(all_features))
        self.images.append(ImageRecord(offset, torch.cat(kept), extra, parts[0].row))
        return chosen

    def _timed_select(self, ctx: VisualContext, k: int) -> Selection:
        started = time.perf_counter()
        with torch.no_grad():
            selection = self.method.select(ctx, k)
        if ctx.features.is_cuda:
            torch.cuda.synchronize(ctx.features.device)
        self.selection_seconds += time.perf_counter() - started
        kept = selection.kept
        if kept.ndim != 1 or (len(kept) > 1 and not bool((kept[1:] > kept[:-1]).all())):
            raise RuntimeError(f"{self.method!r} returned kept indices that are not ascending and distinct")
        if not self.method.adaptive and len(kept) != k:
            raise RuntimeError(f"{self.method!r} kept {len(kept)} tokens, the budget asks for {k}")
        return selection

    # ------------------------------------------------------------------ the sequence
    def _make_layout(self, attention_mask, position_ids, length) -> tuple[_Layout, torch.Tensor]:
        device = self._input_ids.device
        batch = self._input_ids.shape[0]
        keep = torch.ones(batch, length, dtype=torch.bool, device=device)
        for part, selection in self._selections:
            dropped = torch.ones(part.size, dtype=torch.bool, device=device)
            dropped[selection.kept.to(device)] = False
            keep[part.row, part.columns.to(device)[dropped]] = False
        lengths = keep.sum(1)
        new_length = int(lengths.max())
        index = torch.zeros(batch, new_length, dtype=torch.long, device=device)
        valid = torch.zeros(batch, new_length, dtype=torch.bool, device=device)
        for b in range(batch):
            columns = keep[b].nonzero().flatten()
            index[b, new_length - len(columns):] = columns
            valid[b, new_length - len(columns):] = True
        full_mask = attention_mask if attention_mask is not None else \
            torch.ones(batch, length, dtype=torch.long, device=device)
        mask = full_mask.gather(1, index) * valid
        full_pos = position_ids if position_ids is not None else \
            torch.arange(length, device=device).expand(batch, -1)
        if self.position_policy == "original":
            new_pos = gather_positions(full_pos, index)
        elif position_ids is not None:  # renumbered the way the caller numbers: from the mask
            new_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            new_pos = torch.arange(new_length, device=device).expand(batch, -1)
        full_text, _ = self._split_positions(full_pos)
        new_text, _ = self._split_positions(new_pos)
        shift = full_text[:, -1] - new_text[:, -1]
        return _Layout(index, mask.to(full_mask.dtype), length, shift), new_pos

    def _decode_inputs(self, attention_mask, position_ids):
        """A decode step's mask (kept prefix columns, then the new ones) and position ids."""
        layout = self._layout
        mask = None
        if attention_mask is not None:
            mask = torch.cat([layout.mask.to(attention_mask.dtype), attention_mask[:, layout.full_length:]], dim=1)
        if position_ids is None and attention_mask is not None:
            position_ids = attention_mask.long().sum(-1, keepdim=True) - 1  # generate's own numbering
        if position_ids is not None and self.position_policy == "renumber":
            position_ids = position_ids - layout.shift[:, None]
        return mask, position_ids

    def _is_continuation(self, kwargs) -> bool:
        """A decoding step after a pruned prompt (the prompt's layout is known)."""
        cache = kwargs.get("past_key_values")
        return self._layout is not None and cache is not None and cache.get_seq_length() > 0

    def _on_lm_input(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if self._images_pending and self._layout is None:
            self._lm_embeds = embeds
        if self.method.stage == "pre_llm" and self._images_pending and self._layout is None:
            parts = self._parts(self._input_ids)
            self._lm_embeds = None
            self._selections = self._select_all(parts, lambda p: embeds[p.row, p.columns])
            layout, new_pos = self._make_layout(kwargs.get("attention_mask"), kwargs.get("position_ids"),
                                                embeds.shape[1])
            embeds = embeds.gather(1, layout.index[..., None].expand(-1, -1, embeds.shape[-1])).clone()
            self._write_merged_features(embeds, layout)
            self._layout, self._selections, self._images_pending = layout, None, False
            return args, {**kwargs, "inputs_embeds": embeds, "attention_mask": layout.mask, "position_ids": new_pos}
        if self.method.stage == "pre_llm" and self._is_continuation(kwargs):
            mask, pos = self._decode_inputs(kwargs.get("attention_mask"), kwargs.get("position_ids"))
            return args, {**kwargs, "attention_mask": mask, "position_ids": pos}
        if self.method.stage == "in_llm":
            self._lm_kwargs = kwargs  # the 2D mask and position ids, for the pruned layers
        return None

    def _write_merged_features(self, embeds, layout):
        """Merging methods replace their kept tokens' features."""
        for part, selection in self._selections:
            if selection.features is None:
                continue
            target = part.columns.to(layout.index.device)[selection.kept.to(layout.index.device)]
            where = (layout.index[part.row] == target[:, None]).float().argmax(1)
            embeds[part.row, where] = selection.features.to(embeds.dtype)

    # ------------------------------------------------------------------ in-LLM (before layer K)
    def _on_layer_before_k(self, module, args, kwargs):
        """At layer K-1's input: the last token's attention over every visual token (heads averaged)."""
        if not self._images_pending or self._selections is not None or self._layout is not None:
            return None  # no images, or a decoding step (the prompt was pruned already)
        hidden = args[0] if args else kwargs["hidden_states"]
        mask2d = self._lm_kwargs.get("attention_mask")
        query = self.query_positions
        if query is None and mask2d is not None:  # each row's last real token (right padding too)
            query = (mask2d.shape[1] - 1) - mask2d.long().flip(1).argmax(1)
        rows = last_token_attention(module, hidden, kwargs["position_embeddings"], mask2d, query)  # (B, T)
        parts = self._parts(self._input_ids)
        self._lm_embeds = None
        self._selections = self._select_all(parts, lambda p: hidden[p.row, p.columns], attention_rows=rows)
        return None

    def _on_pruned_layer(self, module, args, kwargs):
        lm = self.language_model
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._selections is not None:  # prefill, at layer K: gather everything
            layout, new_pos = self._make_layout(self._lm_kwargs.get("attention_mask"),
                                                self._lm_kwargs.get("position_ids"), hidden.shape[1])
            hidden = hidden.gather(1, layout.index[..., None].expand(-1, -1, hidden.shape[-1]))
            self._layout, self._selections, self._images_pending = layout, None, False
            self._pruned_kwargs = self._layer_kwargs(lm, hidden, layout.mask, new_pos, kwargs)
        elif self._is_continuation(kwargs) and module is lm.layers[self.layer]:
            positions = self._lm_kwargs.get("position_ids")  # M-RoPE's rows reach no decoder layer
            mask, pos = self._decode_inputs(self._lm_kwargs.get("attention_mask"),
                                            kwargs.get("position_ids") if positions is None else positions)
            self._pruned_kwargs = self._layer_kwargs(lm, hidden, mask, pos, kwargs)
        elif self._layout is None:
            return None
        new_args = (hidden,) + tuple(args[1:]) if args else args
        new_kwargs = {**kwargs, **self._pruned_kwargs}
        if not args:
            new_kwargs["hidden_states"] = hidden
        return new_args, new_kwargs

    def _layer_kwargs(self, lm, hidden, mask2d, position_ids, kwargs) -> dict:
        """Mask and position embeddings for layers >= K, sized by their own (shorter) cache."""
        from transformers.masking_utils import create_causal_mask

        if position_ids is None:
            cache = kwargs.get("past_key_values")
            seen = cache.get_seq_length(self.layer) if cache is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + seen)[None]
        text_positions, rotary_positions = self._split_positions(position_ids)
        mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d,
                                  past_key_values=kwargs.get("past_key_values"), position_ids=text_positions,
                                  layer_idx=self.layer)
        return {"attention_mask": mask, "position_ids": text_positions,
                "position_embeddings": lm.rotary_emb(hidden, rotary_positions)}
