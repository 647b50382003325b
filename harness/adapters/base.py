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
- `in_llm` (before decoder layer K, or before several layers K_1 < K_2 < ... in turn: multi-stage):
  layers < K_1 see every token; at each K_s the hidden states, mask and position embeddings are
  gathered, so the KV cache of each layer holds what that layer saw. Stage s chooses among the tokens
  still present, from the hidden states entering K_s (a decision module after layer K_s - 1), or, for
  a method that reads the last token's attention (`needs_attention_row`: FastV), at layer K_s - 1's
  input, where that row is computed from the layer's queries and keys (one row, any attention
  backend). The method says how many tokens of an image each stage keeps (`stage_counts`); the
  budget is what the last stage keeps.

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

import functools
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
    valid: torch.Tensor  # (B, T') bool: the column holds a kept token (not the left padding pruning adds)
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
        self.check(method, model.config)
        #: in-LLM: the decoder layers K_1 < K_2 < ... before which tokens are removed (one for FastV)
        self.stages = tuple(method.stage_layers()) if method.stage == "in_llm" else ()
        self.position_policy = "original" if self.gathers_positions else method.position_policy
        self.images: list[ImageRecord] = []
        self.record_ipr = record_ipr  # off in timing and FLOPs passes: the SVD is measurement, not method
        self.selection_seconds = 0.0  # time spent in the method's select() (scores and choice)
        self.selection_module_calls = 0  # modules the method called in select() (see _timed_select)
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
        return PruningRun._visual_token_mask(model.config, inputs["input_ids"]).sum(-1).tolist()

    @classmethod
    def vision_hooked_modules(cls, model) -> list[str] | None:
        """Every module (a path from `model`) `_install_vision_hooks` hooks: on a vision-cache hit
        (harness.evaluation.vision_cache) those modules do not run, and their hooks get the recorded calls instead.
        None: not declared, so the family's vision calls are never cached."""
        return None

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
        self._layout = None  # no stage applied yet
        self._lm_kwargs = {}
        #: the prompt being pruned (set by its first stage): which full columns are still kept (B, T),
        #: each part's tokens still present (indices into the part, by `id(part)`), and each image's
        #: record with its first stage's features (for delta IPR)
        self._keep = None
        self._alive: dict[int, torch.Tensor] = {}
        self._open: dict[int, tuple] = {}
        self._pruned_kwargs = {}
        #: the prefill's unpruned `inputs_embeds` (B, T, D), while `_parts` may read it (a family that finds
        #: its layout in the merged sequence: LLaVA-NeXT, OneVision)
        self._lm_embeds = None

    @property
    def _layout(self) -> _Layout | None:
        """The last stage's layout: what the pruned forward's output columns are (None: nothing pruned)."""
        return self._stage_layouts[-1] if self._stage_layouts else None

    @_layout.setter
    def _layout(self, layout: _Layout | None):  # None: a new prompt; a layout: the one stage of a pre-LLM cut
        self._stage_layouts = [] if layout is None else [layout]

    @property
    def layer(self) -> int | None:
        """K, the first layer before which an in-LLM method removes tokens (None pre-LLM)."""
        return self.stages[0] if self.stages else None

    @property
    def language_model(self):
        return self.model.model.language_model

    def __enter__(self):
        lm = self.language_model
        add = self._handles.append
        self._install_vision_hooks(add)
        add(self.model.model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
        add(lm.register_forward_pre_hook(self._on_lm_input, with_kwargs=True))
        for i, layer in enumerate(lm.layers if self.stages else ()):
            # On one layer, a stage's gather runs before the next stage's scoring (pre-hooks run in order).
            if i >= self.stages[0]:
                add(layer.register_forward_pre_hook(functools.partial(self._on_pruned_layer, i), with_kwargs=True))
            if self.method.needs_attention_row and i + 1 in self.stages:
                stage = self.stages.index(i + 1)
                add(layer.register_forward_pre_hook(functools.partial(self._on_scoring_layer, stage),
                                                    with_kwargs=True))
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

    def stage_columns(self) -> list[torch.Tensor]:
        """For each stage of the last pruned forward, (B, T_s) the full-sequence column each of its positions
        takes (one for pre-LLM and single-stage methods: `columns()`); left padding that pruning added holds
        column 0. Empty when nothing was pruned."""
        return [layout.index for layout in self._stage_layouts]

    def _on_model_input(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:  # a new prompt: its ids locate the visual tokens
            self._input_ids = kwargs.get("input_ids", args[0] if args else None)
            self._layout = None
        return None

    # ------------------------------------------------------------------ choosing
    def _begin(self, hidden: torch.Tensor, mask2d) -> None:
        """A prompt's first stage: its parts, every column kept, and each row's prompt text columns."""
        self._parts_now = self._parts(self._input_ids)
        self._lm_embeds = None
        self._alive, self._open = {}, {}
        batch, length = hidden.shape[:2]
        self._keep = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        ids = self._input_ids.to(hidden.device)
        real = torch.ones_like(self._keep) if mask2d is None else mask2d.to(hidden.device).bool()
        query = self.query_positions
        if query is None:  # each row's last real token (right padding too)
            query = (length - 1) - real.long().flip(1).argmax(1)
        columns = torch.arange(length, device=hidden.device)
        text = ~self._visual_token_mask(self.model.config, ids) & real & (columns[None] <= query.to(columns)[:, None])
        #: per row, the full columns of the prompt's text (what language-guided methods read)
        self._text_columns = [text[b].nonzero().flatten() for b in range(batch)]

    @staticmethod
    def _visual_token_mask(config, ids: torch.Tensor) -> torch.Tensor:
        """True at the image (and video) placeholder ids of `ids`."""
        visual = torch.zeros_like(ids, dtype=torch.bool)
        for name in ("image_token_id", "video_token_id"):
            token = getattr(config, name, None)
            if token is not None:
                visual |= ids == token
        return visual

    def _current(self, row: int, columns: torch.Tensor) -> torch.Tensor:
        """Where full `columns` of `row` sit in the sequence as it is now (after the stages applied)."""
        columns = columns.to(self._keep.device)
        return columns if self._layout is None else self._inverse[row, columns]

    def _select_all(self, hidden: torch.Tensor, attention_rows=None, stage: int = 0) -> list[tuple[Part, Selection]]:
        """Each part's selection among its tokens still present, image by image, from the current
        sequence's `hidden` (B, T, D) (pre-LLM: the language model's input embeddings)."""
        by_image: dict[int, list[Part]] = {}
        for part in self._parts_now:
            by_image.setdefault(part.image, []).append(part)
        out = []
        for image, group in by_image.items():
            out += self._select_image(image, group, hidden, attention_rows, stage)
        return out

    def _stage_counts(self, n: int, k: int) -> list[int]:
        """The tokens of a part of `n` still present after each stage, for a final count `k`."""
        if len(self.stages) <= 1:
            return [k]
        counts = [int(c) for c in self.method.stage_counts(n, k)]
        if len(counts) != len(self.stages) or counts[-1] != k or any(b > a for a, b in zip([n] + counts, counts)):
            raise RuntimeError(f"{self.method!r} gave stage counts {counts} for {n} tokens and a budget of {k}: "
                               f"expected {len(self.stages)} non-increasing counts ending at {k}")
        return counts

    def _select_image(self, image: int, parts: list[Part], hidden, attention_rows, stage: int):
        sizes = [part.size for part in parts]
        scope = "frame" if parts[0].frame else self.budget_scope
        if scope == "image":
            ks = split_budget(tokens_to_keep(self.budget, sum(sizes)), sizes)
        else:
            ks = [tokens_to_keep(self.budget, n) for n in sizes]
        name = getattr(self.method, "name", type(self.method).__name__)
        stages = max(1, len(self.stages))
        chosen, firsts = [], []  # firsts: per part, (its features, a merging method's replacements or None)
        for part, k in zip(parts, ks):
            alive = self._alive.get(id(part), torch.arange(part.size))
            columns = self._current(part.row, part.columns[alive.to(part.columns.device)])
            features = hidden[part.row, columns]
            row = None if attention_rows is None else attention_rows[part.row, columns]
            text = hidden[part.row, self._current(part.row, self._text_columns[part.row])]
            grid = part.grid if stage == 0 else (1, len(alive))  # later stages choose among scattered tokens
            ctx = VisualContext(features=features, grid=grid, attention_row=row, stage=stage, text_features=text,
                                **part.context)
            # Once per part: NaN or inf features (an fp16 overflow) would be chosen from silently.
            check_finite(image, name, features=features, vision_features=ctx.vision_features, attention_row=row)
            selection = self._timed_select(ctx, self._stage_counts(part.size, k)[stage])
            chosen.append((part, selection))
            self._alive[id(part)] = alive[selection.kept.cpu()]
            if self.record_ipr:  # kept only for delta IPR: a timing pass holds no copies
                firsts.append((features, selection.features))
        offsets = [sum(sizes[:i]) for i in range(len(parts))]
        kept = torch.cat([self._alive[id(part)] + offset for part, offset in zip(parts, offsets)])
        if stage == 0:
            extra = dict(chosen[0][1].extra) if len(chosen) == 1 else {"budget_scope": scope, "part_sizes": sizes}
            record = ImageRecord(sum(sizes), kept, extra, parts[0].row)
            self.images.append(record)
            self._open[image] = (record, firsts)  # delta IPR compares the first stage's features
        record, firsts = self._open[image]
        record.kept = kept
        if len(self.stages) > 1:
            record.extra.setdefault("stage_tokens", []).append(len(kept))
        if stage == stages - 1:
            if self.record_ipr:
                record.extra["delta_ipr"] = self._delta_ipr(parts, firsts)
            del self._open[image]
        return chosen

    def _delta_ipr(self, parts: list[Part], firsts) -> float:
        """IPR of the kept tokens' first-stage features minus that of every token's."""
        kept = [features[self._alive[id(part)].to(features.device)] if merged is None else merged
                for part, (features, merged) in zip(parts, firsts)]
        return ipr(torch.cat(kept)) - ipr(torch.cat([features for features, _ in firsts]))

    def _timed_select(self, ctx: VisualContext, k: int) -> Selection:
        started = time.perf_counter()
        # Modules called while the method chooses (a ViT layer for [CLS] attention, a decision module): the
        # operation counters credit their work to the model, where a pre-LLM method's own tensor work (run in
        # the language model's pre-hook, outside any counted module) is not counted.
        calls = torch.nn.modules.module.register_module_forward_pre_hook(self._count_module_call)
        try:
            with torch.no_grad():
                selection = self.method.select(ctx, k)
        finally:
            calls.remove()
        if ctx.features.is_cuda:
            torch.cuda.synchronize(ctx.features.device)
        self.selection_seconds += time.perf_counter() - started
        kept = selection.kept
        if kept.ndim != 1 or (len(kept) > 1 and not bool((kept[1:] > kept[:-1]).all())):
            raise RuntimeError(f"{self.method!r} returned kept indices that are not ascending and distinct")
        if not self.method.adaptive and len(kept) != k:
            raise RuntimeError(f"{self.method!r} kept {len(kept)} tokens, the budget asks for {k}")
        return selection

    def _count_module_call(self, module, args) -> None:
        self.selection_module_calls += 1

    # ------------------------------------------------------------------ the sequence
    def _apply(self, selections) -> None:
        """Mark the tokens each part's selection dropped as gone from the full sequence (`self._keep`)."""
        device = self._keep.device
        for part, _ in selections:
            gone = torch.ones(part.size, dtype=torch.bool)
            gone[self._alive[id(part)]] = False
            self._keep[part.row, part.columns.to(device)[gone.to(device)]] = False

    def _make_layout(self, attention_mask, position_ids) -> tuple[_Layout, torch.Tensor]:
        """The layout of the columns `self._keep` keeps, and their position ids (per the policy)."""
        keep = self._keep
        device = keep.device
        batch, length = keep.shape
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
        return _Layout(index, mask.to(full_mask.dtype), valid, length, shift), new_pos

    def _push(self, layout: _Layout) -> None:
        """A stage's layout becomes the current one; `_inverse` maps full columns to its columns (-1: gone)."""
        self._stage_layouts.append(layout)
        batch, width = layout.index.shape
        inverse = torch.full((batch, layout.full_length + 1), -1, dtype=torch.long, device=layout.index.device)
        target = torch.where(layout.valid, layout.index, layout.full_length)  # padding writes the spare column
        inverse.scatter_(1, target, torch.arange(width, device=target.device).expand(batch, -1))
        self._inverse = inverse[:, :-1]

    def _decode_inputs(self, layout: _Layout, attention_mask, position_ids):
        """A decode step's mask (`layout`'s kept prefix columns, then the new ones) and position ids."""
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
            self._begin(embeds, kwargs.get("attention_mask"))
            self._selections = self._select_all(embeds)
            self._apply(self._selections)
            layout, new_pos = self._make_layout(kwargs.get("attention_mask"), kwargs.get("position_ids"))
            embeds = embeds.gather(1, layout.index[..., None].expand(-1, -1, embeds.shape[-1])).clone()
            self._write_merged_features(embeds, layout)
            self._layout, self._selections, self._images_pending = layout, None, False
            return args, {**kwargs, "inputs_embeds": embeds, "attention_mask": layout.mask, "position_ids": new_pos}
        if self.method.stage == "pre_llm" and self._is_continuation(kwargs):
            mask, pos = self._decode_inputs(self._layout, kwargs.get("attention_mask"), kwargs.get("position_ids"))
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

    # ------------------------------------------------------------------ in-LLM (before layers K_1 < K_2 < ...)
    def _prefilling(self, stage: int) -> bool:
        """Stage `stage` of a prompt's prefill is still to be applied."""
        return self._images_pending and len(self._stage_layouts) == stage

    def _choose(self, stage: int, hidden: torch.Tensor, attention_rows=None) -> None:
        if stage == 0:
            self._begin(hidden, self._lm_kwargs.get("attention_mask"))
        self._selections = self._select_all(hidden, attention_rows, stage)

    def _on_scoring_layer(self, stage: int, module, args, kwargs):
        """At layer K_s - 1's input: the last token's attention over the tokens present (heads averaged)."""
        if not self._prefilling(stage) or self._selections is not None:
            return None  # no images, or a decoding step (the prompt was pruned already)
        hidden = args[0] if args else kwargs["hidden_states"]
        mask2d = self._lm_kwargs.get("attention_mask") if self._layout is None else self._layout.mask
        query = self.query_positions
        if query is not None and self._layout is not None:
            query = self._inverse[torch.arange(len(query)), query.to(self._inverse.device)]
        elif query is None and mask2d is not None:  # each row's last real token (right padding too)
            query = (mask2d.shape[1] - 1) - mask2d.long().flip(1).argmax(1)
        rows = last_token_attention(module, hidden, kwargs["position_embeddings"], mask2d, query)  # (B, T)
        self._choose(stage, hidden, rows)
        return None

    def _on_pruned_layer(self, index: int, module, args, kwargs):
        lm = self.language_model
        hidden = args[0] if args else kwargs["hidden_states"]
        stage = self.stages.index(index) if index in self.stages else None
        if stage is not None and self._prefilling(stage):  # prefill, at layer K_s: gather everything
            if self._selections is None:  # chosen here, from the hidden states entering K_s
                self._choose(stage, hidden)
            self._apply(self._selections)
            layout, new_pos = self._make_layout(self._lm_kwargs.get("attention_mask"),
                                                self._lm_kwargs.get("position_ids"))
            columns = layout.index if self._layout is None else self._inverse.gather(1, layout.index).clamp(min=0)
            hidden = hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))
            self._push(layout)
            self._selections = None
            self._images_pending = stage < len(self.stages) - 1
            self._pruned_kwargs = self._layer_kwargs(lm, hidden, layout.mask, new_pos, kwargs, index)
        elif stage is not None and self._is_continuation(kwargs):
            positions = self._lm_kwargs.get("position_ids")  # M-RoPE's rows reach no decoder layer
            mask, pos = self._decode_inputs(self._stage_layouts[stage], self._lm_kwargs.get("attention_mask"),
                                            kwargs.get("position_ids") if positions is None else positions)
            self._pruned_kwargs = self._layer_kwargs(lm, hidden, mask, pos, kwargs, index)
        elif self._layout is None:
            return None
        new_args = (hidden,) + tuple(args[1:]) if args else args
        new_kwargs = {**kwargs, **self._pruned_kwargs}
        if not args:
            new_kwargs["hidden_states"] = hidden
        return new_args, new_kwargs

    def _layer_kwargs(self, lm, hidden, mask2d, position_ids, kwargs, layer: int) -> dict:
        """Mask and position embeddings for the layers from `layer` on, sized by their own (shorter) cache."""
        from transformers.masking_utils import create_causal_mask

        if position_ids is None:
            cache = kwargs.get("past_key_values")
            seen = cache.get_seq_length(layer) if cache is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + seen)[None]
        text_positions, rotary_positions = self._split_positions(position_ids)
        mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d,
                                  past_key_values=kwargs.get("past_key_values"), position_ids=text_positions,
                                  layer_idx=layer)
        return {"attention_mask": mask, "position_ids": text_positions,
                "position_embeddings": lm.rotary_emb(hidden, rotary_positions)}
