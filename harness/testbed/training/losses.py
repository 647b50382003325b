"""Stage 1's tower heads and loss, stage 2's alignment loss, and the grid-position read-out kept on
through instruction tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import world as W
from .batches import word_ids


class VisionHeads(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.kind = torch.nn.Linear(hidden, len(W.KIND_CLASSES))
        self.color = torch.nn.Linear(hidden, len(W.COLOR_CLASSES))
        self.center = torch.nn.Linear(hidden, 1)
        self.position = torch.nn.Linear(hidden, 2)
        self.present = torch.nn.Linear(hidden, len(W.KIND_CLASSES) - 1 + len(W.COLOR_CLASSES) - 1)
        with torch.random.fork_rng():  # added later: every other module keeps the initialisation it had
            torch.manual_seed(0)
            self.kind_count = torch.nn.Linear(hidden, W.MAX_KIND_COUNT + 1)  # trained with `kind_count_weight`
            # From [CLS]: each shape kind's count in the image (trained with `cls_count_weight`).
            self.cls_count = torch.nn.Linear(hidden, len(W.SHAPES) * (W.MAX_KIND_COUNT + 1))


def vision_features(model, pixel_values, tower=None):
    """Penultimate-layer ViT states, [CLS] first: what LLaVA reads (vision_feature_layer=-2).
    `tower`: another tower of the same shape read the same way (the anchor), else the model's."""
    out = (model.model.vision_tower if tower is None else tower)(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


FIRST_LETTER = W.KIND_CLASSES.index(W.LETTERS[0])
SMALL_SHAPE = 6  # patches: "small" for `small_shape_weight` and tower_eval's small_shapes


def small_shape_loss(kind_logits, targets, small):
    """Kind cross-entropy over the `small` patches (those of shapes of at most SMALL_SHAPE patches),
    each shape's patches sharing one shape's weight: a patch weighs 1 / its shape's size."""
    weight = 1.0 / targets["object_size"][small].float()
    per_patch = F.cross_entropy(kind_logits[small], targets["kind"][small], reduction="none")
    return (per_patch * weight).sum() / weight.sum()


def vision_loss(model, heads, batch, letter_weight: float = 0.0, anchor=None, anchor_weight: float = 0.0,
                kind_count_weight: float = 0.0, cls_count_weight: float = 0.0, small_shape_weight: float = 0.0):
    """Stage 1's loss. `anchor`: the donor tower's patch features for the same pixels (see Recipe)."""
    t = batch["targets"]
    feats = vision_features(model, batch["pixel_values"]).float()
    cls, patches = feats[:, 0], feats[:, 1:]
    kind_logits, color_logits = heads.kind(patches), heads.color(patches)
    fg = t["kind"] > 0
    letters = t["kind"] >= FIRST_LETTER
    # Objects cover ~15% of patches: their kind and colour get a loss of their own, not diluted by background.
    losses = {
        "kind": F.cross_entropy(kind_logits.flatten(0, 1), t["kind"].flatten())
        + F.cross_entropy(kind_logits[fg], t["kind"][fg]),
        "color": F.cross_entropy(color_logits.flatten(0, 1), t["color"].flatten())
        + F.cross_entropy(color_logits[fg], t["color"][fg]),
        "center": F.binary_cross_entropy_with_logits(heads.center(patches).squeeze(-1), t["center"],
                                                     pos_weight=torch.tensor(20.0)),
        "position": F.mse_loss(heads.position(patches), t["position"]) * 3,
        "present": F.binary_cross_entropy_with_logits(heads.present(cls), t["present"]),
    }
    if letter_weight and letters.any():
        losses["letter"] = letter_weight * F.cross_entropy(kind_logits[letters][:, FIRST_LETTER:],
                                                           t["kind"][letters] - FIRST_LETTER)
    shapes = t["kind_count"] > 0  # a shape's patches (letters and background are 0)
    small = shapes & (t["object_size"] <= SMALL_SHAPE)
    if small_shape_weight and small.any():
        losses["small_shape"] = small_shape_weight * small_shape_loss(kind_logits, t, small)
    if kind_count_weight and shapes.any():
        count_logits = heads.kind_count(patches[shapes])
        losses["kind_count"] = kind_count_weight * F.cross_entropy(count_logits, t["kind_count"][shapes])
    if cls_count_weight:
        cls_logits = heads.cls_count(cls).view(len(cls), len(W.SHAPES), -1)
        losses["cls_count"] = cls_count_weight * F.cross_entropy(cls_logits.flatten(0, 1), t["cls_count"].flatten())
    if anchor is not None and anchor_weight:
        kept = ~letters & ~small if small_shape_weight else ~letters
        drift = (patches[kept] - anchor[:, 1:][kept]).pow(2).mean() / anchor[:, 1:][kept].var()
        losses["anchor"] = anchor_weight * drift
    right = kind_logits.argmax(-1) == t["kind"]
    info = {"kind_acc_centre": float(right[t["center"] > 0].float().mean())}
    if small.any():
        info["small_shape_acc"] = float(right[small].float().mean())
    if letters.any():
        info["letter_acc"] = float(right[letters].float().mean())
    if "kind_count" in losses:
        info["kind_count_acc"] = float((count_logits.argmax(-1) == t["kind_count"][shapes]).float().mean())
    if cls_count_weight:
        named = cls_logits.argmax(-1) == t["cls_count"]
        info["cls_count_acc"] = float(named.float().mean())
        # The kinds the image shows: accuracy where most answers are not 0.
        info["cls_count_acc_present"] = float(named[t["cls_count"] > 0].float().mean())
    return sum(losses.values()), {**{k: float(v.detach()) for k, v in losses.items()}, **info}


def align_loss(model, tokenizer, batch, position_head):
    """Projector outputs read through the LLM's own embedding matrix should name the patch's words."""
    t = batch["targets"]
    with torch.no_grad():
        feats = vision_features(model, batch["pixel_values"])[:, 1:]
    projected = model.model.multi_modal_projector(feats).float()
    emb = model.model.language_model.embed_tokens.weight.detach().float()
    kind_words = word_ids(tokenizer, W.SHAPES + W.LETTERS)
    color_words = word_ids(tokenizer, W.COLOR_NAMES)
    vocab = torch.tensor(kind_words + color_words)
    logits = projected @ F.normalize(emb[vocab], dim=-1).T * 10
    target = torch.zeros(*t["kind"].shape, len(vocab))
    fg = t["kind"] > 0
    rows = fg.nonzero(as_tuple=True)
    target[rows + (t["kind"][fg] - 1,)] = 0.5
    target[rows + (len(kind_words) + t["color"][fg] - 1,)] = 0.5
    word_loss = -(target[fg] * F.log_softmax(logits[fg], -1)).sum(-1).mean()
    pos_loss = F.mse_loss(position_head(projected), t["position"]) * 10
    return word_loss + pos_loss, {"word": float(word_loss), "position": float(pos_loss)}


def position_loss(states, input_ids, image_token_id: int, head, normalise: bool = True) -> torch.Tensor:
    """Each image token's (row, column) on the 24x24 grid, scaled to [0, 1], from a linear head on its
    state (B, T, D): the projector outputs the LLM receives, normalised (image tokens are ~40x the
    norm of text embeddings: unnormalised, this loss would swamp the others until the head caught
    up), or value vectors as they are (the heads average them linearly)."""
    at = input_ids == image_token_id
    patch = (at.cumsum(-1) - 1)[at] % (W.GRID * W.GRID)  # tokens of each image in raster order
    target = torch.stack([patch // W.GRID, patch % W.GRID], dim=-1).float() / (W.GRID - 1)
    tokens = states[at].float()
    return F.mse_loss(head(F.layer_norm(tokens, tokens.shape[-1:]) if normalise else tokens), target) * 10
