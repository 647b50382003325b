"""The vision cache (harness.evaluation.vision_cache): vision-encoder calls computed once and served from memory,
bit for bit, with the pruning adapters' vision hooks replayed.

On the tiny random model of every family (harness.testbed.tiny_families; OneVision and Qwen with an image and a
video in one batch), with no pruning, `random` (reads the pixels at the vision tower, and for LLaVA-NeXT and
OneVision the projector's output), `fastv` (in the LLM) and `cls_attention` (the ViT feature layer) where the
family takes it: the first pass (miss) and the second (hit) generate exactly what the uncached model generates,
with the same kept tokens; a hit runs nothing inside the vision tower; afterwards the model has no attribute or
hook left; an entry larger than the byte bound is not kept and changes nothing. Then the mechanism on a toy model
(torch's hook order and signatures, hooks that change a call, bypasses), and the backend on the testbed's tiny
LLaVA: two passes over the same requests give identical records, the FLOPs count and timing pass never hit.
"""

import contextlib
import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from harness.adapters import FAMILIES, prune
from harness.evaluation import vision_cache as vc
from harness.testbed import questions as Q
from harness.testbed import tiny_families as T
from harness.testbed import world as W

from default_methods import default_params

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread

NEW_TOKENS = 3
BUDGET = 0.25
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")


def _methods(family):
    names = ["none", "random", "fastv"]
    if "cls_attention" not in FAMILIES[family].PruningRun.refusals:
        names.append("cls_attention")
    return names


CASES = [(f, m) for f in FAMILIES for m in _methods(f)]


def _chat(processor, kinds, text):
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _inputs(family, processor):
    """Two testbed prompts of different lengths and image sizes (left padding); for the families that take
    videos the second row is a 4-frame video instead, so one batch calls both vision functions."""
    samples = [Q.make_sample("test", kind, i) for i, kind in enumerate(("color", "spatial"))]
    images = [W.render_pil(s["scenes"][0]).resize(size) for s, size in zip(samples, ((336, 336), (224, 336)))]
    if family not in VIDEO_FAMILIES:
        texts = [_chat(processor, ["image"], s["question"]) for s in samples]
        return processor(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt")
    frames = [images[1].resize((84, 84)).rotate(90 * f) for f in range(4)]
    texts = [_chat(processor, ["image"], samples[0]["question"]), _chat(processor, ["video"], "what moves?")]
    return processor(images=[images[0]], videos=[frames], text=texts, padding=True, return_tensors="pt")


def _hooks(model):
    return [(n, list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()]


class _VisionCalls:
    """Counts forwards of the modules inside the vision tower outside the watched ones (whose hooks a hit
    replays) and their insides (a method may run the feature layer's parts itself): > 0 when the tower runs."""

    def __init__(self, model, adapter):
        root, watched = adapter.vision_module, adapter.vision_hooked_modules(model)
        inner = tuple(w + "." for w in watched if w != root)
        self.count = 0
        modules = model.get_submodule(root).named_modules(prefix=root)
        self.handles = [m.register_forward_hook(self._seen) for n, m in modules
                        if n not in watched and not n.startswith(inner)]

    def _seen(self, *args):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _caching(cache, model, adapter):
    return contextlib.nullcontext() if cache is None else cache.active(model, adapter.vision_hooked_modules(model))


def _generate(model, inputs, method, cache=None, adapter=None):
    """Tokens, scores and kept indices of greedy decoding under `method`, through `cache` when given."""
    pruning = contextlib.nullcontext() if method == "none" else prune(model, method, BUDGET, **default_params(method))
    with torch.inference_mode(), pruning as run:
        with _caching(cache, model, adapter):
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        kept = [] if run is None else [(r.row, r.tokens_in, r.kept.tolist()) for r in run.images]
    return SimpleNamespace(tokens=out.sequences, scores=torch.stack(out.scores, 1), kept=kept)


class Family:
    def __init__(self, name):
        self.model, self.processor = T.build(name)
        self.adapter = FAMILIES[name].PruningRun
        self.inputs = _inputs(name, self.processor)
        self.hooks = None
        self.refs = {}

    def ref(self, method):
        if method not in self.refs:
            self.refs[method] = _generate(self.model, self.inputs, method)
            self.hooks = _hooks(self.model)  # after a forward: transformers adds its own output-capture hooks then
        return self.refs[method]


@pytest.fixture(scope="module")
def families(one_thread):
    return functools.cache(Family)  # each family built once, when a test first asks for it


def _same(a, b):
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.scores, b.scores)
    assert a.kept == b.kept


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_a_miss_and_a_hit_give_the_uncached_outputs_and_a_hit_skips_the_vision_tower(families, family, method):
    fam = families(family)
    model, ref = fam.model, fam.ref(method)
    functions = 2 if family in VIDEO_FAMILIES else 1  # images, and the video: one call each
    cache = vc.VisionCache(2 ** 30)
    counter = _VisionCalls(model, fam.adapter)
    try:
        miss = _generate(model, fam.inputs, method, cache=cache, adapter=fam.adapter)
        ran = counter.count
        hit = _generate(model, fam.inputs, method, cache=cache, adapter=fam.adapter)
    finally:
        counter.remove()
    assert ran > 0 and counter.count == ran  # the second pass ran nothing inside the tower
    assert (cache.misses, cache.hits, cache.count) == (functions, functions, functions)
    _same(miss, ref)
    _same(hit, ref)
    if method != "none":
        assert ref.kept and all(len(kept) < tokens_in for _, tokens_in, kept in ref.kept)  # it pruned
    assert not {"get_image_features", "get_video_features"} & set(vars(model.model))
    assert _hooks(model) == fam.hooks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_entry_over_the_bound_is_not_kept_and_changes_nothing(families, family):
    fam = families(family)
    cache = vc.VisionCache(1024)  # smaller than any entry
    for _ in range(2):
        _same(_generate(fam.model, fam.inputs, "random", cache=cache, adapter=fam.adapter), fam.ref("random"))
    assert cache.count == 0 and cache.hits == 0 and cache.bytes == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_forward_hit_gives_the_uncached_logits(families, family):
    """The plain forward (how the backend scores continuations) reaches the vision functions from the inner
    model's forward, not from generate()."""
    fam = families(family)
    with torch.inference_mode():
        ref = fam.model(**fam.inputs).logits
        cache = vc.VisionCache(2 ** 30)
        for _ in range(2):
            with prune(fam.model, "random", BUDGET), _caching(cache, fam.model, fam.adapter):
                pruned = fam.model(**fam.inputs).logits
            with _caching(cache, fam.model, fam.adapter):
                assert torch.equal(fam.model(**fam.inputs).logits, ref)
    assert cache.hits == 3 * cache.misses and pruned.shape[1] < ref.shape[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_declared_modules_are_exactly_those_the_adapter_hooks_on_the_vision_side(families, family):
    fam = families(family)
    fam.ref("none")  # transformers' own hooks are in place (not the adapter's; the cache skips them)
    sides = (fam.adapter.vision_module, fam.adapter.projector_module)

    def hooked():
        return {n for n, m in fam.model.named_modules() if n.startswith(sides) and any(
            not vc._is_transformers_hook(h) for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))}

    before = hooked()
    with prune(fam.model, "random", BUDGET):
        assert hooked() - before == set(fam.adapter.vision_hooked_modules(fam.model))


# ------------------------------------------------------------------------------------------ the mechanism
class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.projector = nn.Linear(4, 3)

    def get_image_features(self, pixel_values, scale: float = 1.0, **kwargs):
        return {"pooler_output": [self.projector(self.tower(pixel_values) * scale)]}


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = _Inner()
        self.config = SimpleNamespace()
        self.eval()  # a model in training mode is never cached (dropout)

    PATHS = ("model.tower", "model.projector")


def _log_every_kind_of_hook(module, log):
    """One hook of each kind torch has, logging what it is called with."""
    return [module.register_forward_pre_hook(lambda m, a: log.append(("pre", a[0].sum().item()))),
            module.register_forward_pre_hook(lambda m, a, k: log.append(("pre_kw", a[0].sum().item(), sorted(k))),
                                             with_kwargs=True),
            module.register_forward_hook(lambda m, a, o: log.append(("post", a[0].sum().item(), o.sum().item()))),
            module.register_forward_hook(lambda m, a, k, o: log.append(("post_kw", sorted(k), o.sum().item())),
                                         with_kwargs=True)]


def test_a_hit_calls_every_kind_of_hook_as_torch_calls_it():
    """The replay reads torch's private hook dicts: a change of their layout or signatures fails here."""
    toy, x = _Toy(), torch.randn(2, 4)
    log = []
    handles = _log_every_kind_of_hook(toy.model.tower, log) + _log_every_kind_of_hook(toy.model.projector, log)
    cache = vc.VisionCache(2 ** 20)
    with torch.no_grad():
        real = toy.model.get_image_features(x)
        torch_calls, log[:] = list(log), []
        for _ in range(2):
            with cache.active(toy, _Toy.PATHS):
                out = toy.model.get_image_features(x, scale=1.0)
            assert torch.equal(out["pooler_output"][0], real["pooler_output"][0])
            assert log == torch_calls
            log.clear()
    for h in handles:
        h.remove()
    assert (cache.misses, cache.hits) == (1, 1)
    assert "get_image_features" not in vars(toy.model) and _hooks(toy) == [(n, [], []) for n, _ in toy.named_modules()]


def test_the_key_is_the_whole_call():
    toy, x = _Toy(), torch.randn(2, 4)
    cache = vc.VisionCache(2 ** 20)
    with torch.no_grad(), cache.active(toy, _Toy.PATHS):
        toy.model.get_image_features(x)
        toy.model.get_image_features(pixel_values=x)  # the same call, spelled otherwise: a hit
        toy.model.get_image_features(x, scale=2.0)
        toy.model.get_image_features(x.clone())  # the same bytes: a hit
        y = x.clone()
        y[0, 0] = torch.nextafter(y[0, 0], torch.tensor(10.0))
        toy.model.get_image_features(y)  # one value one ulp away
        toy.model.get_image_features(x[:1])  # another batch
        with torch.no_grad():
            toy.model.projector.weight[0, 0] += 1  # weights changed in place
        toy.model.get_image_features(x)
    assert (cache.misses, cache.hits) == (5, 2)


def test_a_hook_that_changes_a_call_keeps_it_out_and_one_that_would_on_a_replay_is_an_error():
    toy, x = _Toy(), torch.randn(2, 4)
    cache = vc.VisionCache(2 ** 20)
    changing = toy.model.projector.register_forward_hook(lambda m, a, o: o * 2)
    with torch.no_grad(), cache.active(toy, _Toy.PATHS):
        toy.model.get_image_features(x)
    changing.remove()
    assert cache.count == 0
    with torch.no_grad(), cache.active(toy, _Toy.PATHS):
        toy.model.get_image_features(x)
    changing = toy.model.tower.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    with torch.no_grad(), cache.active(toy, _Toy.PATHS), pytest.raises(vc.HookChangedVisionCall, match="model.tower"):
        toy.model.get_image_features(x)
    changing.remove()
    assert "get_image_features" not in vars(toy.model)
    with torch.no_grad(), cache.active(toy, _Toy.PATHS), pytest.raises(RuntimeError, match="mat1 and mat2"):
        toy.model.get_image_features(torch.randn(2, 5))  # a miss that fails leaves no hook and no entry
    assert cache.count == 1 and _hooks(toy) == [(n, [], []) for n, _ in toy.named_modules()]


def test_gradients_global_hooks_and_nesting_bypass_or_reuse():
    toy, x = _Toy(), torch.randn(2, 4)
    cache = vc.VisionCache(2 ** 20)
    with cache.active(toy, _Toy.PATHS):
        toy.model.get_image_features(x)  # gradients on: computed, not stored
        with torch.no_grad():
            handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
            try:
                toy.model.get_image_features(x)  # a global hook must see the real forward
            finally:
                handle.remove()
            with cache.active(toy, _Toy.PATHS):  # nested: the outer one serves
                toy.model.get_image_features(x)
            assert "get_image_features" in vars(toy.model)
    assert "get_image_features" not in vars(toy.model)
    assert (cache.misses, cache.hits, cache.count) == (1, 0, 1)
    with cache.active(toy, None):  # a family that declares nothing is not cached
        assert "get_image_features" not in vars(toy.model)


def test_a_bad_size_is_one_clear_error():
    from harness.errors import InputError

    assert vc.from_megabytes("0") is None and vc.from_megabytes(2).entries.max_bytes == 2 * 2 ** 20
    with pytest.raises(InputError, match="vision_cache_mb must be a non-negative integer"):
        vc.parse_cache_mb("lots")
    with pytest.raises(InputError, match="got -1"):
        vc.parse_cache_mb(-1)


# ------------------------------------------------------------------------------------------ the backend
@pytest.fixture(scope="module")
def lm(tiny_llava_dir, one_thread):
    from harness.evaluation.lmms_backend import VTPLlava

    return VTPLlava(pretrained=str(tiny_llava_dir), batch_size=2)


def _requests(lm, request_type, second):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    colours = ("red", "blue", "green")
    lm.task_dict = {"vc": {"test": [{"colours": [c] * (1 + i % 2)} for i, c in enumerate(colours)]}}

    def doc_to_visual(doc):
        return [Image.new("RGB", (336, 336), c) for c in doc["colours"]]

    return [Instance(request_type, (f"What colour is image {i}?", second, doc_to_visual, i, "vc", "test"), 0,
                     {"task": "vc", "doc_id": i, "repeats": 1}) for i in range(len(colours))]


def test_the_backend_gives_the_same_records_from_the_cache_and_never_caches_the_measurements(lm):
    import methods

    gen = _requests(lm, "generate_until", {"max_new_tokens": 3, "until": []})
    ll = _requests(lm, "loglikelihood", " blue")
    cache, lm._vision_cache = lm._vision_cache, None
    try:
        lm.configure(methods.get("random"), 64)
        lm.generate_until(gen), lm.loglikelihood(ll)
        uncached = lm.pop_records()
    finally:
        lm._vision_cache = cache
    passes = []
    for _ in range(2):
        lm.generate_until(gen), lm.loglikelihood(ll)
        passes.append((lm.pop_records(), cache.misses, cache.hits))
    (first, misses, hits), (second, misses_after, hits_after) = passes
    assert first == uncached and second == uncached
    # every call of the second pass is a hit (the first may hit too: generation and scoring batch alike)
    assert misses > 0 and misses_after == misses and hits_after == 2 * hits + misses
    lm.flops("vc")
    lm.timings("vc", repeats=1)
    assert (cache.misses, cache.hits) == (misses_after, hits_after)
    assert "get_image_features" not in vars(lm.model.model)
