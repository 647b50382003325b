"""Question families over the synthetic world, each a pure function of (split, family, index).

A sample is a JSON-able dict: the question, its answer (and choices for multiple choice), the scene
specs of its images (one, several, or video frames) and `evidence`: the patch indices, over all of
the sample's images concatenated (image i's patch p is i*576 + p), that hold what the question asks.
Seeds are drawn from (split, family, index), so the splits are disjoint by construction.
"""

from __future__ import annotations

import numpy as np

from harness.metrics.consistency import normalize_answer  # noqa: F401  (the task scoring's too)

from . import world as W

FAMILIES = ("exist", "count", "color", "color_mc", "spatial", "text", "multi_image", "video")
SINGLE_IMAGE_FAMILIES = ("exist", "count", "color", "color_mc", "spatial", "text")
SPLITS = {"train": 0, "validation": 1, "test": 2}
VIDEO_FRAMES = 8
COUNT_RANGE = (1, 4)


# The question templates, shared by the evaluation families and the training conversations.
def ask_exist(color, shape): return f"Is there a {color} {shape} in the image? Answer yes or no."
def ask_count(shape): return f"How many {W.PLURAL[shape]} are there in the image? Answer with a number."
def ask_color(shape): return f"What color is the {shape}? Answer with one word."
def ask_spatial(c1, s1, c2, s2):
    return f"Where is the {c1} {s1} relative to the {c2} {s2}? Answer left, right, above or below."
def ask_text(color): return f"Which letter is written in {color}? Answer with one letter."
def ask_multi_image(shape): return f"One of the images shows a {shape}. What color is it? Answer with one word."
def ask_video(color, shape): return f"Does a {color} {shape} appear in the video? Answer yes or no."


def _pick(rng, seq, exclude=()):
    options = [x for x in seq if x not in exclude]
    return options[int(rng.integers(len(options)))]


def _distractors(rng, n, forbidden=(), shapes=W.SHAPES, small_bias=0.4):
    """n random shape objects whose (colour, shape) pair is never in `forbidden`."""
    wanted = []
    while len(wanted) < n:
        shape, color = _pick(rng, shapes), _pick(rng, W.COLOR_NAMES)
        if (color, shape) not in forbidden:
            wanted.append(("shape", shape, color, W.sample_size(rng, small_bias)))
    return wanted


def _scene(rng, wanted, shuffle=True):
    if shuffle:
        wanted = [wanted[i] for i in rng.permutation(len(wanted))]
    objects = W.place_objects(rng, wanted)
    return None if objects is None else {"bg": W.sample_background(rng), "objects": objects}


def _ids(scene, pred):
    return [i for i, o in enumerate(scene["objects"]) if pred(o)]


def _single(question, answer, scene, evidence_ids, **extra):
    return {"question": question, "answer": answer, "scenes": [scene],
            "evidence": W.evidence_patches(scene, evidence_ids), **extra}


# ----------------------------------------------------------------------------- families

def gen_exist(rng):
    shape, color = _pick(rng, W.SHAPES), _pick(rng, W.COLOR_NAMES)
    present = bool(rng.integers(2))
    # Hard negatives: the same colour on another shape, the same shape in another colour.
    wanted = [("shape", _pick(rng, W.SHAPES, [shape]), color, W.sample_size(rng)),
              ("shape", shape, _pick(rng, W.COLOR_NAMES, [color]), W.sample_size(rng))]
    if present:
        wanted.append(("shape", shape, color, W.sample_size(rng, small_bias=0.6)))
    wanted += _distractors(rng, int(rng.integers(1, 8)), forbidden={(color, shape)})
    scene = _scene(rng, wanted)
    if scene is None:
        return None
    target = _ids(scene, lambda o: (o["color"], o["name"]) == (color, shape))
    near = _ids(scene, lambda o: o["color"] == color or o["name"] == shape)
    return _single(ask_exist(color, shape),
                   "yes" if present else "no", scene, target if present else near)


def gen_count(rng):
    shape = _pick(rng, W.SHAPES)
    k = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
    wanted = [("shape", shape, _pick(rng, W.COLOR_NAMES), W.sample_size(rng, 0.3)) for _ in range(k)]
    wanted += _distractors(rng, int(rng.integers(1, 7)), shapes=[s for s in W.SHAPES if s != shape])
    scene = _scene(rng, wanted)
    if scene is None:
        return None
    return _single(ask_count(shape),
                   str(k), scene, _ids(scene, lambda o: o["name"] == shape))


def gen_color(rng):
    shape, color = _pick(rng, W.SHAPES), _pick(rng, W.COLOR_NAMES)
    wanted = [("shape", shape, color, W.sample_size(rng, 0.6))]
    wanted += _distractors(rng, int(rng.integers(2, 9)), shapes=[s for s in W.SHAPES if s != shape])
    scene = _scene(rng, wanted)
    if scene is None:
        return None
    return _single(ask_color(shape), color, scene,
                   _ids(scene, lambda o: o["name"] == shape))


def gen_color_mc(rng):
    sample = gen_color(rng)
    if sample is None:
        return None
    others = [c for c in W.COLOR_NAMES if c != sample["answer"]]
    choices = [sample["answer"]] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
    choices = [choices[i] for i in rng.permutation(4)]
    return {**sample, "choices": choices, "answer_index": choices.index(sample["answer"])}


RELATIONS = ("left", "right", "above", "below")


def _relation(a, b):
    """Relation of box a to box b if one axis clearly dominates, else None."""
    ax, ay = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    bx, by = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    dx, dy = ax - bx, ay - by
    if abs(dx) > 2 * abs(dy) and abs(dx) > 40:
        return "left" if dx < 0 else "right"
    if abs(dy) > 2 * abs(dx) and abs(dy) > 40:
        return "above" if dy < 0 else "below"
    return None


def gen_spatial(rng):
    s1, c1 = _pick(rng, W.SHAPES), _pick(rng, W.COLOR_NAMES)
    s2, c2 = _pick(rng, W.SHAPES, [s1]), _pick(rng, W.COLOR_NAMES)
    wanted = [("shape", s1, c1, W.sample_size(rng)), ("shape", s2, c2, W.sample_size(rng))]
    wanted += _distractors(rng, int(rng.integers(1, 6)), forbidden={(c1, s1), (c2, s2)})
    scene = _scene(rng, wanted, shuffle=False)
    if scene is None:
        return None
    relation = _relation(scene["objects"][0]["box"], scene["objects"][1]["box"])
    if relation is None:
        return None
    return _single(ask_spatial(c1, s1, c2, s2),
                   relation, scene, [0, 1])


def gen_text(rng):
    n = int(rng.integers(2, 5))
    letters = [W.LETTERS[i] for i in rng.choice(len(W.LETTERS), n, replace=False)]
    colors = [W.COLOR_NAMES[i] for i in rng.choice(len(W.COLOR_NAMES), n, replace=False)]
    wanted = [("letter", l, c, int(rng.integers(26, 39))) for l, c in zip(letters, colors)]
    wanted += _distractors(rng, int(rng.integers(1, 6)))
    scene = _scene(rng, wanted)
    if scene is None:
        return None
    target = int(rng.integers(n))
    ids = _ids(scene, lambda o: o["kind"] == "letter" and o["name"] == letters[target])
    return _single(ask_text(colors[target]),
                   letters[target], scene, ids)


def gen_multi_image(rng):
    n = int(rng.integers(2, 5))
    shape, color = _pick(rng, W.SHAPES), _pick(rng, W.COLOR_NAMES)
    holder = int(rng.integers(n))
    others = [s for s in W.SHAPES if s != shape]
    scenes, evidence = [], []
    for i in range(n):
        wanted = _distractors(rng, int(rng.integers(2, 6)), shapes=others)
        if i == holder:
            wanted.append(("shape", shape, color, W.sample_size(rng, 0.6)))
        scene = _scene(rng, wanted)
        if scene is None:
            return None
        scenes.append(scene)
        if i == holder:
            ids = _ids(scene, lambda o: o["name"] == shape)
            evidence += [i * W.GRID * W.GRID + p for p in W.evidence_patches(scene, ids)]
    return {"question": ask_multi_image(shape),
            "answer": color, "scenes": scenes, "evidence": evidence}


def gen_video(rng):
    """Objects drift across a static background; the target shows up in only a few frames."""
    shape, color = _pick(rng, W.SHAPES), _pick(rng, W.COLOR_NAMES)
    present = bool(rng.integers(2))
    wanted = [("shape", _pick(rng, W.SHAPES, [shape]), color, W.sample_size(rng)),
              ("shape", shape, _pick(rng, W.COLOR_NAMES, [color]), W.sample_size(rng))]
    wanted += _distractors(rng, int(rng.integers(1, 5)), forbidden={(color, shape)})
    if present:
        wanted.append(("shape", shape, color, W.sample_size(rng, 0.5)))
    objects = W.place_objects(rng, wanted)
    if objects is None:
        return None
    bg = W.sample_background(rng)
    velocity = rng.uniform(-9, 9, size=(len(objects), 2))
    first = int(rng.integers(VIDEO_FRAMES))
    shown = range(first, min(VIDEO_FRAMES, first + int(rng.integers(1, 4))))
    scenes, evidence = [], []
    for t in range(VIDEO_FRAMES):
        frame_objects = []
        for obj, (vx, vy) in zip(objects, velocity):
            if present and obj is objects[-1] and t not in shown:
                continue
            x0, y0, x1, y1 = obj["box"]
            w, h = x1 - x0, y1 - y0
            nx = int(np.clip(round(x0 + vx * t), 0, W.IMAGE_SIZE - w))
            ny = int(np.clip(round(y0 + vy * t), 0, W.IMAGE_SIZE - h))
            frame_objects.append({**obj, "box": [nx, ny, nx + w, ny + h]})
        scene = {"bg": {**bg, "noise_seed": bg["seed"] + 1 + t}, "objects": frame_objects}
        scenes.append(scene)
        target = _ids(scene, lambda o: (o["color"], o["name"]) == (color, shape)) if present else \
            _ids(scene, lambda o: o["color"] == color or o["name"] == shape)
        evidence += [t * W.GRID * W.GRID + p for p in W.evidence_patches(scene, target)]
    return {"question": ask_video(color, shape),
            "answer": "yes" if present else "no", "scenes": scenes, "evidence": evidence}


# ----------------------------------------------------------------------------- training conversations

def _scene_questions(scene, rng):
    """Every question of the single-image families that has one true answer in this scene, as
    (question, answer, referents): one list of object indices per thing the question names."""
    objs = scene["objects"]
    shapes = [i for i, o in enumerate(objs) if o["kind"] == "shape"]
    letters = [i for i, o in enumerate(objs) if o["kind"] == "letter"]
    combo = {i: (objs[i]["color"], objs[i]["name"]) for i in shapes}
    combos = list(combo.values())
    present = sorted(set(combos))  # sorted: set order varies with PYTHONHASHSEED

    def near(c, s):  # what a yes/no question about (c, s) has to look at
        return [i for i in shapes if combo[i][0] == c or combo[i][1] == s]

    out = [(ask_exist(c, s), "yes", ([i for i in shapes if combo[i] == (c, s)],)) for c, s in present]
    absent = [(c, s) for c in W.COLOR_NAMES for s in W.SHAPES if (c, s) not in combos
              and any(c == pc or s == ps for pc, ps in combos)]  # hard negatives first
    out += [(ask_exist(c, s), "no", (near(c, s),))
            for c, s in (absent[i] for i in rng.permutation(len(absent))[:len(present)])]
    for shape in sorted(set(objs[i]["name"] for i in shapes)):
        same = [i for i in shapes if objs[i]["name"] == shape]
        if COUNT_RANGE[0] <= len(same) <= COUNT_RANGE[1]:
            out.append((ask_count(shape), str(len(same)), (same,)))
        if len(same) == 1:
            out.append((ask_color(shape), objs[same[0]]["color"], (same,)))
    unique = [i for i in shapes if combos.count(combo[i]) == 1]
    for a in unique:
        for b in unique:
            relation = _relation(objs[a]["box"], objs[b]["box"]) if objs[a]["name"] != objs[b]["name"] else None
            if relation:
                out.append((ask_spatial(*combo[a], *combo[b]), relation, ([a], [b])))
    letter_colors = [objs[i]["color"] for i in letters]
    out += [(ask_text(objs[i]["color"]), objs[i]["name"], ([i],))
            for i in letters if letter_colors.count(objs[i]["color"]) == 1]
    return out


def _patches(scenes, ids_per_scene) -> list[int]:
    """Evidence patches over concatenated images (image i's patch p is i*576 + p)."""
    return [i * W.GRID * W.GRID + p for i, (scene, ids) in enumerate(zip(scenes, ids_per_scene))
            for p in W.evidence_patches(scene, ids)]


def derived_questions(sample: dict, rng) -> list[tuple[str, str, tuple[list[int], ...]]]:
    """Further questions about a sample's images, for multi-turn training conversations (LLaVA's
    instruction data asks many questions per image); shuffled. Each is (question, answer, evidence),
    where evidence holds one patch list per referent the question names (two for spatial questions)."""
    scenes = sample["scenes"]
    if sample["family"] == "multi_image":
        shapes = [o["name"] for sc in scenes for o in sc["objects"]]
        out = [(ask_multi_image(o["name"]), o["color"],
                (_patches(scenes, [[k] if j == i else [] for j in range(len(scenes))]),))
               for i, sc in enumerate(scenes) for k, o in enumerate(sc["objects"]) if shapes.count(o["name"]) == 1]
    elif sample["family"] == "video":
        seen = sorted({(o["color"], o["name"]) for sc in scenes for o in sc["objects"]})
        absent = [(c, s) for c in W.COLOR_NAMES for s in W.SHAPES if (c, s) not in seen]

        def where(pred):
            return (_patches(scenes, [[k for k, o in enumerate(sc["objects"]) if pred(o)] for sc in scenes]),)

        out = [(ask_video(c, s), "yes", where(lambda o, c=c, s=s: (o["color"], o["name"]) == (c, s)))
               for c, s in seen]
        out += [(ask_video(c, s), "no", where(lambda o, c=c, s=s: o["color"] == c or o["name"] == s))
                for c, s in (absent[i] for i in rng.permutation(len(absent))[:len(seen)])]
    else:
        out = [(q, a, tuple(_patches(scenes, [ids]) for ids in referents))
               for q, a, referents in _scene_questions(scenes[0], rng)]
    out = [qa for qa in out if qa[0] != sample["question"]]
    return [out[i] for i in rng.permutation(len(out))]


def referent_evidence(sample: dict) -> tuple[list[int], ...]:
    """The sample's own evidence split by referent, as `derived_questions` gives it: a spatial
    question names two objects (the scene's first two), every other question one group."""
    if sample["family"] == "spatial":
        return tuple(_patches(sample["scenes"], [[k]]) for k in (0, 1))
    return (list(sample["evidence"]),)


GENERATORS = {
    "exist": gen_exist, "count": gen_count, "color": gen_color, "color_mc": gen_color_mc,
    "spatial": gen_spatial, "text": gen_text, "multi_image": gen_multi_image, "video": gen_video,
}


def make_sample(split: str, family: str, index: int) -> dict:
    """The index-th sample of a family in a split: deterministic, and disjoint across splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLITS)}")
    if family not in GENERATORS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    seq = np.random.SeedSequence([SPLITS[split], FAMILIES.index(family), index])
    rng = np.random.default_rng(seq)
    while True:  # a few layouts do not fit or are ambiguous: draw again from the same stream
        sample = GENERATORS[family](rng)
        if sample is not None:
            return {"id": f"{split}-{family}-{index}", "family": family, **sample}
