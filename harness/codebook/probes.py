"""The three language-feedback probes of one image's visual tokens (METHODS.md §1.2).

Only the first generated token's logits are read, after a one-word description prompt. The image's
projector outputs X (N tokens, raster order) are computed once; every probe then runs the language
model alone on `[prompt before the image] + visual input + [prompt after]`:

  single-input   token t alone                                  -> p_max (top-50 softmax max)
  local          its 3x3 window (shifted inward at borders) vs the same with t replaced by pad
                                                                -> JSD_local
  global         all N tokens vs all N with t's 3x3 window overwritten by pad
                                                                -> JSD_global

"pad" is the LLM's word embedding of the pad token, substituted after the projector. Which tokens
are probed: the release's ranks of ViT-[CLS] similarity (cosine of the [CLS] state and each patch
state at the feature layer), 96 of 576. Probes of equal length run as one batch (`batch` rows).
For the analysis, each image also records the [CLS] similarity of every token and the last
prompt token's attention to each visual token in a middle decoder layer of the unablated run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .jsd import jsd_official, jsd_textbook, p_max

RELEASE_PROMPT = "What does this image show? You must provide a single word that best describes the image."
#: 1-based, inclusive ranks of descending [CLS] similarity (24 + 9 x 8 = 96 of 576).
RELEASE_RANKS = ((1, 24), (37, 44), (73, 80), (145, 152), (217, 224), (289, 296), (361, 368), (433, 440),
                 (505, 512), (569, 576))


@dataclass
class ProbeConfig:
    prompt: str = RELEASE_PROMPT
    ranks: tuple = RELEASE_RANKS
    pmax_topk: int = 50
    jsd_topk: int = 10
    batch: int = 32
    attention_layer: int | None = None  # None: the middle decoder layer
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def probe_positions(cls_similarity: torch.Tensor, ranks=RELEASE_RANKS) -> torch.Tensor:
    """Token indices at the given ranks of descending similarity (ranks past N are skipped)."""
    order = torch.sort(cls_similarity.float(), descending=True, stable=True).indices
    picks = [r - 1 for lo, hi in ranks for r in range(lo, hi + 1) if r <= len(order)]
    return order[picks]


def window(t: int, h: int, w: int) -> list[int]:
    """The 3x3 block around token t on an h x w grid, shifted inward at the borders, raster order."""
    r, c = divmod(int(t), w)
    r0, c0 = min(max(r - 1, 0), max(h - 3, 0)), min(max(c - 1, 0), max(w - 3, 0))
    return [i * w + j for i in range(r0, min(r0 + 3, h)) for j in range(c0, min(c0 + 3, w))]


class Prober:
    """Runs the probes of a `LlavaForConditionalGeneration` on single images."""

    def __init__(self, model, processor, config: ProbeConfig | None = None):
        self.model, self.processor = model, processor
        self.config = config or ProbeConfig()
        lm = model.model.language_model
        self.lm = lm
        tok = processor.tokenizer
        image_token = getattr(processor, "image_token", "<image>")
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.config.prompt}]}],
            add_generation_prompt=True) if getattr(processor, "chat_template", None) else \
            f"USER: {image_token}\n{self.config.prompt} ASSISTANT:"
        ids = tok(prompt, return_tensors="pt")["input_ids"][0]
        where = torch.nonzero(ids == model.config.image_token_id).flatten()
        if len(where) != 1:
            raise ValueError(f"the probe prompt must hold one image placeholder, found {len(where)}: {prompt!r}")
        embed = lm.get_input_embeddings()
        with torch.no_grad():
            self.before = embed(ids[: where[0]].to(model.device))
            self.after = embed(ids[where[0] + 1:].to(model.device))
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            self.pad = embed.weight[pad_id].detach()
        layers = model.config.text_config.num_hidden_layers
        self.attention_layer = self.config.attention_layer if self.config.attention_layer is not None else layers // 2

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def visual_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) projector outputs of one image, and (N,) [CLS] similarity at the feature layer."""
        layer = self.model.config.vision_feature_layer
        states = self.model.model.vision_tower(pixel_values.to(self.model.device, self.model.dtype),
                                               output_hidden_states=True).hidden_states[layer][0]
        cls, patches = states[0], states[1:]
        similarity = F.normalize(patches.float(), dim=-1) @ F.normalize(cls.float(), dim=0)
        return self.model.model.multi_modal_projector(patches), similarity

    @torch.no_grad()
    def first_token_logits(self, visual: torch.Tensor, attention: bool = False):
        """(B, n, D) visual inputs -> (B, V) first-token logits (and, if asked, (B, n) the last prompt
        token's head-mean attention to each visual token at `attention_layer`)."""
        from harness.adapters.attention import last_token_attention

        b = visual.shape[0]
        embeds = torch.cat([self.before.expand(b, -1, -1), visual.to(self.before.dtype),
                            self.after.expand(b, -1, -1)], dim=1)
        rows = []
        if attention:
            layer = self.lm.layers[self.attention_layer]
            handle = layer.register_forward_pre_hook(
                lambda m, args, kwargs: rows.append(last_token_attention(
                    m, args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"], None)),
                with_kwargs=True)
        try:
            out = self.lm(inputs_embeds=embeds, use_cache=False)
        finally:
            if attention:
                handle.remove()
        logits = self.model.lm_head(out.last_hidden_state[:, -1]).float()
        if attention:
            start = self.before.shape[0]
            return logits, rows[0][:, start:start + visual.shape[1]]
        return logits

    def _batched(self, visual: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first_token_logits(visual[i:i + self.config.batch])
                          for i in range(0, len(visual), self.config.batch)])

    # ------------------------------------------------------------------ one image
    @torch.no_grad()
    def probe(self, pixel_values: torch.Tensor) -> dict:
        """Every statistic of one image (pixel_values (1, 3, H, W)), as CPU tensors."""
        cfg = self.config
        x, similarity = self.visual_tokens(pixel_values)
        n = x.shape[0]
        side = int(round(n ** 0.5))
        h, w = (side, n // side) if side * side == n else (1, n)
        targets = probe_positions(similarity, cfg.ranks)
        windows = [window(t, h, w) for t in targets.tolist()]
        pad = self.pad.to(x.dtype)

        single = self._batched(x[targets][:, None])
        local_ref = x[torch.tensor(windows)]  # (P, 9, D)
        local_ablated = local_ref.clone()
        for i, (t, win) in enumerate(zip(targets.tolist(), windows)):
            local_ablated[i, win.index(t)] = pad
        local = self._batched(torch.cat([local_ref, local_ablated]))
        full_logits, attention = self.first_token_logits(x[None], attention=True)
        ablated = x[None].repeat(len(targets), 1, 1)
        for i, win in enumerate(windows):
            ablated[i, win] = pad
        global_logits = self._batched(ablated)
        p = len(targets)
        reference = full_logits.expand(p, -1)
        return {
            "positions": targets.cpu(), "features": x[targets].float().cpu(),
            "p_max": p_max(single, cfg.pmax_topk).cpu(),
            "jsd_local": jsd_official(local[:p], local[p:], cfg.jsd_topk).cpu(),
            "jsd_local_textbook": jsd_textbook(local[:p], local[p:]).cpu(),
            "jsd_global": jsd_official(reference, global_logits, cfg.jsd_topk).cpu(),
            "jsd_global_textbook": jsd_textbook(reference, global_logits).cpu(),
            "cls_similarity": similarity.float().cpu(), "attention": attention[0].float().cpu(),
        }
