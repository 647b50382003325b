"""Training batches as tensors: prompts tokenised as the processor builds them, several questions
about one image packed into one sequence, the attention losses' targets, stage 1's dense targets."""

from __future__ import annotations

import numpy as np
import torch

from .. import model as M
from .. import world as W
from .recipe import Recipe
from .samples import instruct_samples, vision_scenes

MEAN = np.array(M.CLIP_MEAN, np.float32)[:, None, None]
STD = np.array(M.CLIP_STD, np.float32)[:, None, None]


def pixels(scenes: list[dict]) -> torch.Tensor:
    """CLIP-normalised pixel tensor of rendered scenes (equal to the processor's output; tested)."""
    arr = np.stack([W.render(s).transpose(2, 0, 1).astype(np.float32) / 255.0 for s in scenes])
    return torch.from_numpy((arr - MEAN) / STD)


def _expand(ids, labels, image_token_id):
    """Each image placeholder becomes the 576 positions its patch features fill."""
    out_ids, out_labels = [], []
    for tok, lab in zip(ids, labels):
        n = W.GRID * W.GRID if tok == image_token_id else 1
        out_ids += [tok] * n
        out_labels += [lab] * n
    return out_ids, out_labels


def encode(tokenizer, image_token_id: int, sample: dict, with_answer: bool = True):
    """input ids of the sample's prompt as the processor builds them (image placeholders expanded to
    576 each), then its answer and </s>; labels on the answer tokens only."""
    prompt = tokenizer(M.format_prompt(sample["question"], len(sample["scenes"])))["input_ids"]
    ids = tokenizer(M.format_prompt(sample["question"], len(sample["scenes"])) + " " + sample["answer"] + "</s>")[
        "input_ids"] if with_answer else prompt
    if ids[:len(prompt)] != prompt:
        raise RuntimeError(f"tokenisation is not incremental at answer {sample['answer']!r}")
    return _expand(ids, [-100] * len(prompt) + ids[len(prompt):], image_token_id)


def encode_branches(tokenizer, image_token_id: int, sample: dict):
    """All the sample's questions about its images in one sequence, each seeing only the shared image
    prefix and itself: "<s>USER: <image>\n" then, per question, "{q} ASSISTANT: {a}</s>".

    Returns ids, labels, position ids and segments (0: the prefix, k: question k). Under the mask
    `collate` builds, every question is computed exactly as the single-turn prompt the evaluation
    asks (same tokens, same positions), at the cost of one image forward for all of them (tested).
    """
    n_images = len(sample["scenes"])
    prefix = tokenizer(M.format_prompt("", n_images).split(" ASSISTANT:")[0])["input_ids"]
    ids, labels = _expand(prefix, [-100] * len(prefix), image_token_id)
    start = len(ids)
    positions, segments = list(range(start)), [0] * start
    questions = [(sample["question"], sample["answer"])] + [(q, a) for q, a, *_ in sample.get("turns", ())]
    for k, (question, answer) in enumerate(questions, start=1):
        branch_ids, branch_labels = encode(tokenizer, image_token_id, {**sample, "question": question,
                                                                        "answer": answer})
        if branch_ids[:start] != ids[:start]:
            raise RuntimeError(f"question {question!r} does not start with the image prefix")
        ids += branch_ids[start:]
        labels += branch_labels[start:]
        positions += list(range(start, len(branch_ids)))
        segments += [k] * (len(branch_ids) - start)
    return ids, labels, positions, segments


def collate(samples, tokenizer, image_token_id, sink_for_absent: bool = False):
    """A padded batch of branched samples, with its (batch, 1, T, T) boolean attention mask."""
    encoded = [encode_branches(tokenizer, image_token_id, s) for s in samples]
    # Few distinct lengths: CPU kernels (oneDNN) are rebuilt for every new shape.
    length = -(-max(len(e[0]) for e in encoded) // 128) * 128
    input_ids = torch.full((len(samples), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    position_ids = torch.zeros((len(samples), length), dtype=torch.long)
    segments = torch.full((len(samples), length), -1, dtype=torch.long)
    for row, (ids, labs, pos, seg) in enumerate(encoded):
        n = len(ids)
        input_ids[row, :n], labels[row, :n] = torch.tensor(ids), torch.tensor(labs)
        position_ids[row, :n], segments[row, :n] = torch.tensor(pos), torch.tensor(seg)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    mask = causal & ((seg_k == 0) | (seg_k == seg_q)) & (seg_k >= 0)
    mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
    scenes = [scene for s in samples for scene in s["scenes"]]
    batch = {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
             "labels": labels, "pixel_values": pixels(scenes)}
    if all("evidence_turns" in s for s in samples):
        sink = set(word_ids(tokenizer, ["no"])) if sink_for_absent else set()
        batch["evidence"] = evidence_targets(samples, input_ids, labels, image_token_id, referent_words(tokenizer),
                                             sink_answers=sink)
    return batch


def referent_words(tokenizer) -> set[int]:
    """Token ids of the words that name what a question asks about (colours and shapes)."""
    words = list(W.COLOR_NAMES) + list(W.SHAPES) + list(W.PLURAL.values())
    return set(word_ids(tokenizer, words))


def evidence_targets(samples, input_ids, labels, image_token_id, word_ids, sink_answers=frozenset()) -> dict:
    """Targets for the attention losses, at the position that predicts each answer's first token:
    per referent the question names, the positions of its words in the question (`words`) and of its
    evidence patches in the images (`patches`); spatial questions name two referents, others one.
    An answer whose first token is in `sink_answers` targets the row's <s> token instead of patches.
    A turn with counted centres (`centre_turns`, see `Recipe.count_centres`) targets <s> and those
    centre patches, to be spread over evenly (`spread`). With counted objects (`count_groups`, see
    `Recipe.count_objects`) such a turn also has `groups`: 1 on <s>, 2 + k on the k-th counted object's
    patches, 0 elsewhere (all 0 on other turns)."""
    rows, positions, patches, words, spread, object_groups = [], [], [[], []], [[], []], [], []
    length = input_ids.shape[1]
    for row, sample in enumerate(samples):
        answer_starts = ((labels[row, 1:] != -100) & (labels[row, :-1] == -100)).nonzero().flatten().tolist()
        answer_ends = ((labels[row, :-1] != -100) & (labels[row, 1:] == -100)).nonzero().flatten()
        question_starts = [0] + (answer_ends + 1).tolist()
        image_positions = (input_ids[row] == image_token_id).nonzero().flatten()
        evidence = sample["evidence_turns"]
        if len(answer_starts) != len(evidence):
            raise RuntimeError(f"{len(answer_starts)} answers but {len(evidence)} evidence sets")
        centres = sample.get("centre_turns") or [None] * len(evidence)
        objects = sample.get("count_groups") or [None] * len(evidence)
        for pos, referents, counted, owned in zip(answer_starts, evidence, centres, objects):
            to_sink = int(labels[row, pos + 1]) in sink_answers
            if not to_sink and not all(referents):
                continue  # a 'no' about a colour and shape that nothing in the images has
            begin = max(q for q in question_starts if q <= pos)
            named = [t for t in range(max(begin, int(image_positions[-1]) + 1), pos + 1)
                     if int(input_ids[row, t]) in word_ids]
            groups = (named[:len(named) // 2], named[len(named) // 2:]) if len(referents) == 2 else (named, named)
            if not all(groups):
                raise RuntimeError(f"no referent words found for the answer at position {pos}")
            rows.append(row)
            positions.append(pos)
            spread.append(counted is not None)
            group = torch.zeros(length, dtype=torch.long)
            if counted is not None and owned is not None:
                group[0] = 1
                for k, own in enumerate(owned):
                    group[image_positions[torch.tensor(own)]] = 2 + k
            object_groups.append(group)
            for head in range(2):
                mask = torch.zeros(length, dtype=torch.bool)
                if counted is not None:  # <s> and the counted centres
                    mask[0] = True
                    mask[image_positions[torch.tensor(counted)]] = True
                elif to_sink:
                    mask[0] = True  # <s>: the prompt's first token (rows are right-padded)
                else:
                    mask[image_positions[torch.tensor((referents[0], referents[-1])[head])]] = True
                patches[head].append(mask)
                mask = torch.zeros(length, dtype=torch.bool)
                mask[groups[head]] = True
                words[head].append(mask)
    stack = lambda masks: torch.stack([torch.stack(m) for m in masks], dim=1) if rows else \
        torch.zeros(0, 2, length, dtype=torch.bool)  # (queries, 2, length)
    return {"rows": torch.tensor(rows, dtype=torch.long), "positions": torch.tensor(positions, dtype=torch.long),
            "patches": stack(patches), "words": stack(words), "spread": torch.tensor(spread, dtype=torch.bool),
            "groups": torch.stack(object_groups) if rows else torch.zeros(0, length, dtype=torch.long)}


def word_ids(tokenizer, words):
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    return [i[0] for i in ids]  # the tokenizer corpus makes each of these one token


def dense_targets(scenes):
    labels = [W.patch_labels(s) for s in scenes]
    kind = torch.from_numpy(np.stack([l["kind"] for l in labels]))
    color = torch.from_numpy(np.stack([l["color"] for l in labels]))
    present = torch.zeros(len(scenes), len(W.KIND_CLASSES) - 1 + len(W.COLOR_CLASSES) - 1)
    for i, s in enumerate(scenes):
        for o in s["objects"]:
            present[i, W.KIND_CLASSES.index(o["name"]) - 1] = 1
            present[i, len(W.KIND_CLASSES) - 1 + W.COLOR_CLASSES.index(o["color"]) - 1] = 1
    return {"kind": kind, "color": color, "present": present,
            "center": torch.from_numpy(np.stack([l["center"] for l in labels])),
            "position": torch.from_numpy(np.stack([l["position"] for l in labels])),
            "kind_count": torch.from_numpy(np.stack([l["kind_count"] for l in labels])),
            "object_size": torch.from_numpy(np.stack([l["object_size"] for l in labels])),
            "cls_count": torch.tensor([list(W.kind_counts(s).values()) for s in scenes])}


def attribute_targets(scenes) -> torch.Tensor:
    """(images, colours + kinds, 576) boolean: which patches show each colour and each kind
    (background excluded), as the vision stage labels them."""
    labels = [W.patch_labels(s) for s in scenes]
    colour = torch.from_numpy(np.stack([l["color"] for l in labels]))
    kind = torch.from_numpy(np.stack([l["kind"] for l in labels]))
    colours = colour[:, None] == torch.arange(1, len(W.COLOR_CLASSES))[None, :, None]
    kinds = kind[:, None] == torch.arange(1, len(W.KIND_CLASSES))[None, :, None]
    return torch.cat([colours, kinds], dim=1)


def make_batch(recipe: Recipe, stage: str, step: int, tokenizer, image_token_id: int) -> dict:
    """Everything one training step consumes: a pure function of (recipe, stage, step)."""
    if stage == "instruct":
        samples = instruct_samples(recipe, step)
        batch = collate(samples, tokenizer, image_token_id, recipe.sink_for_absent)
        if recipe.key_attribute_weight:
            batch["patch_labels"] = attribute_targets([scene for s in samples for scene in s["scenes"]])
        return batch
    offset, batch = (1, recipe.vision_batch) if stage == "vision" else (2, recipe.align_batch)
    scenes = vision_scenes(recipe, offset, step, batch)
    return {"pixel_values": pixels(scenes), "targets": dense_targets(scenes)}


class StepBatches(torch.utils.data.IterableDataset):
    """Batches for steps start..total-1, built in a worker process while the model trains."""

    def __init__(self, recipe, stage, start, total, tokenizer, image_token_id):
        super().__init__()
        self.args = (recipe, stage, start, total, tokenizer, image_token_id)

    def __iter__(self):
        recipe, stage, start, total, tokenizer, image_token_id = self.args
        for step in range(start, total):
            yield make_batch(recipe, stage, step, tokenizer, image_token_id)
