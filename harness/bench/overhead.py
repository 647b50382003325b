"""`harness bench --overhead`: the share of a `harness run` cell's wall time that is the harness's own.

For one pruned cell (a method at a budget, one generate_until task, its first `limit` test documents, a batch
size), side by side in one process on one device:

  harness_s   the wall time of `harness.evaluation.runner.run` computing that cell only (the unpruned reference
              is run first into the same folder, so the timed call finds it finished), no timing pass: model
              load, lmms-eval (task building, requests, scoring), the backend's records and measurements
              (kept indices, ΔIPR, first-token log-probs, teacher-forced NLL, operation counts), the outputs
  bare_s      the same documents' requests as lmms-eval builds them, each doc's visuals from the task's
              `doc_to_visual`, the backend's prompt and encoding, batched in the backend's order, and
              `model.generate` (greedy, the task's max_new_tokens) inside `harness.adapters.prune`: pruning
              is the model's work; nothing else. The model is already loaded (its load is `load_s`).
  harness_share          1 - bare_s / harness_s
  harness_share_no_load  1 - (bare_s + load_s) / harness_s: the share left when loading the model is not
                         counted as the harness's (any script has to load it)

The bare answers are checked against the cell's (`answers_match` of `documents`): the two paths did the same
generation, so the comparison is honest. Written to `overhead.csv` in the bench folder and printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.errors import InputError

DEFAULT_TASK = "testbed_color"
DEFAULT_LIMIT = 30


class OverheadError(InputError):
    """What `harness bench --overhead` cannot measure (a task that does not generate, an unknown task)."""


def _requests(task_name: str, limit: int):
    """The task's generate_until requests for its first `limit` documents, as lmms-eval builds them for the
    backend, and its documents (the split the requests index)."""
    from harness.evaluation import lmms_compat
    from harness.evaluation.task_sources import task_manager_for
    from harness.testbed.data import TASKS_DIR

    lmms_compat.apply()
    from lmms_eval.tasks import get_task_dict

    manager = task_manager_for([task_name], TASKS_DIR)
    tasks = get_task_dict([task_name], manager)
    task = tasks.get(task_name)
    if task is None or isinstance(task, dict) or task.OUTPUT_TYPE != "generate_until":
        raise OverheadError(f"--overhead measures one generate_until task; {task_name!r} is not one "
                            f"(e.g. {DEFAULT_TASK})")
    task.build_all_requests(limit=limit)
    reqs = [inst for inst in task.instances if inst.request_type == "generate_until"]
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    return reqs, docs


def bare_generate(lm, method, budget, reqs, docs) -> tuple[float, dict]:
    """Seconds to answer `reqs` with bare `model.generate` under `prune` (the backend `lm` only lends its model,
    prompt template and encoding), and the answers' token ids by doc id."""
    import torch

    from harness.adapters import prune

    model, eos, pad = lm.model, lm.eos_token_id, lm.pad_token_id
    started = time.perf_counter()
    prepared = []
    for req in reqs:
        ctx, _, doc_to_visual, doc_id = req.args[:4]
        visuals = [v.convert("RGB") for v in doc_to_visual(docs[doc_id])]
        prepared.append((lm.build_prompt(ctx, visuals), visuals, doc_id))
    max_new = int((reqs[0].args[1] or {}).get("max_new_tokens", lm.max_new_tokens)) if reqs else 0
    prepared.sort(key=lambda p: (-len(p[1]), -len(p[0])))  # the backend's batches: longest first
    answers = {}
    with torch.inference_mode():
        for start in range(0, len(prepared), lm.batch_size):
            chunk = prepared[start:start + lm.batch_size]
            inputs = lm._encode([p for p, _, _ in chunk], [v for _, v, _ in chunk], padding_side="left")
            with prune(model, method, budget, record_ipr=False, budget_scope=lm.budget_scope):
                out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=eos)
            for (_, _, doc_id), ids in zip(chunk, out[:, inputs["input_ids"].shape[1]:].tolist()):
                if eos in ids:
                    ids = ids[:ids.index(eos)]
                while ids and ids[-1] == pad:
                    ids.pop()
                answers[doc_id] = ids
    return time.perf_counter() - started, answers


def _cell_answers(out_dir: Path, method: str, budget_label: str, task: str) -> dict:
    """The harness cell's generated ids by doc id (its samples file's per-request records)."""
    answers = {}
    for line in (out_dir / "samples" / f"{method}_{budget_label}_{task}.jsonl").read_text().splitlines():
        sample = json.loads(line)
        answers[int(sample["doc_id"])] = sample["records"][0]["generated_ids"]
    return answers


def measure_overhead(method: str, budget, output: Path, task: str = DEFAULT_TASK, limit: int = DEFAULT_LIMIT,
                     batch_size: int = 8, model: str | None = None, device: str = "cpu", say=print) -> dict:
    """Time one pruned cell through `harness run` and through bare generation, side by side; write and return
    the row (module docstring)."""
    import io

    import pandas as pd

    import methods as registry
    from harness.evaluation import runner
    from harness.evaluation.lmms_backend import VTPLlava
    from harness.protocol import RunConfig

    if not registry.get(method).uses_budget:
        raise OverheadError(f"--overhead times a pruned cell: {method!r} takes no budget; name a pruning method "
                            f"in --methods (e.g. random)")
    if limit < 1:
        raise OverheadError(f"--limit must be at least 1, got {limit}")
    reqs, docs = _requests(task, limit)  # first: a task that cannot be measured stops before any run
    output.mkdir(parents=True, exist_ok=True)
    run_dir = output / "overhead_run"
    if (run_dir / "summary.csv").exists():  # an earlier measurement's: its finished pruned cell would not be timed
        import shutil

        shutil.rmtree(run_dir)
    config = {"tasks": task, "budgets": str(budget), "limit": limit, "batch_size": batch_size, "model": model,
              "device": device, "timing_repeats": 0, "output": str(run_dir)}
    log = io.StringIO()
    say(f"overhead: the unpruned reference cell first (not timed), into {run_dir}")
    runner.run(RunConfig(methods="none", **config), out=io.StringIO())
    say(f"overhead: timing `harness run` on {method}@{runner.budget_label(budget, method)} ({task}, {limit} docs, "
        f"batch {batch_size})")
    started = time.perf_counter()
    runner.run(RunConfig(methods=f"none,{method}", **config), out=log)
    harness_s = time.perf_counter() - started
    if log.getvalue().count(" ...") != 1:  # the reference was finished: the timed call computed one cell
        raise RuntimeError(f"the timed harness run computed other cells than {method}:\n{log.getvalue()}")

    started = time.perf_counter()
    lm = VTPLlava(pretrained=str(runner.resolve_model(model)), device=device, batch_size=batch_size,
                  image_cache_mb=0)
    load_s = time.perf_counter() - started
    lm.configure(method, budget)  # the budget as the backend checks it
    bare_s, answers = bare_generate(lm, lm.method, lm.budget, reqs, docs)

    cell = _cell_answers(run_dir, method, runner.budget_label(budget, method), task)
    row = {"method": method, "budget": budget, "task": task, "documents": len(answers), "batch": batch_size,
           "harness_s": harness_s, "bare_s": bare_s, "load_s": load_s, "harness_over_bare": harness_s / bare_s,
           "harness_share": 1 - bare_s / harness_s, "harness_share_no_load": 1 - (bare_s + load_s) / harness_s,
           "answers_match": sum(cell.get(d) == ids for d, ids in answers.items()), "device": _device_name(device)}
    pd.DataFrame([row]).to_csv(output / "overhead.csv", index=False)
    say(f"overhead on {row['device']}: harness run {harness_s:.2f}s, bare generate {bare_s:.2f}s (+ model load "
        f"{load_s:.2f}s), ratio {row['harness_over_bare']:.2f}, harness share {row['harness_share']:.3f} "
        f"({row['harness_share_no_load']:.3f} not counting the load); answers match on {row['answers_match']} of "
        f"{row['documents']} docs; wrote {output / 'overhead.csv'}")
    return row


def _device_name(device: str) -> str:
    import platform

    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"
