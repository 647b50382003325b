"""The testbed's kept-token pictures: per document, each method's kept tokens at each budget drawn over
the scene, with the question's evidence patches outlined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .plots import plot_labels, pyplot, save_figure
from .ranking import REFERENCE, budget_order


def _overlay(image: np.ndarray, kept: np.ndarray, evidence: list[int]) -> np.ndarray:
    """The image with its dropped patches dimmed and the outline of its evidence patches drawn."""
    from harness.testbed.world import GRID, PATCH

    keep = np.zeros(GRID * GRID, bool)
    keep[kept] = True
    mask = np.kron(keep.reshape(GRID, GRID), np.ones((PATCH, PATCH), bool))
    out = image.astype(np.float32)
    out[~mask] *= 0.25
    inside = set(evidence)
    for p in inside:
        r, c = divmod(p, GRID)
        y, x = r * PATCH, c * PATCH
        if r == 0 or p - GRID not in inside:
            out[y, x:x + PATCH] = (255, 220, 0)
        if r == GRID - 1 or p + GRID not in inside:
            out[y + PATCH - 1, x:x + PATCH] = (255, 220, 0)
        if c == 0 or p - 1 not in inside:
            out[y:y + PATCH, x] = (255, 220, 0)
        if c == GRID - 1 or p + 1 not in inside:
            out[y:y + PATCH, x + PATCH - 1] = (255, 220, 0)
    return out.astype(np.uint8)


def overlay_docs(kept: dict, docs: dict, task: str, n: int) -> list[int]:
    """The first `n` documents of `task` that have testbed scenes and kept indices."""
    ids = sorted({k[4] for k in kept if k[3] == task})
    return [d for d in ids if "scenes" in docs.get((task, d), {})][:n]


def plot_kept_tokens(ranked: pd.DataFrame, kept: dict, doc: dict, task: str, doc_id: int, path: Path) -> None:
    """Rows: methods; columns: budgets; each the document's (first) image with the dropped tokens dimmed."""
    from harness.testbed.world import GRID, render

    plt = pyplot()
    scenes = json.loads(doc["scenes"]) if isinstance(doc["scenes"], str) else doc["scenes"]
    image = render(scenes[0])
    evidence = [p for p in doc.get("evidence") or [] if p < GRID * GRID]
    pruned = ranked[ranked["method"] != REFERENCE]
    labels = list(dict.fromkeys(plot_labels(pruned)))
    budgets = sorted(set(pruned["budget"]), key=budget_order)
    cell_of = {(label, b): (m, mo) for label, m, mo, b in zip(plot_labels(pruned), pruned["method"], pruned["model"],
                                                              pruned["budget"])}
    fig, axes = plt.subplots(len(labels), len(budgets), figsize=(2.1 * len(budgets), 2.3 * len(labels)),
                             squeeze=False)
    headed = set()  # columns whose budget is written above their first image
    for r, label in enumerate(labels):
        labelled = False
        for c, budget in enumerate(budgets):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            method, model = cell_of.get((label, budget), (None, None))
            images = kept.get((model, method, budget, task, doc_id))
            if not images or (len(images[0]) and images[0].max() >= GRID * GRID):
                ax.set_axis_off()
                continue
            ax.imshow(_overlay(image, images[0], evidence))
            hit = len(set(evidence) & set(images[0].tolist()))
            title = f"{len(images[0])} kept · evidence {hit}/{len(evidence)}"
            ax.set_title(title if c in headed else f"budget {budget}\n{title}", fontsize=7)
            headed.add(c)
            if not labelled:
                ax.set_ylabel(label, fontsize=8)
                labelled = True
    fig.suptitle(f"{task} #{doc_id}: {doc.get('question', '')} (answer: {doc.get('answer', '?')})\n"
                 "dimmed: dropped tokens; yellow outline: the question's evidence patches", fontsize=8)
    save_figure(fig, path)
