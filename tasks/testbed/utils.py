"""lmms-eval hooks for the testbed tasks (see _default_template_yaml).

lmms-eval loads this file by path, once per `!function` reference, so keep the import cheap. The
data checksums are verified at import (memoised in harness.testbed.data, so it hashes ~4 MB once
per process): a missing or hand-edited data file fails task loading with a message that names the
file and says how to regenerate it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    from harness.testbed import data as _data
except ImportError:  # lmms-eval run without the repo on sys.path: tasks/testbed/ -> repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from harness.testbed import data as _data
from harness.testbed.questions import normalize_answer
from harness.testbed.world import GRID, render_pil

_data.verify_cached(Path(__file__).resolve().parent / "data")


def scenes(doc) -> list:
    """The doc's scene specs: 1 image, 2-4 for multi_image, 8 video frames in order."""
    value = doc["scenes"]
    return json.loads(value) if isinstance(value, str) else value


def doc_to_visual(doc) -> list:
    """Render the scenes to 336x336 RGB PIL images (a video is the list of its frames)."""
    return [render_pil(scene).convert("RGB") for scene in scenes(doc)]


def doc_to_evidence(doc) -> list[tuple[int, int]]:
    """(image, visual token) pairs that hold the answer's evidence: the data stores image i's patch p
    of the 24 x 24 grid as i * 576 + p (harness.testbed.questions)."""
    evidence = doc.get("evidence") or []
    if isinstance(evidence, str):
        evidence = json.loads(evidence)
    per_image = GRID * GRID
    return [(int(e) // per_image, int(e) % per_image) for e in evidence]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    """The bare question: the model backend adds the chat template and image placeholders."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results) -> dict:
    """generate_until: normalised exact match of the first response against doc['answer']."""
    response = results[0] if results else ""
    if isinstance(response, (list, tuple)):  # defensive: some paths nest one level
        response = response[0] if response else ""
    return {"accuracy": float(normalize_answer(response) == normalize_answer(doc["answer"]))}


def _loss(result) -> float:
    if isinstance(result, (tuple, list)) and result:
        result = result[0]
    if isinstance(result, str):
        raise TypeError(
            f"multiple_choice result {result!r} is a string, not a (loss, is_greedy) pair: lmms-eval 0.7.3's "
            "unwrap_generation_output stringifies loglikelihood outputs; the model backend must patch it "
            "(LMMS_EVAL_NOTES.md section 4.7, pitfall 1)")
    return float(result)


def mc_prediction(results) -> int:
    """Index of the choice with the lowest loss (lmms-eval: loglikelihood returns a LOSS)."""
    losses = [_loss(r) for r in results]
    return min(range(len(losses)), key=losses.__getitem__)


def process_results_mc(doc, results) -> dict:
    """multiple_choice: `results` holds one (loss, is_greedy) per choice; predict argmin loss."""
    if len(results) != len(doc["choices"]):
        raise ValueError(f"{doc['id']}: {len(results)} results for {len(doc['choices'])} choices")
    return {"accuracy": float(mc_prediction(results) == int(doc["answer_index"]))}
