"""The synthetic world: determinism, ground truth, and that every answer is true of its scene."""

import hashlib

import numpy as np
import pytest

from harness.testbed import questions as Q
from harness.testbed import world as W


def _scene(*objects):
    return {"bg": {"seed": 1, "base": [60, 60, 60]}, "objects": list(objects)}


def _obj(name, color, box, kind="shape"):
    return {"kind": kind, "name": name, "color": color, "rgb": list(W.COLORS[color]), "box": list(box)}


def test_generation_and_rendering_are_deterministic():
    for family in Q.FAMILIES:
        a, b = Q.make_sample("test", family, 3), Q.make_sample("test", family, 3)
        assert a == b
        assert np.array_equal(W.render(a["scenes"][0]), W.render(b["scenes"][0]))
    assert Q.make_sample("test", "exist", 3) != Q.make_sample("test", "exist", 4)
    assert Q.make_sample("test", "exist", 3) != Q.make_sample("validation", "exist", 3)


def test_rendering_is_pinned():
    """A changed generator silently invalidates the committed data and the trained model: pin it."""
    pixels = W.render(Q.make_sample("test", "color", 0)["scenes"][0])
    assert pixels.shape == (336, 336, 3) and pixels.dtype == np.uint8
    assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == PINNED_RENDER


PINNED_RENDER = "5eb6f29e867fdac7"


def test_background_is_not_flat():
    img = W.render(_scene()).astype(float)
    patches = img.reshape(24, 14, 24, 14, 3).mean(axis=(1, 3))
    assert len({tuple(p.round(1)) for p in patches.reshape(-1, 3)}) == 576  # no two background tokens alike


def test_known_box_maps_to_its_patches():
    scene = _scene(_obj("square", "red", (28, 28, 56, 56)))
    assert W.evidence_patches(scene, [0]) == [2 * 24 + 2, 2 * 24 + 3, 3 * 24 + 2, 3 * 24 + 3]
    # One pixel into the next patch column counts: evidence is every patch holding a visible pixel.
    scene = _scene(_obj("square", "red", (28, 28, 57, 42)))
    assert W.evidence_patches(scene, [0]) == [50, 51, 52]


def test_occluded_pixels_are_not_evidence():
    below = _obj("square", "red", (0, 0, 28, 28))
    above = _obj("square", "blue", (14, 0, 28, 28))  # drawn later, hides the right half
    scene = _scene(below, above)
    assert W.evidence_patches(scene, [0]) == [0, 24]
    assert W.evidence_patches(scene, [1]) == [1, 25]


def test_patch_labels():
    scene = _scene(_obj("circle", "green", (140, 140, 196, 196)), _obj("T", "white", (0, 0, 20, 28), "letter"))
    labels = W.patch_labels(scene)
    centre = (168 // 14) * 24 + 168 // 14
    assert labels["kind"][centre] == W.KIND_CLASSES.index("circle")
    assert labels["color"][centre] == W.COLOR_CLASSES.index("green")
    assert labels["center"][centre] == 1 and labels["center"].sum() == 2
    assert labels["kind"][0] == W.KIND_CLASSES.index("T")
    assert labels["kind"][500] == 0 and labels["color"][500] == 0
    assert np.allclose(labels["position"][25], [1 / 23, 1 / 23])


def test_patch_labels_count_each_shapes_kind():
    """Every patch of a shape is labelled with how many shapes of its kind the scene holds; letters
    and background with 0 (the stage-1 target of --kind-count-weight)."""
    scene = _scene(_obj("circle", "green", (0, 0, 42, 42)), _obj("circle", "red", (140, 140, 196, 196)),
                   _obj("square", "blue", (280, 0, 322, 42)), _obj("T", "white", (0, 280, 20, 308), "letter"))
    labels = W.patch_labels(scene)
    count = labels["kind_count"]
    assert count[25] == 2 and count[(168 // 14) * 24 + 168 // 14] == 2  # both circles
    assert count[21] == 1  # the square
    assert labels["kind"][20 * 24] == W.KIND_CLASSES.index("T") and count[20 * 24] == 0  # the letter
    assert count[12 * 24 + 2] == 0  # background
    many = _scene(*[_obj("circle", "green", (x, 0, x + 28, 28)) for x in range(0, 336, 42)])
    assert W.patch_labels(many)["kind_count"].max() == W.MAX_KIND_COUNT  # 8 circles: "6 or more"


def test_patch_labels_give_each_patch_its_objects_size():
    scene = _scene(_obj("circle", "green", (0, 0, 28, 28)), _obj("square", "red", (140, 140, 196, 196)))
    labels = W.patch_labels(scene)
    owner = W.patch_owner(scene)
    size = labels["object_size"]
    assert size[0] == (owner == 0).sum() and size[(168 // 14) * 24 + 168 // 14] == (owner == 1).sum()
    assert (size[owner < 0] == 0).all() and (size[owner >= 0] > 0).all()
    assert size[0] < size[(168 // 14) * 24 + 168 // 14]  # the small circle, the large square


def _objects(sample):
    return [o for s in sample["scenes"] for o in s["objects"]]


@pytest.mark.parametrize("index", range(25))
def test_answers_are_true_of_their_scenes(index):
    s = Q.make_sample("test", "exist", index)
    color, shape = s["question"].split("Is there a ")[1].split(" in")[0].split()
    present = any((o["color"], o["name"]) == (color, shape) for o in _objects(s))
    assert s["answer"] == ("yes" if present else "no")

    s = Q.make_sample("test", "count", index)
    plural = s["question"].split("How many ")[1].split()[0]
    shape = {v: k for k, v in W.PLURAL.items()}[plural]
    assert s["answer"] == str(sum(o["name"] == shape for o in _objects(s)))

    s = Q.make_sample("test", "color", index)
    shape = s["question"].split("the ")[1].split("?")[0]
    assert [o["color"] for o in _objects(s) if o["name"] == shape] == [s["answer"]]

    s = Q.make_sample("test", "color_mc", index)
    assert s["choices"][s["answer_index"]] == s["answer"] and len(set(s["choices"])) == 4

    s = Q.make_sample("test", "spatial", index)
    a, b = s["scenes"][0]["objects"][:2]
    ax, bx = (a["box"][0] + a["box"][2]) / 2, (b["box"][0] + b["box"][2]) / 2
    ay, by = (a["box"][1] + a["box"][3]) / 2, (b["box"][1] + b["box"][3]) / 2
    expected = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}
    assert expected[s["answer"]]
    assert f"{a['color']} {a['name']}" in s["question"] and f"{b['color']} {b['name']}" in s["question"]

    s = Q.make_sample("test", "text", index)
    color = s["question"].split("written in ")[1].split("?")[0]
    assert [o["name"] for o in _objects(s) if o["kind"] == "letter" and o["color"] == color] == [s["answer"]]

    s = Q.make_sample("test", "multi_image", index)
    shape = s["question"].split("shows a ")[1].split(".")[0]
    holders = [i for i, sc in enumerate(s["scenes"]) if any(o["name"] == shape for o in sc["objects"])]
    assert len(holders) == 1 and 2 <= len(s["scenes"]) <= 4
    assert [o["color"] for o in s["scenes"][holders[0]]["objects"] if o["name"] == shape] == [s["answer"]]
    assert all(e // 576 == holders[0] for e in s["evidence"])

    s = Q.make_sample("test", "video", index)
    color, shape = s["question"].split("Does a ")[1].split(" appear")[0].split()
    frames = [any((o["color"], o["name"]) == (color, shape) for o in sc["objects"]) for sc in s["scenes"]]
    assert len(s["scenes"]) == Q.VIDEO_FRAMES
    assert (1 <= sum(frames) <= 3) if s["answer"] == "yes" else not any(frames)


@pytest.mark.parametrize("family", Q.FAMILIES)
def test_evidence_is_inside_the_images(family):
    for i in range(10):
        s = Q.make_sample("test", family, i)
        assert s["evidence"], "every question points at some patches"
        assert max(s["evidence"]) < 576 * len(s["scenes"]) and s["evidence"] == sorted(set(s["evidence"]))


def test_answers_are_balanced():
    yes = [Q.make_sample("test", "exist", i)["answer"] == "yes" for i in range(200)]
    assert 0.4 < np.mean(yes) < 0.6
    counts = {Q.make_sample("test", "count", i)["answer"] for i in range(100)}
    assert counts == {"1", "2", "3", "4"}


def test_unknown_family_or_split_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        Q.make_sample("test", "nope", 0)
    with pytest.raises(ValueError, match="unknown split"):
        Q.make_sample("dev", "exist", 0)


@pytest.mark.parametrize("family", Q.FAMILIES)
def test_derived_training_questions_are_true(family):
    """Training conversations ask more questions about the same images; each answer must hold."""
    for index in range(8):
        sample = Q.make_sample("train", family, index)
        for question, answer, evidence in Q.derived_questions(sample, np.random.default_rng(index)):
            objs = _objects(sample)
            # One patch list per referent: two for spatial questions, else one; empty only when the
            # answer is "no" and nothing in the images shares the asked colour or shape.
            assert len(evidence) == (2 if question.startswith("Where is") else 1)
            assert all(evidence) or answer == "no"
            assert all(0 <= p < 576 * len(sample["scenes"]) for group in evidence for p in group)
            if question.startswith("Is there a ") or question.startswith("Does a "):
                color, shape = question.split(" a ", 1)[1].split(" in the image")[0].split(" appear")[0].split()
                assert answer == ("yes" if any((o["color"], o["name"]) == (color, shape) for o in objs) else "no")
            elif question.startswith("How many "):
                shape = {v: k for k, v in W.PLURAL.items()}[question.split()[2]]
                assert answer == str(sum(o["name"] == shape for o in objs))
            elif question.startswith("What color is the ") or question.startswith("One of the images"):
                shape = question.split("the ")[1].split("?")[0] if "What color is the" in question[:20] \
                    else question.split("shows a ")[1].split(".")[0]
                assert [o["color"] for o in objs if o["name"] == shape] == [answer]
            elif question.startswith("Which letter"):
                color = question.split("written in ")[1].split("?")[0]
                assert [o["name"] for o in objs if o["kind"] == "letter" and o["color"] == color] == [answer]
            else:
                assert question.startswith("Where is the ") and answer in ("left", "right", "above", "below")


def test_training_conversations_do_not_depend_on_the_hash_seed():
    """Batches are a pure function of (stage, step), so a resumed run trains on the same data:
    nothing may follow the order of a set of strings, which PYTHONHASHSEED changes."""
    import os
    import subprocess
    import sys

    code = ("import json, numpy as np; from harness.testbed import questions as Q; "
            "print(json.dumps([Q.derived_questions(Q.make_sample('train', f, i), np.random.default_rng(i)) "
            "for f in Q.FAMILIES for i in range(3)]))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1


def test_derived_evidence_is_the_named_objects_patches():
    """A colour question's evidence is exactly the asked shape's patches; a spatial question's two
    referents are its two named objects, in the order the question names them."""
    checked = set()
    for index in range(20):
        sample = Q.make_sample("train", "spatial", index)
        scene = sample["scenes"][0]
        for question, answer, evidence in Q.derived_questions(sample, np.random.default_rng(index)):
            if question.startswith("What color is the "):
                shape = question[len("What color is the "):].split("?")[0]
                ids = [i for i, o in enumerate(scene["objects"]) if o["name"] == shape]
                assert evidence == (W.evidence_patches(scene, ids),)
                checked.add("color")
            if question.startswith("Where is the "):
                words = question.replace("?", "").split()
                (c1, s1), (c2, s2) = words[3:5], words[8:10]
                for group, (c, s) in zip(evidence, [(c1, s1), (c2, s2)]):
                    ids = [i for i, o in enumerate(scene["objects"]) if (o["color"], o["name"]) == (c, s)]
                    assert group == W.evidence_patches(scene, ids)
                checked.add("spatial")
    assert checked == {"color", "spatial"}


def test_referent_evidence_of_a_sample():
    spatial = Q.make_sample("test", "spatial", 0)
    first, second = Q.referent_evidence(spatial)
    assert sorted(set(first) | set(second)) == spatial["evidence"]
    assert first == W.evidence_patches(spatial["scenes"][0], [0])
    color = Q.make_sample("test", "color", 0)
    assert Q.referent_evidence(color) == (color["evidence"],)
