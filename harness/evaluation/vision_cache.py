"""Vision-encoder outputs, kept across the cells of a run.

`harness run` evaluates the same documents in the same batches once per (method, budget) cell, and the vision
encoder and projector (`get_image_features`, `get_video_features` of the inner model) do not depend on the
method: on the testbed they are about half of the evaluation time. So while `VisionCache.active(model, paths)`
is entered (the backend enters it around its evaluation forwards only, never around the FLOPs count or the
timing pass, which must measure the real vision work), those functions are shadowed by an instance attribute
that computes each distinct call once and serves it from memory afterwards; on exit the attribute is deleted
and the model is exactly as before.

Exactness. An entry is keyed by the whole call: every argument (a tensor by dtype, shape, strides, device and a
SHA-1 of its bytes; other values by repr), the function, and what else decides the floats (the weights' storage
and version counters, the attention implementations, the intra-op thread count, inference mode). The key is per
call, i.e. per batch, not per image: the floats of a batched forward may depend on the batch's composition, and
the backend forms the same batches in every cell, so a per-call key is exact by construction. A hit returns the
stored tensors (fresh containers, shared tensors: nothing downstream writes into them in place).
Both generation (`GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation` calls
`model.base_model.get_<modality>_features`, base_model being the inner model) and the plain forward (the inner
model's `forward` calls `self.get_<modality>_features`) go through the inner model's functions in every family
the harness takes (transformers 5.23: LLaVA, LLaVA-NeXT, OneVision, Qwen2-VL, Qwen2.5-VL), so a hit really skips
the vision tower. LLaVA-1.5 and LLaVA-NeXT have no `get_video_features`; only the functions a family has are
shadowed.

Pruning hooks. The adapters (harness.adapters, `PruningRun`) read vision-side tensors through hooks on vision
modules, which do not run on a hit. So each family declares those modules (`PruningRun.vision_hooked_modules`);
on a miss every call of each of them is recorded in order (its inputs at the pre-hook point, its output at the
forward-hook point) while the real function runs with every hook firing normally; on a hit the modules' current
pre-hooks and forward hooks are called with the recorded values in the same order, then the stored output is
returned. The recording hooks exist only during a miss, so they are never replayed. Not replayed either:
transformers' own output-capturing hooks (their effect is part of the stored output). Replayed hooks must
observe, not change: a hook that changed a module's inputs or output during a miss keeps that entry out of the
cache, and one that returns a value on a replay is an error (a stored output cannot honour it).

Bypassed (computed as usual, nothing stored): gradients enabled or the model in training mode, global module
hooks registered (a profiler, say: it must see the real work), a family that declares no modules, or a function
someone else has shadowed already.

Memory: tensors stay where they were produced (the model's device). An entry's size is the bytes of the distinct
storages its output and recorded calls hold; the cache keeps entries within its byte bound (`LRUBytes`: when
full, what a repeated pass will ask for again is kept rather than the newest call), and an entry larger than the
bound is not kept at all. A recorded input that is the function's own
argument (the pixels handed to the vision tower) is not kept: a hit passes its own, which has the same bytes (on
the testbed this halves an entry: 7 MiB for a batch of 8 images).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect

import torch

from harness.errors import InputError

from .image_cache import LRUBytes

#: The inner model's functions that run the vision encoder and projector (whichever the family has).
VISION_FUNCTIONS = ("get_image_features", "get_video_features")


class VisionCacheSizeError(InputError):
    """A `vision_cache_mb` that is not a non-negative integer."""


def parse_cache_mb(value) -> int:
    """The backend's `vision_cache_mb` model_arg (maybe a string from a model_args string) in MiB; 0 is off."""
    try:
        mb = int(str(value).strip())
    except ValueError:
        mb = -1
    if mb < 0:
        raise VisionCacheSizeError(f"vision_cache_mb must be a non-negative integer (MiB kept for vision-encoder "
                                   f"outputs across cells; 0 turns the cache off), got {value!r}")
    return mb


def from_megabytes(value) -> VisionCache | None:
    """The cache `vision_cache_mb` asks for (`parse_cache_mb`); None when it is 0."""
    mb = parse_cache_mb(value)
    return VisionCache(mb * 2 ** 20) if mb else None


class HookChangedVisionCall(RuntimeError):
    """A hook on a vision module returned a value while being replayed: a stored output cannot honour it."""


class VisionCache:
    """Vision-function outputs (with their vision modules' recorded calls), bounded in bytes; see the module
    docstring. `hits` and `misses` count the calls served from memory and computed."""

    def __init__(self, max_bytes: int):
        self.entries = LRUBytes(max_bytes)

    @property
    def hits(self) -> int:
        return self.entries.hits

    @property
    def misses(self) -> int:
        return self.entries.misses

    @property
    def bytes(self) -> int:
        return self.entries.bytes

    @property
    def count(self) -> int:
        """Entries kept."""
        return len(self.entries.items)

    @contextlib.contextmanager
    def active(self, model, watched_paths):
        """Serve `model.model`'s vision functions from the cache for the duration of the block. `watched_paths`:
        the modules (paths from `model`) whose hooks are replayed on a hit (the family's
        `PruningRun.vision_hooked_modules(model)`); None caches nothing. Re-entering it (nested) is a no-op."""
        inner = getattr(model, "model", None)
        shadowed = []
        if watched_paths is not None and inner is not None:
            modules = {path: model.get_submodule(path) for path in watched_paths}
            for name in VISION_FUNCTIONS:
                if name in vars(inner) or not callable(getattr(type(inner), name, None)):
                    continue  # shadowed already (ours, nested, or someone else's), or the family has none
                setattr(inner, name, self._cached(model, name, getattr(inner, name), modules))
                shadowed.append(name)
        try:
            yield self
        finally:
            for name in shadowed:
                delattr(inner, name)

    def _cached(self, model, name: str, original, modules: dict):
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() reads its parameters (inspect follows __wrapped__)
        def cached(*args, **kwargs):
            if torch.is_grad_enabled() or model.training or _global_hooks():
                return original(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return original(*args, **kwargs)  # the function's own error
            bound.apply_defaults()
            key = (name, _model_state(model), tuple(modules), _digest(bound.arguments))
            entry = self.entries.get(key)
            if entry is not None:
                output, calls = entry
                _replay(calls, modules, bound.arguments)
                return _fresh(output)
            output, calls, clean = _recording(modules, original, args, kwargs, bound.arguments)
            if clean:
                stored = _fresh(output)
                self.entries.put(key, (stored, calls), _storage_bytes((stored, calls)))
            return output

        return cached


# ---------------------------------------------------------------------------------------------- recording
class _Argument(str):
    """In a recorded call, the tensor that was the vision function's argument of this name: not kept (the pixels,
    most of an entry's bytes on the testbed); a hit has the same bytes in its own argument (they are in the key)."""


def _recording(modules: dict, original, args, kwargs, arguments: dict):
    """Run `original` with every call of the watched `modules` recorded: (output, calls, clean), calls being
    ("pre", path, args, kwargs, None) and ("post", path, args, kwargs, output) in the order torch reaches the
    hook points (tensors that are one of the function's `arguments` recorded as `_Argument`); clean is False
    when a hook changed a watched module's inputs or output."""
    names = {id(v): _Argument(k) for k, v in arguments.items() if isinstance(v, torch.Tensor)}

    def lean(a, kw):
        return (tuple(names.get(id(v), v) for v in a), {k: names.get(id(v), v) for k, v in kw.items()})

    calls: list[tuple] = []
    pending: dict[str, list] = {path: [] for path in modules}  # per module, its calls under way (nesting)
    clean = [True]

    def hooks_for(path):
        def record_pre(module, a, kw):  # first of the pre-hooks: the inputs as the caller gave them
            pending[path].append((a, kw))
            calls.append(("pre", path, *lean(a, kw), None))

        def check_pre(module, a, kw):  # last of them: nobody changed them
            given, given_kw = pending[path][-1]
            clean[0] &= a is given and kw is given_kw

        def record_post(module, a, kw, out):  # first of the forward hooks: the module's own output
            pending[path].pop()
            calls.append(("post", path, *lean(a, kw), _fresh(out)))
            pending[path].append(out)

        def check_post(module, a, kw, out):  # last of them: nobody replaced it
            clean[0] &= out is pending[path].pop()

        return record_pre, check_pre, record_post, check_post

    handles = []
    try:
        for path, module in modules.items():
            record_pre, check_pre, record_post, check_post = hooks_for(path)
            handles += [module.register_forward_pre_hook(record_pre, with_kwargs=True, prepend=True),
                        module.register_forward_pre_hook(check_pre, with_kwargs=True),
                        module.register_forward_hook(record_post, with_kwargs=True, prepend=True),
                        module.register_forward_hook(check_post, with_kwargs=True)]
        output = original(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return output, calls, clean[0]


def _replay(calls: list[tuple], modules: dict, arguments: dict) -> None:
    """Call the watched modules' current hooks with the recorded calls, in order, as torch would call them
    (`arguments`: the vision function's, for the tensors recorded as `_Argument`).

    torch keeps a module's hooks in private dicts: `_forward_pre_hooks` and `_forward_hooks` (id -> hook, in call
    order), and the ids registered `with_kwargs=True` in `_forward_pre_hooks_with_kwargs` and
    `_forward_hooks_with_kwargs`. tests/test_vision_cache.py checks replay against torch's own calls, so a
    change there fails a test rather than a run."""
    def full(value):
        return arguments[value] if isinstance(value, _Argument) else value

    for kind, path, args, kwargs, output in calls:
        module = modules[path]
        args, kwargs = tuple(full(v) for v in args), {k: full(v) for k, v in kwargs.items()}
        if kind == "pre":
            hooks, with_kwargs = module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs
        else:
            hooks, with_kwargs = module._forward_hooks, module._forward_hooks_with_kwargs
        for hook_id, hook in list(hooks.items()):
            if _is_transformers_hook(hook):
                continue
            given = (args, kwargs) if hook_id in with_kwargs else (args,)
            result = hook(module, *given) if kind == "pre" else hook(module, *given, output)
            if result is not None:
                raise HookChangedVisionCall(f"a {kind}-forward hook on {path} returned a value while its call was "
                                            "replayed from the vision cache; hooks on vision modules must only "
                                            "observe (or run with vision_cache_mb=0)")


def _is_transformers_hook(hook) -> bool:
    """transformers' output-capturing hooks (utils/output_capturing.py): part of the computation being cached."""
    function = getattr(hook, "func", hook)  # a functools.partial
    return (getattr(function, "__module__", None) or "").startswith("transformers.")


def _global_hooks() -> bool:
    """Module hooks registered for every module (torch's private globals): they must see the real forward."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks)


# ---------------------------------------------------------------------------------------------- values
def _model_state(model) -> tuple:
    """What besides the arguments decides the vision function's floats: the weights (storage and in-place
    version of every parameter and buffer), the attention implementations and the intra-op threads."""
    weights = tuple((t.data_ptr(), t._version, str(t.dtype)) for t in (*model.parameters(), *model.buffers()))
    config = model.config
    attention = tuple(getattr(c, "_attn_implementation", None)
                      for c in (config, getattr(config, "vision_config", None), getattr(config, "text_config", None)))
    return type(model).__name__, weights, attention, torch.get_num_threads(), torch.is_inference_mode_enabled()


def _digest(value):
    """A hashable, exact identity of a value: tensors by dtype, shape, strides, device and a hash of their bytes;
    containers element by element; anything else by repr."""
    if isinstance(value, torch.Tensor):
        data = value.detach().contiguous().reshape(-1).cpu()
        raw = data.view(torch.uint8).numpy() if data.numel() else b""
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.stride()), str(value.device),
                hashlib.sha1(raw, usedforsecurity=False).hexdigest())  # sha1: the fastest here
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_digest(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _digest(v)) for k, v in value.items())))
    return repr(value)


def _fresh(value):
    """`value` with fresh containers (lists, tuples, dicts, ModelOutputs) around the same tensors: what a caller
    does to the containers cannot reach the cache's copy."""
    if isinstance(value, dict):  # ModelOutput too (an OrderedDict): its keys and attributes stay in step
        new = copy.copy(value)
        for key, item in value.items():
            new[key] = _fresh(item)
        return new
    if isinstance(value, tuple):
        items = [_fresh(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    return value


def _storage_bytes(value) -> int:
    """Bytes of the distinct tensor storages `value` holds (views of one storage count once)."""
    seen: dict[tuple, int] = {}

    def visit(item):
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[(str(item.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(item, dict):
            for v in item.values():
                visit(v)
        elif isinstance(item, (list, tuple)):
            for v in item:
                visit(v)

    visit(value)
    return sum(seen.values())
