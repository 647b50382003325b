"""The lmms-eval task folder tasks/testbed/: loading offline, committed data, splits, scoring.

tests/conftest.py makes everything offline and points the HF caches at a temporary folder before
lmms_eval/datasets get imported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also run from outside the repo root / without an install
    sys.path.insert(0, str(REPO))

from harness.testbed import data as D  # noqa: E402
from harness.testbed import questions as Q  # noqa: E402
from harness.testbed import world as W  # noqa: E402

N_TRAIN_CHECKED = 2000
N_VISUAL_CHECKED = 3


def _load_utils(path=D.TESTBED_TASKS_DIR / "utils.py"):
    """Load the task folder's utils.py by path, as lmms-eval's `!function` does."""
    spec = importlib.util.spec_from_file_location("testbed_task_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


U = _load_utils()


def _rows(family, split, data_dir=D.DATA_DIR):
    with open(Path(data_dir) / D.data_file(family, split), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _task_manager(include_path=D.TASKS_DIR):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path), include_defaults=False)


@pytest.fixture(scope="module")
def tasks():
    from lmms_eval.tasks import get_task_dict

    return get_task_dict(list(D.TASK_NAMES), _task_manager())


# ----------------------------------------------------------------------------- (a) loading


def test_task_names_match_the_folder():
    assert D.TASK_NAMES == [f"testbed_{f}" for f in Q.FAMILIES]
    assert sorted(p.stem for p in D.TESTBED_TASKS_DIR.glob("testbed_*.yaml")) == sorted(D.TASK_NAMES)
    manager = _task_manager()
    assert set(D.TASK_NAMES) | {D.GROUP_NAME} <= set(manager.all_tasks)
    assert "_default_template_yaml" not in manager.all_tasks


@pytest.mark.parametrize("family", Q.FAMILIES)
def test_task_loads_offline(tasks, family):
    task = tasks[D.task_name(family)]
    manifest = json.loads((D.DATA_DIR / D.MANIFEST).read_text())
    docs = list(task.test_docs())
    assert len(docs) == manifest["counts"]["test"] == 200
    assert len(task.dataset["validation"]) == manifest["counts"]["validation"] == 100
    assert task.config.test_split == "test"
    assert task.VERSION == 1.0
    assert [m["metric"] for m in task.config.metric_list] == ["accuracy"]
    if family == "color_mc":
        assert task.OUTPUT_TYPE == "multiple_choice"
    else:
        assert task.OUTPUT_TYPE == "generate_until"
        gen = task.config.generation_kwargs
        assert gen["max_new_tokens"] == 8 and gen["do_sample"] is False and gen["temperature"] == 0
        assert gen["until"] == ["</s>", "\n"]

    for doc in docs[:N_VISUAL_CHECKED]:
        sample = Q.make_sample("test", family, int(doc["id"].rsplit("-", 1)[1]))
        assert doc["id"] == sample["id"] and doc["family"] == family
        assert task.doc_to_text(doc) == sample["question"]
        if family == "color_mc":
            assert task.doc_to_choice(doc) == sample["choices"]
            assert task.doc_to_target(doc) == sample["answer_index"]
            assert sample["choices"][sample["answer_index"]] == sample["answer"]
        else:
            assert task.doc_to_target(doc) == sample["answer"]
        assert doc["evidence"] == sample["evidence"]

        visuals = task.doc_to_visual(doc)
        n = len(visuals)
        if family == "video":
            assert n == Q.VIDEO_FRAMES == 8
        elif family == "multi_image":
            assert 2 <= n <= 4
        else:
            assert n == 1
        assert n == len(sample["scenes"])
        for image, scene in zip(visuals, sample["scenes"]):
            assert image.mode == "RGB" and image.size == (336, 336)
        # Frames in order, pixels as the world renders the spec.
        assert np.array_equal(np.asarray(visuals[-1]), W.render(sample["scenes"][-1]))


def test_group_loads_offline():
    from lmms_eval.tasks import get_task_dict

    task_dict = get_task_dict([D.GROUP_NAME], _task_manager())
    assert len(task_dict) == 1
    (group, subtasks), = task_dict.items()
    assert group.group_name == D.GROUP_NAME
    assert list(subtasks) == D.TASK_NAMES
    assert all(len(t.test_docs()) == 200 for t in subtasks.values())


def test_corrupt_data_fails_task_loading_with_a_clear_error(tmp_path):
    copy = tmp_path / "tasks" / "testbed"
    shutil.copytree(D.TESTBED_TASKS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    bad = copy / "data" / D.data_file("count", "test")
    bad.write_bytes(bad.read_bytes().replace(b'"answer":"1"', b'"answer":"2"', 1))
    from lmms_eval.tasks import get_task_dict

    with pytest.raises(Exception) as info:
        get_task_dict(["testbed_count"], _task_manager(tmp_path / "tasks"))
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    message = " | ".join(chain)
    assert D.data_file("count", "test") in message and D.REGENERATE_HINT in message, message


# ----------------------------------------------------------------------------- (b) data files


def test_committed_data_verifies():
    manifest = D.verify(D.DATA_DIR)
    assert manifest["format_version"] == D.DATA_FORMAT_VERSION
    assert manifest["counts"] == {"test": 200, "validation": 100}
    expected = {D.data_file(f, s) for f in Q.FAMILIES for s in D.SPLITS}
    assert set(manifest["files"]) == expected
    assert {p.name for p in D.DATA_DIR.iterdir()} == expected | {D.MANIFEST}
    total = sum(p.stat().st_size for p in D.DATA_DIR.iterdir())
    assert total < 8e6, f"testbed data grew to {total / 1e6:.1f} MB"


def test_regenerating_gives_identical_files(tmp_path):
    manifest = D.write_task_data(tmp_path)
    committed = json.loads((D.DATA_DIR / D.MANIFEST).read_text())
    assert manifest == committed
    for name in list(committed["files"]) + [D.MANIFEST]:
        assert (tmp_path / name).read_bytes() == (D.DATA_DIR / name).read_bytes(), name
    D.verify(tmp_path)


def test_verify_names_missing_and_corrupt_files(tmp_path):
    shutil.copytree(D.DATA_DIR, tmp_path / "d")
    d = tmp_path / "d"
    D.verify(d)
    target = d / D.data_file("video", "validation")
    raw = bytearray(target.read_bytes())
    raw[100] ^= 1
    target.write_bytes(bytes(raw))
    with pytest.raises(D.DataIntegrityError, match=r"corrupt.*video_validation\.jsonl.*regenerate with `python -m harness\.testbed\.data"):
        D.verify(d)
    target.unlink()
    with pytest.raises(D.DataIntegrityError, match=r"missing.*video_validation\.jsonl.*regenerate with"):
        D.verify(d)
    (d / D.MANIFEST).unlink()
    with pytest.raises(D.DataIntegrityError, match=r"MANIFEST\.json"):
        D.verify(d)


def test_rows_have_the_documented_columns():
    for family in Q.FAMILIES:
        row = _rows(family, "test")[0]
        extra = ["choices", "answer_index"] if family == "color_mc" else []
        assert list(row) == ["id", "family", "question", "answer", "scenes", "evidence"] + extra
        assert isinstance(row["scenes"], str) and isinstance(json.loads(row["scenes"]), list)
        assert all(isinstance(p, int) for p in row["evidence"])


# ----------------------------------------------------------------------------- (c) splits


def _train_scenes(family, n, monkeypatch):
    """Scenes of the first n train samples, fast: evidence (about 2/3 of make_sample's time) is
    stubbed out. It draws no random numbers, so the scenes are unchanged (checked on a few)."""
    reference = [Q.make_sample("train", family, i)["scenes"] for i in range(3)]
    with monkeypatch.context() as m:
        m.setattr(W, "evidence_patches", lambda scene, object_ids: [])
        scenes = [D._dumps(Q.make_sample("train", family, i)["scenes"]) for i in range(n)]
    assert scenes[:3] == [D._dumps(s) for s in reference]
    return set(scenes)


@pytest.mark.parametrize("family", Q.FAMILIES)
def test_splits_are_disjoint(family, monkeypatch):
    test = [r["scenes"] for r in _rows(family, "test")]
    validation = [r["scenes"] for r in _rows(family, "validation")]
    assert len(set(test)) == len(test) and len(set(validation)) == len(validation)
    assert not set(test) & set(validation)
    train = _train_scenes(family, N_TRAIN_CHECKED, monkeypatch)
    assert not train & set(test), "test samples also in the first train samples"
    assert not train & set(validation), "validation samples also in the first train samples"


# ----------------------------------------------------------------------------- (d) scoring


@pytest.mark.parametrize("response, answer, expected", [
    ("yes", "yes", 1.0),
    ("no", "yes", 0.0),
    (" Yes.\n", "yes", 1.0),
    ("RED.", "red", 1.0),
    ("red.", "Red", 1.0),
    ("3", "3", 1.0),
    ("3 ", "4", 0.0),
    ("three", "3", 0.0),
    ("A", "A", 1.0),
    ("a.", "A", 1.0),
    ("", "yes", 0.0),
    ("yes, it is", "yes", 0.0),
    ("left", "right", 0.0),
])
def test_generation_scoring(response, answer, expected):
    doc = {"id": "x", "answer": answer}
    assert U.process_results(doc, [response]) == {"accuracy": expected}


def test_generation_scoring_of_real_docs():
    for family in Q.FAMILIES:
        if family == "color_mc":
            continue
        for row in _rows(family, "validation")[:5]:
            assert U.process_results(row, [f" {row['answer'].upper()}. "])["accuracy"] == 1.0
            assert U.process_results(row, ["purple-ish"])["accuracy"] == 0.0


def test_multiple_choice_takes_the_lowest_loss():
    doc = {"id": "x", "choices": ["red", "green", "blue", "cyan"], "answer_index": 2}
    assert U.process_results_mc(doc, [(3.0, False), (2.5, False), (0.7, True), (4.0, False)]) == {"accuracy": 1.0}
    # The highest value is NOT the prediction: these are losses, not log-likelihoods.
    assert U.process_results_mc(doc, [(0.1, True), (2.5, False), (9.0, False), (4.0, False)]) == {"accuracy": 0.0}
    # Negative log-likelihood-looking values still go by argmin; ties go to the first.
    assert U.mc_prediction([(-1.0, False), (-3.0, True), (-2.0, False), (0.0, False)]) == 1
    assert U.mc_prediction([(1.0, False), (0.5, True), (0.5, True), (2.0, False)]) == 1
    # A response-cache hit gives lists, numpy floats are fine too.
    assert U.process_results_mc(doc, [[3.0, False], [2.0, False], [np.float32(1.0), True], [5.0, False]]) == \
        {"accuracy": 1.0}
    for gold in range(4):
        losses = [(5.0, False)] * 4
        losses[gold] = (0.2, True)
        assert U.mc_prediction(losses) == gold


def test_multiple_choice_rejects_stringified_results():
    doc = {"id": "x", "choices": ["red", "green", "blue", "cyan"], "answer_index": 0}
    with pytest.raises(TypeError, match="unwrap_generation_output"):
        U.process_results_mc(doc, ["(0.5, True)", "(1.5, False)", "(2.5, False)", "(3.5, False)"])
    with pytest.raises(ValueError):
        U.process_results_mc(doc, [(0.5, True)])


def test_multiple_choice_scoring_of_real_docs():
    for row in _rows("color_mc", "validation")[:10]:
        losses = [(4.0 + i, False) for i in range(4)]
        losses[row["answer_index"]] = (0.5, True)
        assert U.process_results_mc(row, losses) == {"accuracy": 1.0}
        losses[row["answer_index"]] = (9.0, False)
        assert U.process_results_mc(row, losses) == {"accuracy": 0.0}
