"""What each training step draws: the instruction conversations and the stage 1-2 scenes.

Every draw is a pure function of (recipe, stage, step), so a resumed run sees the batches it would have.
"""

from __future__ import annotations

import numpy as np

from .. import questions as Q
from .. import world as W
from .recipe import Recipe

FAMILIES_SEED = 7  # separates the conversation draws from the scene draws


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
            raise ValueError(f"count_share and reading_share together exceed 1 ({recipe.count_share} + "
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
