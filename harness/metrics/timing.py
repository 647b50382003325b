"""Latency of one cell, in a pass of its own (never the accuracy pass).

On one prompt (the task's first), after `warmup` untimed runs, each quantity is timed `repeats`
times and reported as the median, with the spread (min, max, interquartile range) kept for the store:

  vision_ms             the vision tower and projector alone (`get_image_features`)
  selection_ms          time inside the method's `select()` during one prefill
  prefill_ms            time to first token: vision, selection and the LLM prefill (one forward, cache on)
  decode_ms_per_token   in one generate of k + 1 tokens (min_new_tokens forcing the length), the time from
                        the first token to the last / k: each step's forward on the (pruned) cache and
                        generate's work per token, stamped as each token is chosen
  peak_memory_mb        peak memory generating the first token (the prefill) allocates above the model
                        and inputs: where a generate peaks, as decoding adds one token's activations
                        (see `peak_memory_mb`: CUDA allocator statistics, CPU profiler memory events)

On CUDA every timed region is synchronised. Device and attention backend are returned with the figures.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - started) * 1000)
    return times


class _Stamp(StoppingCriteria):
    """Never stops generation; notes the time each token is chosen (after the device finishes)."""

    def __init__(self, stamps: list[float], device):
        self.stamps, self.device = stamps, device

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _image_inputs(model, inputs) -> dict:
    """What the family's `get_image_features` takes of a processor's output (pixels; LLaVA-NeXT's and
    OneVision's image sizes, Qwen's grids)."""
    import inspect

    takes = inspect.signature(model.model.get_image_features).parameters
    return {name: value for name, value in inputs.items() if name in takes}


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "iqr": q[2] - q[0],
            "n": len(values)}


def paired_prefill_ms(model, inputs, pruning, repeats: int = 5, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Prefill times without and with `pruning`, alternating run by run so that drift in the
    machine's speed reaches both sides of the ratio alike."""
    device = next(model.parameters()).device

    def prefill(scope):
        with scope():
            model(**inputs, use_cache=True, logits_to_keep=1)

    plain, pruned = [], []
    with torch.no_grad():
        for i in range(warmup + repeats):
            for scope, out in ((contextlib.nullcontext, plain), (pruning, pruned)):
                _sync(device)
                started = time.perf_counter()
                prefill(scope)
                _sync(device)
                if i >= warmup:
                    out.append((time.perf_counter() - started) * 1000)
    return plain, pruned


def peak_memory_mb(fn, device) -> float:
    """Peak memory `fn` allocates above what is allocated when it starts (model and inputs excluded).

    CUDA: the allocator's peak statistic. CPU, which has no allocator statistics: the running sum of
    torch.profiler's memory events (each op's net allocation at its start, each free outside an op),
    so a buffer an op allocates and frees inside one kernel is not seen."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2 ** 20


def time_cell(model, inputs, pruning=None, repeats: int = 5, warmup: int = 1, decode_tokens: int = 4) -> dict:
    """Timings of `model` on `inputs` under `pruning` (a context-manager factory, or None)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    scope = pruning or contextlib.nullcontext
    device = next(model.parameters()).device
    gen = dict(do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    selection = []

    def prefill():
        with scope() as run:
            model(**inputs, use_cache=True, logits_to_keep=1)
        selection.append(1000 * run.selection_seconds if run is not None else 0.0)

    def generate(n, **kwargs):
        with scope():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen, **kwargs)

    decode = []

    def decode_run():
        stamps: list[float] = []
        generate(1 + decode_tokens, stopping_criteria=StoppingCriteriaList([_Stamp(stamps, device)]))
        decode.append((stamps[-1] - stamps[0]) * 1000 / decode_tokens)

    with torch.no_grad():
        image_inputs = _image_inputs(model, inputs)
        vision = _timed(lambda: model.model.get_image_features(**image_inputs), device, repeats, warmup)
        prefill_ms = _timed(prefill, device, repeats, warmup)
        _timed(decode_run, device, repeats, warmup)  # for its warm-up and repeats: each run notes its own figure
        peak = peak_memory_mb(lambda: generate(1), device)
    figures = {"vision_ms": spread(vision), "selection_ms": spread(selection[warmup:]), "prefill_ms": spread(prefill_ms),
               "decode_ms_per_token": spread(decode[warmup:])}
    return {"medians": {k: v["median"] for k, v in figures.items()} | {"peak_memory_mb": peak},
            "spread": figures, "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "attention": model.config._attn_implementation}
