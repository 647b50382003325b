"""The frozen language model's forward with LVPruning's decision modules inserted, tokens masked, not dropped.

LVPruning trains its modules as DynamicViT does (arXiv 2501.13652, §3; METHODS.md §4): before decoder layer
K_s, module s gives each vision token keep/remove logits from the hidden states entering K_s (the vision
tokens against the prompt's text tokens); a decision D_s in {0, 1} is drawn (Gumbel-Softmax, hard forward,
soft gradient) and made cumulative, D'_s = D_s * D'_{s-1}. The tokens stay in the sequence; from layer K_s
on, every attention softmax reads the policy

    M_ij = 1 if i = j or column j is not a vision token, else D'_j        (on top of the causal and padding mask)
    A_ij = exp(s_ij - m_i) M_ij / (sum_j exp(s_ij - m_i) M_ij + eps)

multiplicatively, so the loss's gradient reaches D'. Surviving tokens keep their original positions. With
hard decisions this equals removing the masked tokens (`tests/test_lvpruning_train.py` checks it against the
shared adapter's pruned forward), which is what `methods.lvpruning` does at inference.

How it plugs in without changing the model: the decoder layers are called here, one by one, with a
`PolicyMask` as their attention mask; the attention function registered below under `ATTENTION` reads it,
and the language model's `config._attn_implementation` names that function only while `policy_attention`
is active (restored in a `finally`). The model's parameters are never written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import AttentionInterface

#: The name the policy softmax is registered under in transformers' AttentionInterface.
ATTENTION = "vtp_lvpruning_policy"
#: Decision modes of `masked_forward` besides fixed per-stage keep masks.
MODES = ("gumbel", "argmax", "topk")
#: Normaliser's eps (DynamicViT uses 1e-6). The shift m_i is the row's largest *kept* score, so the
#: denominator is at least 1 and eps changes a kept token's weight by at most one part in 10^6.
EPS = 1e-6
#: s_ij - m_i is capped here. Kept entries are at most 0, so the forward is exact; a masked entry's forward weight
#: is 0 whatever it is, but its straight-through gradient is proportional to exp(s_ij - m_i): a masked token
#: that would dominate the row if restored gets a linearised gradient without bound (exp(30) on the testbed:
#: gradient norms of 10^5-10^6 against 5 for the ratio loss, and the modules collapsed to dropping everything).
#: Capped at 0, a masked token counts as scoring no higher than the row's best kept token.
CAP = 0.0


@dataclass
class PolicyMask:
    """What the policy attention reads in place of a mask, for one batch and one stage."""

    allowed: torch.Tensor  # (B, 1, T, T) bool: key j at or before query i and not padding, or j = i
    weights: torch.Tensor  # (B, 1, T, T) float: `allowed` times M_ij (differentiable in the decisions)


def policy_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention under a `PolicyMask` (query (B, H, T, d), key/value (B, H_kv, T, d)): the softmax with
    policy above, in float32. Returns (output (B, T, H, d), None) as transformers' attention functions do."""
    if not isinstance(attention_mask, PolicyMask):
        raise TypeError(f"the {ATTENTION} attention needs a PolicyMask (harness.lvpruning.masked), got "
                           f"{type(attention_mask).__name__}")
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups`
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float() * scaling, key.float().transpose(2, 3))
    # Entries outside `allowed` (future keys, padding) have weight 0 and need no -inf: CAP bounds their exp().
    kept = attention_mask.weights.detach() > 0
    shift = scores.masked_fill(~kept, float("-inf")).amax(-1, keepdim=True).detach()
    weights = (scores - shift).clamp(max=CAP).exp() * attention_mask.weights
    weights = weights / (weights.sum(-1, keepdim=True) + EPS)
    out = torch.matmul(weights.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, policy_attention)


@contextlib.contextmanager
def policy_attention_active(language_model):
    """The language model's attention layers use `policy_attention` inside the block, and what they used
    before after it (whatever happens inside)."""
    configs = {id(language_model.config): language_model.config}
    for layer in language_model.layers:
        configs.setdefault(id(layer.self_attn.config), layer.self_attn.config)
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = ATTENTION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = saved[key]


@dataclass
class MaskedBatch:
    """A batch as the masked forward reads it. Columns are the full sequence's; images are numbered in
    the order the batch holds them (row by row), as the shared adapter numbers them."""

    inputs_embeds: torch.Tensor  # (B, T, C) the language model's input: text embeddings, projected images
    attention_mask: torch.Tensor  # (B, T) bool: a real token (not padding)
    position_ids: torch.Tensor  # (B, T) the original positions (pruning keeps them)
    image_rows: torch.Tensor  # (I,) each image's batch row
    image_columns: torch.Tensor  # (I, N) each image's vision-token columns, ascending
    text_columns: torch.Tensor  # (B, M) each row's prompt text columns (padded with 0)
    text_padding: torch.Tensor  # (B, M) bool: True where `text_columns` is padding
    query: torch.Tensor  # (B,) each row's last prompt column
    labels: torch.Tensor | None = None  # (B, T) answer tokens, -100 elsewhere

    def to(self, device) -> MaskedBatch:
        return MaskedBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                              for f in fields(self)})


@torch.no_grad()
def embed(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The language model's input embeddings (B, T, C) as `LlavaModel.forward` builds them: the text tokens'
    embeddings with each image's projected features written over its placeholder tokens (frozen, no grad)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    dtype = next(inner.vision_tower.parameters()).dtype
    images = inner.get_image_features(pixel_values=pixel_values.to(dtype), return_dict=True).pooler_output
    features = torch.cat(list(images), dim=0).to(embeds.device, embeds.dtype)
    placeholders = (input_ids == model.config.image_token_id)[..., None]
    if int(placeholders.sum()) * embeds.shape[-1] != features.numel():
        raise ValueError(f"{int(placeholders.sum())} image tokens in the input ids but {features.shape[0]} image "
                         f"features")
    return embeds.masked_scatter(placeholders, features)


def prepare(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask=None, labels=None,
            position_ids=None, query=None) -> MaskedBatch:
    """A `MaskedBatch` from token ids (image placeholders expanded, as the processor gives them) and pixels.

    The prompt's text tokens (what the modules read) are `PruningRun._begin`'s: not an image placeholder,
    not padding, at or before the row's last prompt token `query`; by default the column before the first
    labelled one when `labels` are given (the answer is never read), else the row's last real token.
    Positions default to 0..T-1 per row (LlamaModel's, when a forward gets no position ids)."""
    batch, length = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    columns = torch.arange(length, device=device)
    if query is None and labels is not None:
        labelled = labels != -100
        if not bool(labelled.any(1).all()):
            raise ValueError("every row needs an answer (a labelled token) to find its prompt")
        query = labelled.long().argmax(1) - 1
    elif query is None:
        query = (length - 1) - real.long().flip(1).argmax(1)
    visual = input_ids == model.config.image_token_id
    per_image = int(model.config.image_seq_length)
    rows, cols = visual.nonzero(as_tuple=True)
    if len(rows) % per_image:
        raise ValueError(f"{len(rows)} image tokens in the input ids, not a multiple of {per_image} per image")
    text = ~visual & real & (columns[None] <= query.to(device)[:, None])
    width = max(1, int(text.sum(1).max()))
    text_columns = torch.zeros(batch, width, dtype=torch.long, device=device)
    text_padding = torch.ones(batch, width, dtype=torch.bool, device=device)
    for b in range(batch):
        found = text[b].nonzero().flatten()
        text_columns[b, :len(found)] = found
        text_padding[b, :len(found)] = False
    if position_ids is None:
        position_ids = columns[None].expand(batch, -1)
    return MaskedBatch(inputs_embeds=embed(model, input_ids, pixel_values), attention_mask=real,
                       position_ids=position_ids, image_rows=rows[::per_image].clone(),
                       image_columns=cols.view(-1, per_image).clone(), text_columns=text_columns,
                       text_padding=text_padding, query=query, labels=labels)


@dataclass
class MaskedOutput:
    logits: torch.Tensor  # (B, T, V)
    decisions: list  # per stage, (I, N) the cumulative decisions D'_s (1 keep, 0 masked)
    module_logits: list  # per stage, (I, N, 2) the module's (keep, remove) logits


def check_layers(layers: Sequence[int], decoder_layers: int) -> tuple:
    """The stage layers as a tuple, or a ValueError: strictly increasing, inside the decoder."""
    layers = tuple(layers)
    bad = [k for k in layers if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < decoder_layers]
    if not layers or bad:
        raise ValueError(f"LVPruning layers must be in 0..{decoder_layers - 1} for this decoder of {decoder_layers} "
                         f"layers, got {list(layers)}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"LVPruning layers must be strictly increasing, got {list(layers)}")
    return layers


def gumbel_keep(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """(I, N) hard keep decisions with the Gumbel-Softmax's soft gradient (straight-through). The noise
    is drawn on the CPU from `generator`, so a seeded step draws the same decisions on any device."""
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32).clamp(1e-10, 1 - 1e-7)
    noisy = logits.float() - torch.log(-torch.log(uniform)).to(logits.device)
    soft = torch.softmax(noisy / tau, dim=-1)[..., 0]
    hard = (noisy[..., 0] >= noisy[..., 1]).float()
    return hard - soft.detach() + soft


def _top(scores: torch.Tensor, alive: torch.Tensor, count: int) -> torch.Tensor:
    """(I, N) 1 at each image's `count` best-scored tokens among those `alive` (stable: ties to the lower
    index, as `methods.base.top_k`)."""
    scores = scores.masked_fill(alive <= 0, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :count]
    return torch.zeros_like(scores).scatter(1, order, 1.0)


def masked_forward(model, batch: MaskedBatch, modules, layers: Sequence[int],
                   decisions: str | Sequence[torch.Tensor] = "gumbel", *, tau: float = 1.0,
                   generator: torch.Generator | None = None, counts: Sequence[int] | None = None) -> MaskedOutput:
    """Logits of the frozen `model` with `modules[s]` deciding before decoder layer `layers[s]`.

    `decisions`: "gumbel" (training: hard Gumbel-Softmax draws, soft gradient, temperature `tau`, noise from
    `generator`), "argmax" (keep where the keep logit is at least the remove logit), "topk" (each image keeps
    `counts[s]` tokens after stage s, its best by keep log-probability among those still present: the
    inference rule of `methods.lvpruning`), or one (I, N) keep mask per stage (fixed decisions; made
    cumulative here). Layers before `layers[0]` see every token."""
    lm = model.model.language_model
    layers = check_layers(layers, lm.config.num_hidden_layers)
    if len(modules) != len(layers):
        raise ValueError(f"{len(modules)} modules for {len(layers)} layers")
    if isinstance(decisions, str):
        if decisions not in MODES:
            raise ValueError(f"decisions must be one of {', '.join(MODES)} or a keep mask per stage, got {decisions!r}")
        if decisions == "topk" and (counts is None or len(counts) != len(layers)):
            raise ValueError(f"decisions='topk' needs one count per stage, got {counts!r}")
    elif len(decisions) != len(layers):
        raise ValueError(f"{len(decisions)} keep masks for {len(layers)} stages")
    hidden = batch.inputs_embeds
    batch_size, length = batch.attention_mask.shape
    device = hidden.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=device)
    allowed = ((causal[None] & batch.attention_mask[:, None, :]) | diagonal)[:, None]  # (B, 1, T, T)
    mask = PolicyMask(allowed, allowed.float())
    rows = batch.image_rows
    images, per_image = batch.image_columns.shape
    alive = torch.ones(images, per_image, device=device)
    module_dtype = next(modules[0].parameters()).dtype
    position_embeddings = lm.rotary_emb(hidden, batch.position_ids)
    out_decisions, out_logits = [], []
    with policy_attention_active(lm):
        for index, layer in enumerate(lm.layers[:lm.config.num_hidden_layers]):
            if index in layers and images:
                stage = layers.index(index)
                vision = hidden[rows[:, None], batch.image_columns].to(module_dtype)
                text = hidden[rows[:, None], batch.text_columns[rows]].to(module_dtype)
                logits = modules[stage](vision, text, batch.text_padding[rows])
                if decisions == "gumbel":
                    keep = gumbel_keep(logits, tau, generator)
                elif decisions == "argmax":
                    keep = (logits[..., 0] >= logits[..., 1]).float()
                elif decisions == "topk":
                    keep = _top(torch.log_softmax(logits.float(), dim=-1)[..., 0], alive, int(counts[stage]))
                else:
                    keep = decisions[stage].to(device=device, dtype=torch.float32)
                alive = keep * alive
                out_decisions.append(alive)
                out_logits.append(logits)
                column_policy = torch.ones(batch_size, length, device=device).index_put(
                    (rows[:, None].expand(-1, per_image), batch.image_columns), alive)
                mask = PolicyMask(allowed, allowed * torch.where(diagonal, 1.0, column_policy[:, None, None, :]))
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=batch.position_ids, past_key_values=None, use_cache=False)
    logits = model.lm_head(lm.norm(hidden))
    return MaskedOutput(logits, out_decisions, out_logits)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next-token predictions on the labelled (answer) tokens, their mean."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)
