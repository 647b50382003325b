"""Training recipe for the testbed model, in LLaVA's spirit: tower, alignment, then instructions.

Stage 1 (`vision`): the ViT alone, on dense per-patch ground truth from the world (each patch's
  object kind and colour, object centres, grid position) plus a [CLS] head predicting which kinds and
  colours the image holds, read at the penultimate layer that LLaVA uses. Features stay local, so
  pruning a question's evidence patches really removes the evidence.
Stage 2 (`align`): tower frozen; the projector learns to map each patch into the word-embedding space
  of the words that describe it (kind and colour), the analogue of LLaVA's caption alignment.
Stage 3 (`instruct`): tower frozen; projector and decoder on the question families, answer tokens only.

Every batch is a function of (stage, step), so a run killed at any moment resumes from its last
checkpoint to the same result. bf16 autocast on CPU (AMX) or GPU; weights stay fp32.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import model as M
from . import questions as Q
from . import world as W

FAMILIES_SEED = 7  # separates the conversation draws from the scene draws
MEAN = np.array(M.CLIP_MEAN, np.float32)[:, None, None]
STD = np.array(M.CLIP_STD, np.float32)[:, None, None]


@dataclass
class Recipe:
    seed: int = 0
    vision_steps: int = 900
    vision_batch: int = 32
    vision_lr: float = 3e-3
    align_steps: int = 80
    align_batch: int = 32
    align_lr: float = 3e-3
    instruct_steps: int = 900
    instruct_lr: float = 1.5e-3
    single_batch: int = 32
    multi_batch: int = 8
    video_batch: int = 4
    # Of every `cycle` instruction steps, which are multi-image and video ones (the rest single-image).
    cycle: int = 6
    multi_slots: tuple = (2,)
    video_slots: tuple = (5,)
    turns: int = 8  # questions per training conversation
    # Single-image scenes start reduced to 1, 2, ... objects, whole after `curriculum_steps`.
    curriculum_steps: int = 300
    curriculum_max_objects: int = 6
    warmup: int = 30
    # Attention supervision: in `attention_layer`, heads 0 and 1 at each answer's position are taught
    # to look at the evidence of the question's first and last referent (the same one unless the
    # question names two). Retrieval over 576 tokens otherwise forms very slowly (TRAINING.md).
    attention_weight: float = 0.5
    attention_layer: int = 1
    # Deep supervision of those heads' read-out: for questions whose answer is an attribute of the
    # looked-at object (a colour or a letter), heads 0-1's output alone, through the model's own
    # o_proj, final norm and lm_head, should name the answer. Without it the retrieval heads look at
    # the right patches but their values carry no colour for hundreds of steps (TRAINING.md).
    readout_weight: float = 0.0
    # Which answers the read-out loss covers: "attributes" (colours, letters) or "all" (also yes/no
    # and the four relations). Counts are read out only with `count_centres`, which makes them a
    # function of what the two heads look at.
    readout_answers: str = "attributes"
    # For a "no" (nothing in the images is what the question names), heads 0-1 look at the <s>
    # token instead of the partial matches: a clean signal that the read-out can tell from an object.
    sink_for_absent: bool = False
    # Keep each image token's grid position linearly readable from the projector output during
    # instruction tuning (the alignment stage's position loss, kept on): the answer loss alone let the
    # projector drop it (position R^2 0.91 in the tower's features, ~0 after the projector; TRAINING.md),
    # and a spatial relation cannot be read from values that carry no position.
    position_weight: float = 0.0
    # For a count question, heads 0-1 spread their attention evenly over <s> and the centre patch of
    # each counted object, and the read-out covers counts: <s>'s share, 1/(n+1), then says n. With
    # the default target (every patch of every counted object) the heads find the objects (0.96 of
    # their mass) but a weighted mean of their values cannot say how many there are (TRAINING.md).
    count_centres: bool = False
    # With `count_centres`, the count target per object instead of per centre patch: <s> and each counted
    # object (all its patches together) take 1/(n+1) of the heads' mass, however it is spread within an
    # object. The centre target left 25-60% of the mass on the counted objects' other patches, more on
    # bigger objects, so <s>'s share tracked area as much as n (TRAINING.md).
    count_objects: bool = False
    # Keep each image token's grid position linearly readable from the retrieval heads' value vectors
    # (layer `attention_layer`, key/value head 0): RoPE puts position into queries and keys only, and
    # the answer loss did not carry it into the values, so the heads' outputs could not say where the
    # objects they found are (spatial relations at chance with 0.6-0.7 of the attention on them).
    value_position_weight: float = 0.0
    # Keep each colour and each kind retrievable from the retrieval heads' keys: a free query per
    # colour (and per kind), rotated as from just after the images, should put its attention on that
    # colour's (kind's) patches. The shipped keys retrieve a shape with 0.95 of the mass but a colour
    # with 0.51, so "a red circle" matched shape only and existence stayed at chance (TRAINING.md).
    key_attribute_weight: float = 0.0
    # Layer 0's heads 2-3 spread their attention evenly over the words naming a referent ("red",
    # "circle") instead of merely putting it on them: with the mass target alone they took only the
    # shape word, so the answer position never learned the colour asked about (a linear probe of it
    # there: 7.5%, chance 12.5%; of the shape: 100%) and "a red circle" was searched as "a circle".
    spread_words: bool = False
    # A llava-hf checkpoint whose every weight is taken (stages 1-2 skipped): instruction tuning
    # continues from it.
    init_from: str | None = None
    # With `init_from`: first continue its vision tower for this many stage-1 steps (then instruction
    # tuning, alignment skipped). The tower read letters poorly (30% per object) because letters were
    # 2.8% of its foreground patches; these three fields are how a continuation reads them better.
    tower_steps: int = 0
    tower_lr: float = 1e-3
    # Share of each stage-1 batch drawn as reading scenes (4-8 letters at the text task's sizes and
    # small shapes) instead of the question families' scenes.
    letter_scenes: float = 0.0
    # Weight of a second kind loss over letter patches alone, among the letters only.
    letter_weight: float = 0.0
    # Keep every non-letter patch's features near the donor tower's (MSE over their variance), so the
    # projector and decoder trained on them still fit: only the letters' features are free to move.
    anchor_weight: float = 0.0
    # A llava-hf checkpoint whose vision tower replaces stage 1 (its vision steps are then skipped).
    vision_from: str | None = None
    # Thin the derived count questions towards uniform answers: one whose answer is n is kept with
    # probability (n / 4)^2. The scenes' shapes are mostly single, so 66% of the derived count answers
    # were "1" and 2% "4" (the count family asks 1-4 uniformly), and the model undercounted: on the
    # test split a 4 was mostly answered 3, a 3 mostly 2 (TRAINING.md).
    balance_counts: bool = False
    # Share of each single-image instruction batch drawn as reading scenes (`letter_scene`: 4-8 letters)
    # with every question they allow: text questions are otherwise ~1.5% of the training turns (only
    # the text family's 2-4 letters per image carry any).
    reading_share: float = 0.0
    # Share of each single-image instruction batch drawn from the count family on top of its round-robin
    # slot: counting is the family that gains slowest (its answer is a proportion read off two heads).
    count_share: float = 0.0
    # Weight of the count questions' rows in the retrieval heads' attention loss, relative to the other
    # questions': a count is read from <s>'s share, 1/(n+1), so mass that leaks off <s> and the counted
    # centres (~half of it in instruct_8) is noise of the size of the difference between 3 and 4.
    count_attention_weight: float = 1.0
    # Weight of `count_heads_loss`: counts also taught to heads 2-3 of `attention_layer`, whose values
    # carry nothing else (needs `count_centres`). Three recipes aimed at heads 0-1 left counting at
    # 0.65-0.675 (TRAINING.md): their values also carry colour and position, noise in the read-out.
    count_heads_weight: float = 0.0
    # Counts as an attribute, read like a colour (TRAINING.md, "What to try next"): in stage 1 every
    # patch of a shape also learns how many shapes of its kind the scene holds (`kind_count_weight`);
    # in instruction tuning the read-out also covers counts with the default count target (every patch
    # of every counted object, `count_readout`), so the heads average a count every patch carries
    # instead of measuring <s>'s share.
    kind_count_weight: float = 0.0
    count_readout: bool = False
    # Stage 1 only, a diagnostic first step towards the above: [CLS] learns each shape kind's count.
    cls_count_weight: float = 0.0
    # Weight of a stage-1 kind loss over the patches of small shapes (at most SMALL_SHAPE patches), each
    # shape weighted equally however many patches it has; those patches are also freed from the anchor.
    # Counting fails where a counted shape is small (0.59 under 30 px against 0.76; TRAINING.md), and
    # the per-patch kind loss gives a 2-patch shape 1/50 of a 100-patch one's weight.
    small_shape_weight: float = 0.0
    eval_every: int = 200
    eval_samples: int = 40
    checkpoint_every: int = 50
    dims: dict = field(default_factory=lambda: asdict(M.ModelDims()))


# ----------------------------------------------------------------------------- data

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
    return {tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}


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


def instruct_kind(recipe: Recipe, step: int) -> str:
    slot = step % recipe.cycle
    return "multi_image" if slot in recipe.multi_slots else "video" if slot in recipe.video_slots else "single"


def instruct_samples(recipe: Recipe, step: int) -> list[dict]:
    """The step's samples, each a conversation: its own question, then up to `turns - 1` more."""
    kind = instruct_kind(recipe, step)
    if kind == "single":
        fams = Q.SINGLE_IMAGE_FAMILIES
        counts = round(recipe.count_share * recipe.single_batch)
        reading = round(recipe.reading_share * recipe.single_batch)
        plain = recipe.single_batch - counts - reading
        if plain < 0:
            raise ValueError(f"--count-share and --reading-share together exceed 1 ({recipe.count_share} + "
                             f"{recipe.reading_share})")
        picks = [(fams[j % len(fams)], step * recipe.single_batch + j) for j in range(plain)]
        # Extra count samples take the indices of the slots they displace (no round-robin count has them);
        # reading scenes have their own index space.
        picks += [("count", step * recipe.single_batch + plain + k) for k in range(counts)]
        picks += [("reading", step * recipe.single_batch + k) for k in range(reading)]
    else:
        batch = recipe.multi_batch if kind == "multi_image" else recipe.video_batch
        picks = [(kind, step * batch + j) for j in range(batch)]
    samples = []
    for family, index in picks:
        sample = reading_sample(index) if family == "reading" else Q.make_sample("train", family, index)
        rng = np.random.default_rng([recipe.seed, FAMILIES_SEED, Q.FAMILIES.index(sample["family"]), index])
        keep = curriculum_objects(recipe, step)
        if keep is not None and kind == "single":
            sample = reduced(sample, keep, rng)
        else:
            turns = Q.derived_questions(sample, rng)
            if recipe.balance_counts:
                turns = [t for t in turns if t[0] not in COUNT_QUESTIONS
                         or rng.random() < (int(t[1]) / Q.COUNT_RANGE[1]) ** 2]
            sample = {**sample, "turns": turns, "referents": Q.referent_evidence(sample)}
        if sample is not None:
            turns = sample["turns"][:recipe.turns - 1]
            sample = {**sample, "turns": turns, "evidence_turns": [sample["referents"]] + [e for _, _, e in turns]}
            if recipe.count_centres:
                questions = [sample["question"]] + [q for q, _, _ in turns]
                sample["centre_turns"] = [counted_centres(sample, q) for q in questions]
                if recipe.count_objects:
                    sample["count_groups"] = [counted_objects(sample, q) for q in questions]
            samples.append(sample)
    return samples


COUNT_QUESTIONS = {Q.ask_count(shape): shape for shape in W.SHAPES}


def counted_ids(sample: dict, question: str) -> list[int] | None:
    """For a count question about a single image, the indices of the objects it counts; else None."""
    shape = COUNT_QUESTIONS.get(question)
    if shape is None or len(sample["scenes"]) != 1:
        return None
    return [i for i, o in enumerate(sample["scenes"][0]["objects"]) if o["kind"] == "shape" and o["name"] == shape]


def counted_centres(sample: dict, question: str) -> list[int] | None:
    """For a count question about a single image, the centre patch of each object it counts; else None."""
    ids = counted_ids(sample, question)
    return None if ids is None else [W.centre_patch(sample["scenes"][0]["objects"][i]) for i in ids]


def counted_objects(sample: dict, question: str) -> list[list[int]] | None:
    """For a count question about a single image, each counted object's patches (those it owns, as
    stage 1 labels them; its centre patch if it owns none); else None."""
    ids = counted_ids(sample, question)
    if ids is None:
        return None
    scene = sample["scenes"][0]
    owner = W.patch_owner(scene)
    return [np.flatnonzero(owner == i).tolist() or [W.centre_patch(scene["objects"][i])] for i in ids]


def curriculum_objects(recipe: Recipe, step: int) -> int | None:
    """Objects per scene early in instruction tuning (1, 2, ...), None once scenes are whole."""
    if step >= recipe.curriculum_steps:
        return None
    return 1 + (step * recipe.curriculum_max_objects) // recipe.curriculum_steps


def reduced(sample: dict, keep: int, rng) -> dict | None:
    """The sample's scene with only `keep` of its objects, asked about through derived questions
    (the family's own question may no longer hold, so the first turn is a derived one too)."""
    scene = sample["scenes"][0]
    chosen = sorted(rng.permutation(len(scene["objects"]))[:keep])
    scene = {**scene, "objects": [scene["objects"][i] for i in chosen]}
    small = {**sample, "scenes": [scene], "question": ""}
    questions = Q.derived_questions(small, rng)
    if not questions:
        return None
    (question, answer, referents), rest = questions[0], questions[1:]
    return {**small, "question": question, "answer": answer, "turns": rest, "referents": referents}


def letter_scene(index: int) -> dict:
    """A reading scene for the tower: 4-8 letters at the text task's sizes (26-38 px) and a few
    mostly small shapes, every letter and colour equally likely."""
    rng = np.random.default_rng([FAMILIES_SEED, 3, index])
    while True:
        wanted = [("letter", W.LETTERS[int(rng.integers(len(W.LETTERS)))],
                   W.COLOR_NAMES[int(rng.integers(len(W.COLOR_NAMES)))], int(rng.integers(26, 39)))
                  for _ in range(int(rng.integers(4, 9)))]
        wanted += [("shape", W.SHAPES[int(rng.integers(len(W.SHAPES)))],
                    W.COLOR_NAMES[int(rng.integers(len(W.COLOR_NAMES)))], W.sample_size(rng, 0.7))
                   for _ in range(int(rng.integers(1, 5)))]
        objects = W.place_objects(rng, wanted)
        if objects is not None:
            return {"bg": W.sample_background(rng), "objects": objects}


def reading_sample(index: int) -> dict:
    """A training sample on a reading scene, asking which letter one unique colour is written in
    (its conversation then asks every other question the scene allows)."""
    for k in range(index * 8, index * 8 + 64):
        scene = letter_scene(1_000_000_000 + k)  # never one of stage 1's reading scenes
        objs = scene["objects"]
        colours = [o["color"] for o in objs if o["kind"] == "letter"]
        unique = [i for i, o in enumerate(objs) if o["kind"] == "letter" and colours.count(o["color"]) == 1]
        if unique:
            target = objs[unique[0]]
            return {"id": f"train-reading-{index}", "family": "text", "question": Q.ask_text(target["color"]),
                    "answer": target["name"], "scenes": [scene], "evidence": W.evidence_patches(scene, unique[:1])}
    raise RuntimeError(f"no reading scene with a uniquely coloured letter near index {index}")


def vision_scenes(recipe: Recipe, stage_offset: int, step: int, batch: int) -> list[dict]:
    """Single scenes drawn from every family (multi-image and video frames included), and in stage 1
    a `letter_scenes` share of reading scenes."""
    reading = round(recipe.letter_scenes * batch) if stage_offset == 1 else 0
    scenes = [letter_scene(step * batch + j) for j in range(reading)]
    j = 0
    while len(scenes) < batch:
        fam = Q.FAMILIES[j % len(Q.FAMILIES)]
        s = Q.make_sample("train", fam, 10_000_000 * stage_offset + step * batch + j)
        scenes.append(s["scenes"][j % len(s["scenes"])])
        j += 1
    return scenes


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


def _worker_init(_):
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- heads for stages 1-2

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


def word_ids(tokenizer, words):
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    return [i[0] for i in ids]  # the tokenizer corpus makes each of these one token


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


def rotated_keys(model, hidden_states, batch, layer: int, kv: int):
    """Layer `layer`'s normalised input h (B, T, d), the batch's RoPE (cos, sin), and the keys
    (B, T, head_dim) of key/value head `kv` with RoPE applied, computed as LlamaAttention does."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    attn = lm.layers[layer].self_attn
    h = lm.layers[layer].input_layernorm(hidden_states[layer])
    cos, sin = lm.rotary_emb(h, batch["position_ids"])
    k = attn.k_proj(h).view(h.shape[0], h.shape[1], -1, attn.head_dim)[:, :, kv:kv + 1]
    _, k = apply_rotary_pos_emb(k, k, cos, sin, unsqueeze_dim=2)
    return h, cos, sin, k[:, :, 0]


def answer_attention(model, hidden_states, batch, rows, positions, layer: int, heads=(0, 1)) -> torch.Tensor:
    """Log attention probabilities (N, 2, T) of two heads of `layer` that share a key/value head, at
    the given (row, position)s.

    Recomputed exactly as LlamaAttention does (RMSNorm, projections, RoPE at the batch's position ids,
    the batch's attention mask), but only at the queried positions (tested against eager attention).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.language_model.layers[layer].self_attn
    kv = heads[0] // attn.num_key_value_groups
    if [h_ // attn.num_key_value_groups for h_ in heads] != [kv, kv]:
        raise ValueError(f"heads {heads} do not share one key/value head")
    h, cos, sin, k = rotated_keys(model, hidden_states, batch, layer, kv)  # k: (B, T, D)
    q = attn.q_proj(h[rows, positions]).view(len(rows), -1, attn.head_dim)[:, None, list(heads)]  # (N, 1, 2, D)
    q, _ = apply_rotary_pos_emb(q, q, cos[rows, positions][:, None], sin[rows, positions][:, None], unsqueeze_dim=2)
    scores = torch.einsum("nhd,ntd->nht", q[:, 0].float(), k[rows].float()) * attn.scaling
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
    _, cos, sin, k = rotated_keys(model, hidden_states, batch, layer, kv=0)
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
    if answers not in ("attributes", "all"):
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


# ----------------------------------------------------------------------------- evaluation

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


# ----------------------------------------------------------------------------- the loop

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def rope_theta_of(path) -> float:
    """The RoPE base of a llava-hf checkpoint's decoder."""
    from transformers import LlavaConfig

    try:
        return float(LlavaConfig.from_pretrained(path).text_config.rope_parameters["rope_theta"])
    except OSError as err:
        raise ValueError(f"--init-from {path}: not a llava-hf checkpoint ({err})") from None


class Trainer:
    def __init__(self, out_dir: str | Path, recipe: Recipe, device: str | None = None, log=print):
        if recipe.count_objects and not recipe.count_centres:
            raise ValueError("--count-objects needs --count-centres (it changes the count target's patches)")
        if recipe.count_heads_weight and not recipe.count_centres:
            raise ValueError("--count-heads-weight needs --count-centres (the count target is <s> and the centres)")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.recipe = recipe
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.log_fn = log
        dims = M.ModelDims(**recipe.dims)
        self.model, self.processor = M.build_model(dims, seed=recipe.seed)
        self.model.to(self.device).train()
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = self.model.config.image_token_id
        words = readout_words(recipe.readout_answers, counts=recipe.count_centres or recipe.count_readout)
        self._attribute_ids = torch.tensor(word_ids(self.tokenizer, words), device=self.device)
        torch.manual_seed(recipe.seed)
        self.heads = VisionHeads(dims.vision_hidden).to(self.device)
        self.align_head = torch.nn.Linear(dims.text_hidden, 2).to(self.device)
        self.value_head = torch.nn.Linear(dims.text_hidden // dims.text_heads, 2).to(self.device)
        attributes = len(W.COLOR_CLASSES) - 1 + len(W.KIND_CLASSES) - 1
        self.key_queries = torch.nn.Embedding(attributes, dims.text_hidden // dims.text_heads).to(self.device)
        self.state = {"stage": "vision", "step": 0}
        self.optimizer = None
        self._make_optimizer()
        self.ckpt = self.out / "checkpoint.pt"
        if self.ckpt.exists():
            self._resume()
        elif recipe.init_from:
            self._take(recipe.init_from, "init_from")
            if recipe.tower_steps:
                self.state = {"stage": "vision", "step": 0}
                self._make_optimizer()
        elif recipe.vision_from:
            self._take(recipe.vision_from, "vision_from")
        self.anchor = None  # the donor's tower, frozen: what the continued tower's features stay near
        if recipe.init_from and recipe.tower_steps and recipe.anchor_weight and self.state["stage"] == "vision":
            import copy

            self.anchor = copy.deepcopy(self.model.model.vision_tower).requires_grad_(False)
            if self.ckpt.exists():  # resumed: the donor's tower is in the donor, not in the checkpoint
                from transformers import LlavaForConditionalGeneration

                donor = LlavaForConditionalGeneration.from_pretrained(recipe.init_from)
                self.anchor.load_state_dict(donor.model.vision_tower.state_dict())
            self.anchor.to(self.device).eval()

    # Parameters trained in each stage.
    def _params(self, stage):
        m = self.model.model
        if stage == "vision":
            return list(m.vision_tower.parameters()) + list(self.heads.parameters())
        if stage == "align":
            return list(m.multi_modal_projector.parameters()) + list(self.align_head.parameters())
        extra = list(self.align_head.parameters()) if self.recipe.position_weight else []
        extra += list(self.value_head.parameters()) if self.recipe.value_position_weight else []
        extra += list(self.key_queries.parameters()) if self.recipe.key_attribute_weight else []
        return list(m.multi_modal_projector.parameters()) + list(m.language_model.parameters()) + \
            list(self.model.lm_head.parameters()) + extra

    def _make_optimizer(self):
        stage = self.state["stage"]
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = self._params(stage)
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))

    def _resume(self):
        blob = torch.load(self.ckpt, map_location=self.device, weights_only=False)
        self.model.load_state_dict(blob["model"])
        self.heads.load_state_dict(blob["heads"])
        self.align_head.load_state_dict(blob["align_head"])
        for name in ("value_head", "key_queries"):  # absent from checkpoints made before they existed
            if name in blob:
                getattr(self, name).load_state_dict(blob[name])
        self.state = blob["state"]
        self._make_optimizer()
        saved = blob.get("optimizer")
        if saved is not None:
            had, has = len(saved["param_groups"][0]["params"]), len(self.optimizer.param_groups[0]["params"])
            if had <= has:  # a recipe switch that adds a trained head appends its parameters: they start fresh
                state = self.optimizer.state_dict()
                state["state"].update(saved["state"])
                self.optimizer.load_state_dict(state)
            else:
                self.log("optimizer state not resumed: the resumed recipe trains fewer parameters")
        self.log(f"resumed at stage {self.state['stage']} step {self.state['step']}")

    # What a donor checkpoint can give: (submodule, the flag naming it, the stage training resumes at,
    # what the log says is skipped).
    _DONATIONS = {"vision_from": ("model.vision_tower", "--vision-from", "align", "its vision tower; stage 1"),
                  "init_from": ("", "--init-from", "instruct", "every weight; stages 1-2")}

    def _take(self, path, what: str):
        """Load part of a llava-hf checkpoint (`what`: a key of _DONATIONS) and skip the stages it replaces."""
        from transformers import LlavaForConditionalGeneration

        part, flag, stage, said = self._DONATIONS[what]
        donor = LlavaForConditionalGeneration.from_pretrained(path)
        try:
            self.model.get_submodule(part).load_state_dict(donor.get_submodule(part).state_dict())
        except RuntimeError as err:
            raise ValueError(f"{flag} {path}: its weights do not fit these dims ({err})") from None
        self.state = {"stage": stage, "step": 0}
        self._make_optimizer()
        self.log(f"taken from {path}: {said} skipped")

    def save_checkpoint(self):
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "heads": self.heads.state_dict(),
                    "align_head": self.align_head.state_dict(), "value_head": self.value_head.state_dict(),
                    "key_queries": self.key_queries.state_dict(),
                    "state": self.state,
                    "optimizer": self.optimizer.state_dict(), "recipe": asdict(self.recipe)}, tmp)
        tmp.replace(self.ckpt)  # atomic: a kill mid-write leaves the previous checkpoint intact

    def log(self, msg: str, **fields):
        line = {"time": round(time.time(), 1), **self.state, "msg": msg, **fields}
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        self.log_fn(f"[{self.state['stage']} {self.state['step']}] {msg} {fields if fields else ''}")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def run(self):
        from tqdm import tqdm

        r = self.recipe
        stages = [("vision", r.vision_steps, r.vision_lr), ("align", r.align_steps, r.align_lr),
                  ("instruct", r.instruct_steps, r.instruct_lr)]
        if r.init_from:  # every weight taken: at most a tower continuation, then instruction tuning
            stages = [("vision", r.tower_steps, r.tower_lr)] * bool(r.tower_steps) + stages[2:]
        names = [s[0] for s in stages]
        for name, total, peak in stages[names.index(self.state["stage"]):]:
            if self.state["stage"] != name:
                self.state = {"stage": name, "step": 0}
                self._make_optimizer()
            bar = tqdm(total=total, initial=self.state["step"], desc=f"stage {name}", unit="step")
            batches = torch.utils.data.DataLoader(
                StepBatches(r, name, self.state["step"], total, self.tokenizer, self.image_token_id),
                batch_size=None, num_workers=1, prefetch_factor=2, worker_init_fn=_worker_init)
            for batch in batches:
                step = self.state["step"]
                lr = lr_at(step, total, peak, r.warmup)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                with self._autocast():
                    loss, info = self._loss(name, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if step % 10 == 0:
                    self.log("train", loss=round(float(loss.detach()), 4), lr=round(lr, 6),
                             **{k: round(v, 4) for k, v in info.items()})
                if name == "instruct" and (step + 1) % r.eval_every == 0:
                    self.log("val", **quick_eval(self.model, self.processor, "validation", r.eval_samples))
                if name == "vision" and step + 1 == total:
                    self.log("val", **tower_eval(self.model, self.heads, counts=bool(r.kind_count_weight)))
                if (step + 1) % r.checkpoint_every == 0 or step + 1 == total:
                    self.save_checkpoint()
            bar.close()
        self.state = {"stage": "done", "step": 0}
        self.save_checkpoint()

    def _loss(self, stage, batch):
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else
                     {n: t.to(self.device) for n, t in v.items()}) for k, v in batch.items()}
        if stage == "vision":
            anchor = None
            if self.anchor is not None:
                with torch.no_grad():
                    anchor = vision_features(self.model, batch["pixel_values"], tower=self.anchor).float()
            return vision_loss(self.model, self.heads, batch, self.recipe.letter_weight, anchor,
                               self.recipe.anchor_weight, self.recipe.kind_count_weight,
                               self.recipe.cls_count_weight, self.recipe.small_shape_weight)
        if stage == "align":
            return align_loss(self.model, self.tokenizer, batch, self.align_head)
        evidence = batch.pop("evidence", None)
        attributes = batch.pop("patch_labels", None)
        if evidence is None or not self.recipe.attention_weight:
            return self.model(**batch).loss, {}
        out = self.model(**batch, output_hidden_states=True)
        layer = self.recipe.attention_layer
        attention = attention_loss(self.model, out.hidden_states, batch, evidence, layer, self.recipe.spread_words,
                                   self.recipe.count_attention_weight)
        loss = out.loss + self.recipe.attention_weight * attention
        info = {"answer": float(out.loss), "attention": float(attention)}
        if self.recipe.readout_weight:
            readout = readout_loss(self.model, out.hidden_states, batch, evidence, layer, self._attribute_ids)
            loss = loss + self.recipe.readout_weight * readout
            info["readout"] = float(readout)
        if self.recipe.count_heads_weight:
            counting = count_heads_loss(self.model, out.hidden_states, batch, evidence, layer)
            loss = loss + self.recipe.count_heads_weight * counting
            info["count_heads"] = float(counting)
        if self.recipe.position_weight:
            position = position_loss(out.hidden_states[0], batch["input_ids"], self.image_token_id, self.align_head)
            loss = loss + self.recipe.position_weight * position
            info["position"] = float(position)
        if self.recipe.value_position_weight:
            values = retrieval_values(self.model, out.hidden_states, layer)
            position = position_loss(values, batch["input_ids"], self.image_token_id, self.value_head, normalise=False)
            loss = loss + self.recipe.value_position_weight * position
            info["value_position"] = float(position)
        if self.recipe.key_attribute_weight:
            keyed = key_attribute_loss(self.model, out.hidden_states, batch, attributes, self.key_queries.weight,
                                       self.image_token_id, layer)
            loss = loss + self.recipe.key_attribute_weight * keyed
            info["key_attribute"] = float(keyed)
        return loss, info

    def export(self, path: str | Path, command: str = ""):
        """The model in llava-hf form, with the recipe, the command and the training log beside it."""
        import shutil

        self.model.eval()
        M.save(self.model.float().cpu(), self.processor, path, M.ModelDims(**self.recipe.dims))
        (Path(path) / "training_recipe.json").write_text(
            json.dumps({"command": command, "recipe": asdict(self.recipe)}, indent=2))
        shutil.copy(self.out / "train_log.jsonl", Path(path) / "train_log.jsonl")
