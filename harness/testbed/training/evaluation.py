"""Evaluation during training: greedy answers through the public processor path, validation
accuracy per family, and the stage-1 heads' per-object accuracy."""

from __future__ import annotations

import numpy as np
import torch

from .. import model as M
from .. import questions as Q
from .. import world as W
from .batches import pixels
from .losses import SMALL_SHAPE, vision_features


@torch.no_grad()
def generate_answers(model, processor, samples, batch_size: int = 8, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers through the public processor path (left padding), as a user would run it."""
    answers = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        texts = [M.format_prompt(s["question"], len(s["scenes"])) for s in chunk]
        images = [[W.render_pil(sc) for sc in s["scenes"]] for s in chunk]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def quick_eval(model, processor, split: str, n: int, families=Q.FAMILIES) -> dict[str, float]:
    model.eval()
    result = {}
    for fam in families:
        samples = [Q.make_sample(split, fam, i) for i in range(n)]
        answers = generate_answers(model, processor, samples, batch_size=4 if fam == "video" else 8)
        correct = [Q.normalize_answer(a) == Q.normalize_answer(s["answer"]) for a, s in zip(answers, samples)]
        result[fam] = float(np.mean(correct))
    model.train()
    return result


@torch.no_grad()
def tower_eval(model, heads, n: int = 48, counts: bool = False) -> dict[str, float]:
    """Per-object kind accuracy of the stage-1 heads on validation scenes (the text and count
    families'): each object's patches vote with their summed log-probabilities, as the linear probes
    in TRAINING.md do. Letters, and shapes of at most 6 patches (what counting misreads); with
    `counts`, also each shape's count of its kind, voted the same way."""
    scenes = [s for fam in ("text", "count") for i in range(n)
              for s in Q.make_sample("validation", fam, i)["scenes"]]
    right = {"letters": [], "small_shapes": [], "shapes": [], "kind_count": []}
    for k in range(0, len(scenes), 16):
        chunk = scenes[k:k + 16]
        feats = vision_features(model, pixels(chunk).to(next(model.parameters()).device)).float()
        logp = heads.kind(feats[:, 1:]).log_softmax(-1).cpu()
        count_logp = heads.kind_count(feats[:, 1:]).log_softmax(-1).cpu() if counts else logp
        for scene, lp, clp in zip(chunk, logp, count_logp):
            owner = W.patch_owner(scene)  # the patches stage 1 labels with each object
            per_kind = W.kind_counts(scene)
            for i, obj in enumerate(scene["objects"]):
                own = torch.from_numpy(owner == i)
                if not own.any():
                    continue
                ok = int(lp[own].sum(0).argmax()) == W.KIND_CLASSES.index(obj["name"])
                if obj["kind"] == "letter":
                    right["letters"].append(ok)
                else:
                    right["shapes"].append(ok)
                    if counts:
                        right["kind_count"].append(int(clp[own].sum(0).argmax()) == per_kind[obj["name"]])
                    if int(own.sum()) <= SMALL_SHAPE:
                        right["small_shapes"].append(ok)
    return {f"{k}_per_object": round(float(np.mean(v)), 4) for k, v in right.items() if v}
