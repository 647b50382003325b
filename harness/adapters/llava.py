"""Where visual tokens are removed in a Hugging Face LLaVA model (`LlavaForConditionalGeneration`).

    from harness.adapters import prune
    with prune(model, "fastv", budget=64) as run:
        out = model.generate(**inputs, max_new_tokens=8)
    run.images  # per image: tokens in, kept indices

Two insertion points, chosen by the method's `stage`:

- `pre_llm`: each image's projector outputs are scored; at the language model's input the dropped
  image tokens leave `inputs_embeds`, the attention mask and the position ids.
- `in_llm` (before decoder layer K): layers < K see every token; the last token's attention row at
  layer K-1 is computed from that layer's queries and keys (one row, any attention backend); at
  layer K the hidden states, mask and position embeddings are gathered, so the KV cache of layers
  >= K holds only the kept tokens.

Rows stay left-padded (a row that lost more tokens gets more padding), so batches of any size give
the answers batch 1 gives. Image tokens are found from the input ids. During decoding, the 2D
attention mask `generate()` keeps at full length is cut to the kept columns, and the new token's
position follows the method's policy: `renumber` (as if the kept tokens had been the whole input)
or `original` (the position the token had before pruning).

Only hooks are used: on exit every hook is removed and the model is exactly as it was.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass, field

import torch

import methods
from methods.base import Method, Selection, VisualContext

from harness.budget import check_budget, for_method, tokens_to_keep
from harness.metrics.ipr import ipr

from .attention import cls_attention, last_token_attention
from .checks import check_finite


@dataclass
class ImageRecord:
    tokens_in: int
    kept: torch.Tensor  # indices into the image's tokens, ascending
    extra: dict = field(default_factory=dict)


@dataclass
class _Layout:
    """How the pruned sequence maps onto the full one, for one batch (set at prefill)."""

    index: torch.Tensor  # (B, T') columns of the full sequence each pruned column takes (left-padded)
    mask: torch.Tensor  # (B, T') attention mask of the pruned prefix
    full_length: int  # T: length of the full prefix
    shift: torch.Tensor  # (B,) full position - renumbered position of the last prefix token


def _image_seed(pixels: torch.Tensor) -> int:
    """A stable per-image seed: the image's pixels, not its place in the batch."""
    return zlib.crc32(pixels.detach().to(torch.float32).cpu().numpy().tobytes())


class PruningRun:
    """The hooks that apply one method at one budget to one model; see the module docstring."""

    def __init__(self, model, method: Method | str, budget=None, record_ipr: bool = True, **params):
        if isinstance(method, str):
            method = methods.get(method, **params)
        self.model = model
        self.method = method
        self.budget = for_method(method, check_budget(budget, getattr(model.config, "image_seq_length", None)))
        self.layer = getattr(method, "layer", None)  # K, for in-LLM methods
        method.validate(model.config)  # e.g. FastV's K inside the decoder, a codebook's width
        self.images: list[ImageRecord] = []
        self.record_ipr = record_ipr  # off in timing and FLOPs passes: the SVD is measurement, not method
        self.selection_seconds = 0.0  # time spent in the method's select() (scores and choice)
        #: (B,) the position whose attention scores the image (in-LLM methods), when it is not each
        #: row's last real token: scoring a continuation, the last prompt token (set by the caller).
        self.query_positions: torch.Tensor | None = None
        self._handles = []
        self._reset()

    # ------------------------------------------------------------------ lifecycle
    def _reset(self):
        self._input_ids = None
        self._pixels = None
        self._vision_in = None  # input of the ViT's feature layer (B, 1 + N, Dv)
        self._selections = None
        self._images_pending = False
        self._layout = None
        self._lm_kwargs = {}
        self._pruned_kwargs = {}
        self._tokens_per_image = None

    def __enter__(self):
        lm = self.model.model.language_model
        add = self._handles.append
        add(self.model.model.vision_tower.register_forward_pre_hook(self._on_vision_input, with_kwargs=True))
        add(self.model.model.register_forward_pre_hook(self._on_llava_input, with_kwargs=True))
        add(self._feature_layer().register_forward_pre_hook(self._on_feature_layer_input))
        add(self.model.model.multi_modal_projector.register_forward_hook(self._on_projector_output))
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

    # ------------------------------------------------------------------ vision side
    def _feature_layer(self):
        """The ViT layer whose output LLaVA reads (vision_feature_layer, e.g. -2)."""
        tower = self.model.model.vision_tower
        layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers
        index = self.model.config.vision_feature_layer
        if not isinstance(index, int):
            raise ValueError("pruning supports a single vision_feature_layer")
        return layers[index - 1] if index > 0 else layers[len(layers) + index]

    # The vision tower may run inside LlavaModel.forward or before it (generate() encodes images
    # once, up front): selections wait in `_selections` until the language model consumes them.
    def _on_vision_input(self, module, args, kwargs):
        self._selections, self._layout = None, None
        self._pixels = args[0] if args else kwargs["pixel_values"]
        self._images_pending = True

    def _on_llava_input(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:  # a new prompt: its ids locate the image tokens
            self._input_ids = kwargs.get("input_ids", args[0] if args else None)
            self._layout = None
        return None

    def _on_feature_layer_input(self, module, args):
        self._vision_in = args[0]

    def _vision_attention_parts(self, image: int):
        """[CLS]->patch attention (heads summed) and keys (heads averaged) of the feature layer."""
        return cls_attention(self._feature_layer(), self._vision_in[image])

    def _on_projector_output(self, module, args, output):
        if not self._images_pending or self.method.stage != "pre_llm":
            return None
        vision = args[0]  # (images, N, Dv): the feature layer, [CLS] dropped
        self._selections = [self._select(i, output[i], vision[i], output.shape[1]) for i in range(output.shape[0])]
        return None

    def _context(self, i, features, n, vision=None, attention_row=None) -> VisualContext:
        side = int(round(n ** 0.5))
        vision_parts = {}

        def parts():
            if not vision_parts and self._vision_in is not None:
                vision_parts["cls"], vision_parts["keys"] = self._vision_attention_parts(i)
            return vision_parts

        return VisualContext(
            features=features, grid=(side, n // side) if side * side == n else (1, n),
            image_seed=lambda: _image_seed(self._pixels[i]), vision_features=vision,
            project=self.model.model.multi_modal_projector.forward,  # .forward: not through our hook
            cls_attention=lambda: parts()["cls"], vision_keys=lambda: parts()["keys"],
            attention_row=attention_row)

    def _select(self, i, features, vision, n, attention_row=None) -> Selection:
        n = int(n)  # a traced size (fvcore) is a tensor
        self._tokens_per_image = n
        k = tokens_to_keep(self.budget, n)
        # Once per image: NaN or inf features (an fp16 overflow) would be chosen from silently.
        check_finite(i, getattr(self.method, "name", type(self.method).__name__),
                     features=features, vision_features=vision, attention_row=attention_row)
        started = time.perf_counter()
        with torch.no_grad():
            selection = self.method.select(self._context(i, features, n, vision, attention_row), k)
        if features.is_cuda:
            torch.cuda.synchronize(features.device)
        self.selection_seconds += time.perf_counter() - started
        kept = selection.kept
        if kept.ndim != 1 or (len(kept) > 1 and not bool((kept[1:] > kept[:-1]).all())):
            raise RuntimeError(f"{self.method!r} returned kept indices that are not ascending and distinct")
        if not self.method.adaptive and len(kept) != k:
            raise RuntimeError(f"{self.method!r} kept {len(kept)} tokens, the budget asks for {k}")
        extra = dict(selection.extra)
        if self.record_ipr:
            kept_features = selection.features if selection.features is not None else features[kept]
            extra["delta_ipr"] = ipr(kept_features) - ipr(features)
        self.images.append(ImageRecord(n, kept.cpu(), extra))
        return selection

    # ------------------------------------------------------------------ the sequence
    def _image_positions(self, n_images: int, n: int):
        """(row, column) of each image's tokens in the batch, images in the order LLaVA fills them."""
        rows, cols = (self._input_ids == self.model.config.image_token_id).nonzero(as_tuple=True)
        if len(rows) != n_images * n:
            raise RuntimeError(f"{len(rows)} image tokens in the input ids for {n_images} images of {n} tokens")
        return rows.view(n_images, n), cols.view(n_images, n)

    def _make_layout(self, attention_mask, position_ids, length) -> tuple[_Layout, torch.Tensor]:
        device = self._input_ids.device
        batch = self._input_ids.shape[0]
        keep = torch.ones(batch, length, dtype=torch.bool, device=device)
        n_tokens = self._tokens_per_image
        rows, cols = self._image_positions(len(self._selections), n_tokens)
        for i, selection in enumerate(self._selections):
            dropped = torch.ones(n_tokens, dtype=torch.bool, device=device)
            dropped[selection.kept.to(device)] = False
            keep[rows[i][dropped], cols[i][dropped]] = False
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
        if self.method.position_policy == "original":
            new_pos = full_pos.gather(1, index)
        elif position_ids is not None:  # renumbered the way the caller numbers: from the mask
            new_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            new_pos = torch.arange(new_length, device=device).expand(batch, -1)
        shift = full_pos[:, -1] - new_pos[:, -1]
        return _Layout(index, mask.to(full_mask.dtype), length, shift), new_pos

    def _decode_inputs(self, attention_mask, position_ids):
        """A decode step's mask (kept prefix columns, then the new ones) and position ids."""
        layout = self._layout
        mask = None
        if attention_mask is not None:
            mask = torch.cat([layout.mask.to(attention_mask.dtype), attention_mask[:, layout.full_length:]], dim=1)
        if position_ids is None and attention_mask is not None:
            position_ids = attention_mask.long().sum(-1, keepdim=True) - 1  # generate's own numbering
        if position_ids is not None and self.method.position_policy == "renumber":
            position_ids = position_ids - layout.shift[:, None]
        return mask, position_ids

    def _is_continuation(self, kwargs) -> bool:
        """A decoding step after a pruned prompt (the prompt's layout is known)."""
        cache = kwargs.get("past_key_values")
        return self._layout is not None and cache is not None and cache.get_seq_length() > 0

    def _on_lm_input(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if self._selections is not None and self.method.stage == "pre_llm":
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
        rows, cols = self._image_positions(len(self._selections), self._tokens_per_image)
        for i, selection in enumerate(self._selections):
            if selection.features is None:
                continue
            row = rows[i][selection.kept]
            target = cols[i][selection.kept]
            where = (layout.index[row] == target[:, None]).float().argmax(1)
            embeds[row, where] = selection.features.to(embeds.dtype)

    # ------------------------------------------------------------------ in-LLM (before layer K)
    def _on_layer_before_k(self, module, args, kwargs):
        """At layer K-1's input: the last token's attention over every image token (heads averaged)."""
        if not self._images_pending or self._selections is not None or self._layout is not None:
            return None  # no images, or a decoding step (the prompt was pruned already)
        hidden = args[0] if args else kwargs["hidden_states"]
        mask2d = self._lm_kwargs.get("attention_mask")
        query = self.query_positions
        if query is None and mask2d is not None:  # each row's last real token (right padding too)
            query = (mask2d.shape[1] - 1) - mask2d.long().flip(1).argmax(1)
        rows = last_token_attention(module, hidden, kwargs["position_embeddings"], mask2d, query)  # (B, T)
        n_tokens = self.model.config.image_seq_length
        n_images = int((self._input_ids == self.model.config.image_token_id).sum()) // n_tokens
        img_rows, img_cols = self._image_positions(n_images, n_tokens)
        self._selections = [
            self._select(i, hidden[img_rows[i], img_cols[i]], None, n_tokens,
                         attention_row=rows[img_rows[i], img_cols[i]]) for i in range(n_images)]
        return None

    def _on_pruned_layer(self, module, args, kwargs):
        lm = self.model.model.language_model
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._selections is not None:  # prefill, at layer K: gather everything
            layout, new_pos = self._make_layout(self._lm_kwargs.get("attention_mask"),
                                                self._lm_kwargs.get("position_ids"), hidden.shape[1])
            hidden = hidden.gather(1, layout.index[..., None].expand(-1, -1, hidden.shape[-1]))
            self._layout, self._selections, self._images_pending = layout, None, False
            self._pruned_kwargs = self._layer_kwargs(lm, hidden, layout.mask, new_pos, kwargs)
        elif self._is_continuation(kwargs) and module is lm.layers[self.layer]:
            mask, pos = self._decode_inputs(self._lm_kwargs.get("attention_mask"), kwargs.get("position_ids"))
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
        mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d,
                                  past_key_values=kwargs.get("past_key_values"), position_ids=position_ids,
                                  layer_idx=self.layer)
        return {"attention_mask": mask, "position_ids": position_ids,
                "position_embeddings": lm.rotary_emb(hidden, position_ids)}


@contextlib.contextmanager
def prune(model, method: Method | str, budget=None, record_ipr: bool = True, **params):
    """Apply `method` (a registered name with `params`, or an instance) at `budget` to a
    `LlavaForConditionalGeneration` for the duration of the block; see the module docstring."""
    run = PruningRun(model, method, budget, record_ipr=record_ipr, **params)
    with run:
        yield run
