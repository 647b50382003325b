"""The retrieval heads' supervision: their attention recomputed at the answer positions, their
read-out through the model's own o_proj, final norm and lm_head, and the losses on both."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.adapters.attention import rotary_keys, rotary_queries

from .. import questions as Q
from .. import world as W
from .recipe import READOUT_ANSWERS


def _layer_input(model, hidden_states, batch, layer: int):
    """Decoder layer `layer`, its normalised input h (B, T, d) and the batch's RoPE (cos, sin) (B, T, D)."""
    lm = model.model.language_model
    h = lm.layers[layer].input_layernorm(hidden_states[layer])
    return (lm.layers[layer], h, *lm.rotary_emb(h, batch["position_ids"]))


def answer_attention(model, hidden_states, batch, rows, positions, layer: int, heads=(0, 1)) -> torch.Tensor:
    """Log attention probabilities (N, 2, T) of two heads of `layer` that share a key/value head, at
    the given (row, position)s.

    Recomputed exactly as LlamaAttention does (RMSNorm, projections, RoPE at the batch's position ids,
    the batch's attention mask), but only at the queried positions (tested against eager attention).
    """
    decoder_layer, h, cos, sin = _layer_input(model, hidden_states, batch, layer)
    attn = decoder_layer.self_attn
    kv = heads[0] // attn.num_key_value_groups
    if [h_ // attn.num_key_value_groups for h_ in heads] != [kv, kv]:
        raise ValueError(f"heads {heads} do not share one key/value head")
    q = rotary_queries(decoder_layer, h, cos, sin, rows, positions, heads)  # (N, 2, D)
    k = rotary_keys(decoder_layer, h, cos, sin, heads[:1])[:, 0]  # (B, T, D): the keys both heads read
    scores = torch.einsum("nhd,ntd->nht", q.float(), k[rows].float()) * attn.scaling
    allowed = batch["attention_mask"][rows, 0, positions]  # (N, T)
    return torch.log_softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)


def retrieval_values(model, hidden_states, layer: int, kv: int = 0) -> torch.Tensor:
    """Value vectors (B, T, head_dim) of key/value head `kv` of `layer` (0: the one heads 0-1 share)."""
    attn = model.model.language_model.layers[layer].self_attn
    h = model.model.language_model.layers[layer].input_layernorm(hidden_states[layer])
    return attn.v_proj(h).view(h.shape[0], h.shape[1], -1, attn.head_dim)[:, :, kv]


def retrieval_logits(model, hidden_states, probs, rows, layer: int, heads=(0, 1)) -> torch.Tensor:
    """Vocabulary logits of two heads of `layer` alone (sharing a key/value head), given their attention
    `probs` (n, 2, T) in batch `rows`: their attention-weighted values through their columns of o_proj,
    the final norm and lm_head."""
    lm = model.model.language_model
    attn = lm.layers[layer].self_attn
    v = retrieval_values(model, hidden_states, layer, kv=heads[0] // attn.num_key_value_groups)
    out = torch.einsum("nht,ntd->nhd", probs.to(v.dtype), v[rows]).flatten(1)  # (n, 2D)
    columns = attn.o_proj.weight[:, heads[0] * attn.head_dim:(heads[-1] + 1) * attn.head_dim]
    return model.lm_head(lm.norm(out @ columns.T))


def image_keys(model, hidden_states, batch, image_token_id: int, layer: int):
    """Key vectors of key/value head 0 of `layer` at every image token, RoPE applied, as (images,
    576, head_dim), and each image's query rotation (cos, sin) at its row's last position: about
    where a question about it is answered."""
    decoder_layer, h, cos, sin = _layer_input(model, hidden_states, batch, layer)
    k = rotary_keys(decoder_layer, h, cos, sin, heads=(0,))[:, 0]  # (B, T, D)
    is_image = batch["input_ids"] == image_token_id
    keys = k[is_image].view(-1, W.GRID * W.GRID, k.shape[-1])  # row-major: the images' order
    rows = is_image.nonzero()[::W.GRID * W.GRID, 0]
    last = batch["position_ids"].argmax(dim=1)[rows]
    return keys, cos[rows, last], sin[rows, last]


def attribute_log_mass(keys, cos, sin, queries, targets, scaling: float) -> torch.Tensor:
    """(images, attributes) log attention mass that each attribute's free query (`queries`, rotated by
    each image's (cos, sin)) puts on that attribute's patches (`targets`, (images, attributes, 576));
    -inf where the image does not show the attribute."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = queries[None].expand(len(keys), -1, -1)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=1)  # (images, attributes, head_dim)
    logp = torch.log_softmax(torch.einsum("nad,npd->nap", q.float(), keys.float()) * scaling, dim=-1)
    return torch.logsumexp(logp.masked_fill(~targets, float("-inf")), dim=-1)


def key_attribute_loss(model, hidden_states, batch, targets, queries, image_token_id: int, layer: int):
    """-log(attention mass on the patches of each colour and kind an image shows), for one free query
    per colour and kind (`queries`: (colours + kinds, head_dim)) against the retrieval heads' keys."""
    keys, cos, sin = image_keys(model, hidden_states, batch, image_token_id, layer)
    scaling = model.model.language_model.layers[layer].self_attn.scaling
    return -attribute_log_mass(keys, cos, sin, queries, targets, scaling)[targets.any(-1)].mean()


def readout_words(answers: str, counts: bool = False) -> list[str]:
    """The answers the read-out loss covers: "attributes" (colours, letters) or "all" (also yes/no and
    the relations), plus the counts when the count target makes them readable from the heads."""
    if answers not in READOUT_ANSWERS:
        raise ValueError(f"readout_answers must be 'attributes' or 'all', got {answers!r}")
    words = list(W.COLOR_NAMES) + list(W.LETTERS)
    if answers == "all":
        words += ["yes", "no"] + list(Q.RELATIONS)
    if counts:
        words += [str(n) for n in range(Q.COUNT_RANGE[0], Q.COUNT_RANGE[1] + 1)]
    return words


def readout_loss(model, hidden_states, batch, evidence, layer: int, answer_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer from heads 0-1 of `layer` alone (their attention-weighted values
    through o_proj, the final norm and lm_head), on the answers that are in `answer_ids`."""
    rows, positions = evidence["rows"], evidence["positions"]
    answers = batch["labels"][rows, positions + 1]
    use = torch.isin(answers, answer_ids)
    if not bool(use.any()):
        return hidden_states[0].sum() * 0
    rows, positions, answers = rows[use], positions[use], answers[use]
    probs = answer_attention(model, hidden_states, batch, rows, positions, layer).exp()  # (n, 2, T)
    return F.cross_entropy(retrieval_logits(model, hidden_states, probs, rows, layer).float(), answers)


def target_loss(logp: torch.Tensor, on: torch.Tensor, spread: torch.Tensor | bool) -> torch.Tensor:
    """Per (question, head): -log(attention mass on the target `on`), or, where `spread`, the
    cross-entropy against the uniform distribution over the target (every target token its share)."""
    mass = -torch.logsumexp(logp.masked_fill(~on, float("-inf")), dim=-1)
    even = -(logp.masked_fill(~on, 0).sum(-1) / on.sum(-1))
    spread = torch.as_tensor(spread, device=logp.device)
    return torch.where(spread[:, None] if spread.dim() else spread, even, mass)


def group_loss(logp: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per (question, head): the cross-entropy of the attention mass per group (`groups` (N, T): 1, 2,
    ... on each group's tokens, 0 elsewhere) against the uniform distribution over the question's
    groups; log(groups) when every group holds an equal share, however it is spread inside a group."""
    n = int(groups.max()) if groups.numel() else 0
    ids = torch.arange(1, n + 1, device=groups.device)
    present = (groups[:, :, None] == ids).any(1)  # (N, G)
    # A finite fill keeps absent groups' gradients finite (they are then masked out).
    mass = torch.stack([torch.logsumexp(logp.masked_fill((groups != g)[:, None], -1e9), dim=-1) for g in ids.tolist()],
                       dim=-1)  # (N, heads, G)
    return -(mass * present[:, None]).sum(-1) / present.sum(-1).clamp(min=1)[:, None]


def attention_loss(model, hidden_states, batch, evidence, layer: int, spread_words: bool = False,
                   count_weight: float = 1.0) -> torch.Tensor:
    """-log(attention mass on the target) at each answer position, for two pairs of heads: in
    `layer - 1`, heads 2-3 gather the words naming the question's referents (with `spread_words`,
    each word its share); in `layer`, heads 0-1 look at the referents' evidence patches (counts: <s>
    and the counted centres, each its share; their rows weighted by `count_weight`)."""
    if len(evidence["rows"]) == 0:
        return hidden_states[0].sum() * 0
    loss = 0
    for at, heads, target in ((layer - 1, (2, 3), "words"), (layer, (0, 1), "patches")):
        logp = answer_attention(model, hidden_states, batch, evidence["rows"], evidence["positions"], at, heads)
        spread = evidence["spread"] if target == "patches" else spread_words
        per_row = target_loss(logp, evidence[target], spread)
        if target == "patches":
            groups = evidence["groups"]
            if bool(groups.any()):  # counted objects (`count_objects`), not centres
                per_row = torch.where(groups.any(-1)[:, None], group_loss(logp, groups), per_row)
            # a weight of 1 leaves the loss bit for bit as it was
            per_row = per_row * torch.where(evidence["spread"], count_weight, 1.0).to(per_row)[:, None]
        loss = loss + per_row.mean()
    return loss / 2


def count_heads_loss(model, hidden_states, batch, evidence, layer: int) -> torch.Tensor:
    """For count questions only, a second pair of heads (2-3 of `layer`, key/value head 1) spreads its
    attention evenly over <s> and the counted centres and, alone, names the count. Their values serve
    no other loss (heads 0-1's also carry colour and grid position), so their output can be a clean
    function of <s>'s share, 1/(n+1)."""
    counted = evidence["spread"]
    if not bool(counted.any()):
        return hidden_states[0].sum() * 0
    rows, positions = evidence["rows"][counted], evidence["positions"][counted]
    logp = answer_attention(model, hidden_states, batch, rows, positions, layer, heads=(2, 3))
    attention = target_loss(logp, evidence["patches"][counted], True).mean()
    logits = retrieval_logits(model, hidden_states, logp.exp(), rows, layer, heads=(2, 3))
    readout = F.cross_entropy(logits.float(), batch["labels"][rows, positions + 1])
    return (attention + readout) / 2
