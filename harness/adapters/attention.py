"""Attention rows computed from a layer's own weights, for the few queries a method needs.

One place for the Llama decoder's queries and keys at given positions and heads (projections, RoPE,
grouped-query heads), for its attention row of given query positions, and for a CLIP ViT layer's
[CLS] attention, so every layer keeps running under SDPA / flash attention and no T x T matrix is
formed. The adapters use them for in-LLM scoring and [CLS]-based methods, the codebook probes the
decoder row, and the testbed's training the queries and keys its retrieval heads' losses score.
"""

from __future__ import annotations

import torch


def cls_attention(layer, hidden) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) [CLS]->patch attention of a CLIP encoder `layer` (heads summed) and (N, d) its keys (heads
    averaged), from the layer's input `hidden` (1 + N, Dv) of one image."""
    attn = layer.self_attn
    h = layer.layer_norm1(hidden)  # (1 + N, Dv)
    heads = attn.num_heads
    q = attn.q_proj(h[:1]).view(1, heads, -1).transpose(0, 1)  # (H, 1, d)
    k = attn.k_proj(h).view(h.shape[0], heads, -1).transpose(0, 1)  # (H, 1 + N, d)
    probs = torch.softmax((q @ k.transpose(1, 2)).float() * attn.scale, dim=-1)[:, 0, 1:]  # (H, N)
    return probs.sum(0), k[:, 1:].mean(0)


def rotary_queries(layer, h, cos, sin, rows, positions, heads=None) -> torch.Tensor:
    """(N, heads, D): the queries of Llama decoder `layer`'s `heads` (default all) at (rows, positions),
    RoPE applied, from the layer's normalised input `h` (B, T, d) and the rotation (cos, sin) (B, T, D)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    q = attn.q_proj(h[rows, positions]).view(len(rows), -1, attn.head_dim)  # (N, H, D)
    if heads is not None:
        q = q[:, list(heads)]
    q, _ = apply_rotary_pos_emb(q, q, cos[rows, positions], sin[rows, positions])
    return q


def rotary_keys(layer, h, cos, sin, heads=None) -> torch.Tensor:
    """(B, heads, T, D): for each of Llama decoder `layer`'s query `heads` (default all), the keys it
    reads at every position, RoPE applied: those of its key/value head (grouped-query attention: query
    head i reads key/value head i // groups). From the layer's normalised input `h` (B, T, d) and the
    rotation (cos, sin) (B, T, D)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    batch, length, _ = h.shape
    k = attn.k_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # (B, KV, T, D)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    heads = range(k.shape[1] * attn.num_key_value_groups) if heads is None else heads
    return k[:, [head // attn.num_key_value_groups for head in heads]]


def last_token_attention(layer, hidden, position_embeddings, mask2d, positions=None) -> torch.Tensor:
    """(B, T): the attention probabilities of one query per row (`positions`, default the last
    column) in `layer`, averaged over heads.

    Computed from the layer's own queries and keys (RMSNorm, projections, RoPE, grouped-query heads)
    for that single query row, so every layer keeps running under SDPA/flash attention and no
    T x T matrix is formed. Padding columns (mask 0) get no attention, as in the layer itself.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    batch, length, _ = h.shape
    rows = torch.arange(batch, device=h.device)
    if positions is None:
        positions = torch.full((batch,), length - 1, device=h.device)
    cos, sin = (x.expand(batch, -1, -1) for x in position_embeddings)
    q = rotary_queries(layer, h, cos, sin, rows, positions)[:, :, None]  # (B, H, 1, D)
    k = rotary_keys(layer, h, cos, sin)  # (B, H, T, D)
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, H, 1, T)
    allowed = torch.arange(length, device=h.device)[None, :] <= positions[:, None]  # causal
    if mask2d is not None:
        allowed = allowed & mask2d.bool()
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)[:, :, 0].mean(1)
