"""Multi-stage in-LLM pruning in the shared adapter, and the `lvpruning` method (methods/lvpruning.py) with its
module files (methods/lvpruning_modules.py), on the tiny families (harness.testbed.tiny_families).

- A multi-stage method that reads the last token's attention (PyramidDrop-style, test-local) equals its kept
  tokens fed by hand, and what it chose at each stage is the top of the reference (eager) attention row of the
  sequence that stage saw. LVPruning equals its kept tokens fed by hand where test_families.py does not go:
  renumbered positions, a video, several images in a prompt, a budget per view, a row without images.
- `stage_counts`: the schedules' counts; a budget of every token keeps every token at every stage.
- Each stage chooses among the tokens the previous one kept, from the hidden states entering its layer; its text
  features are the prompt's text tokens' hidden states there.
- The KV cache of each layer holds what that layer saw.
- Module files that are missing, unreadable, of another model or hand-edited: one clear error before any forward.
"""

import functools
from dataclasses import dataclass, field
from itertools import pairwise
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from PIL import Image

import methods
from harness.adapters import FAMILIES, prune
from harness.budget import tokens_to_keep
from harness.testbed import model as M
from harness.testbed import questions as Q
from harness.testbed import tiny_families as T
from harness.testbed import world as W
from methods.base import Method, VisualContext
from methods.lvpruning_modules import ModuleFileError

from default_methods import lvpruning_modules
from test_families import (NEW_TOKENS, _by_hand, _check_equivalence, _generate, _hooks, _inputs, _pruned, _valids,
                           _visual)

BUDGET = 0.25


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


class Tiny:
    """One family's tiny model, a left-padded batch of three prompts and its unpruned generation."""

    def __init__(self, name):
        self.name = name
        self.model, self.processor = T.build(name)
        self.adapter = FAMILIES[name].PruningRun
        self.batch = _inputs(self.processor, range(3))
        self.ref = _generate(self.model, self.batch)
        self.hooks = _hooks(self.model)

    @property
    def lm(self):
        return self.model.model.language_model


@pytest.fixture(scope="module")
def families():
    return functools.cache(Tiny)  # each family built once, when a test first asks for it


@pytest.fixture(scope="module")
def qwen(families):
    return families("qwen2_vl")  # 3 decoder layers, 64 wide: room for two stages after layer 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("lvpruning")


@pytest.fixture(scope="module")
def qwen_late(qwen, folder):
    """Modules before layers 1 and 2 of the tiny Qwen2-VL: layer 0 sees every token."""
    return lvpruning_modules(folder / "qwen-1-2.safetensors", qwen.model.config, layers=(1, 2), targets=(0.5, 0.25))


@dataclass
class PyramidRows(Method):
    """Test-local, unregistered: PyramidDrop-style stages that each keep the top of the last token's attention
    row (read at layer K_s - 1's input); each stage halves what is left above the budget."""

    position_policy: str = "original"
    layers: tuple = (1, 2)
    seen: list = field(default_factory=list, repr=False, compare=False)  # (ctx, k) of every select

    stage: ClassVar[str] = "in_llm"
    needs_attention_row: ClassVar[bool] = True

    def stage_layers(self) -> tuple:
        return tuple(self.layers)

    def stage_counts(self, n: int, k: int) -> list[int]:
        counts, left = [], n
        for _ in self.layers[:-1]:
            left = max(k, (left + k) // 2)
            counts.append(left)
        return counts + [k]

    def score(self, ctx: VisualContext) -> torch.Tensor:
        return ctx.attention_row

    def select(self, ctx: VisualContext, k: int):
        self.seen.append((ctx, k))
        return super().select(ctx, k)


def _recording(method):
    """`method` with every (ctx, k) its select sees appended to the returned list."""
    seen, select = [], method.select

    def recorded(ctx, k):
        seen.append((ctx, k))
        return select(ctx, k)

    method.select = recorded
    return seen


def _eager_rows(tiny, run, layers):
    """{K_s - 1: (B, T_s-1) the last token's attention (heads averaged) at layer K_s - 1 in the prefill}, from
    eager attention over the sequence that layer saw (stage s-1's columns, or all), fed by hand."""
    model, rows, handles = tiny.model, {}, []
    for k in layers:
        def grab(module, args, output, layer=k - 1):
            if layer not in rows:  # the prefill (the first call)
                rows[layer] = output[1][:, :, -1].mean(1)
        handles.append(tiny.lm.layers[k - 1].self_attn.register_forward_hook(grab))
    model.set_attn_implementation("eager")
    try:
        stages = list(zip(run.stage_columns, _valids(run, tiny.batch["input_ids"].shape[1],
                                                      tiny.adapter.visual_tokens_per_row(model, tiny.batch))))
        _by_hand(model, tiny.ref.calls[0], stages, run.policy, layers, steps=1)
    finally:
        model.set_attn_implementation("sdpa")
        for h in handles:
            h.remove()
    return rows


# ------------------------------------------------------------------------------------------ (a) attention rows
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_a_multi_stage_attention_row_method_equals_its_kept_tokens_by_hand_and_chooses_the_top_of_the_row(
        families, name):
    tiny = families(name)
    method = PyramidRows()
    run = _pruned(tiny.model, method, {}, tiny.batch, budget=BUDGET)
    assert run.stages == (1, 2) and len(run.stage_columns) == 2
    _check_equivalence(tiny, "pyramid", run, tiny.ref.calls[0], tiny.batch)
    # Each stage chose the top of the reference row of the sequence it saw, among the tokens still present.
    ids = tiny.batch["input_ids"]
    visual = _visual(tiny.model, ids)
    valids = _valids(run, ids.shape[1], tiny.adapter.visual_tokens_per_row(tiny.model, tiny.batch))
    rows = _eager_rows(tiny, run, run.stages)
    assert [ctx.stage for ctx, _ in method.seen] == [0, 0, 0, 1, 1, 1]
    before = [(torch.arange(ids.shape[1]).expand(len(ids), -1), torch.ones_like(ids, dtype=torch.bool))]
    for s, k in enumerate(run.stages):
        columns, valid = before[s] if s == 0 else (run.stage_columns[s - 1], valids[s - 1])
        for b in range(len(ids)):
            present = valid[b] & visual[b, columns[b]]  # the image's tokens this stage chooses among
            reference = rows[k - 1][b][present]
            ctx, count = method.seen[3 * s + b]
            assert ctx.attention_row.shape == reference.shape
            assert torch.allclose(ctx.attention_row, reference, atol=1e-5, rtol=0)
            # the tokens kept are a top-`count` set of the reference row (up to float noise at the cutoff)
            now = run.stage_columns[s][b][valids[s][b]]
            chosen = torch.isin(columns[b][present], now)
            assert count == run.images[b].stage_tokens[s] == int(chosen.sum()), (s, b)
            assert float(reference[chosen].min()) >= float(reference[~chosen].max()) - 1e-6, (s, b)
    assert [r.stage_tokens for r in run.images] == [[max(k, (r.tokens_in + k) // 2), k] for r in run.images
                                                     for k in [tokens_to_keep(BUDGET, r.tokens_in)]]


def test_the_scoring_query_given_as_a_full_column_is_found_in_the_pruned_sequence(qwen):
    """A caller's query position (a full-sequence column: the last prompt token) is mapped into the sequence a
    later stage sees: the same choices as each row's last token found there."""
    def run(query):
        with prune(qwen.model, PyramidRows(), BUDGET) as r:
            r.query_positions = query
            out = _generate(qwen.model, qwen.batch)
            return out, [c.clone() for c in r.stage_columns()], [x.kept.clone() for x in r.images]

    plain, full_column = run(None), run(torch.full((3,), qwen.batch["input_ids"].shape[1] - 1))
    assert torch.equal(plain[0].tokens, full_column[0].tokens) and torch.equal(plain[0].scores, full_column[0].scores)
    assert all(torch.equal(a, b) for a, b in zip(plain[1] + plain[2], full_column[1] + full_column[2]))


# ------------------------------------------------------------------------------------------ by hand, more
@pytest.mark.parametrize("name", ["llava", "llava_next", "llava_onevision"])
def test_lvpruning_with_renumbered_positions_equals_its_kept_tokens_by_hand(families, folder, name):
    """Renumbered positions (1-D RoPE families): each stage's layers see its kept tokens numbered contiguously,
    and a new token follows each stage's own numbering."""
    tiny = families(name)
    path = lvpruning_modules(folder / f"{name}.safetensors", tiny.model.config)
    run = _pruned(tiny.model, "lvpruning", {"path": str(path), "position_policy": "renumber"}, tiny.batch)
    assert run.policy == "renumber" and run.stages == (0, 1)
    _check_equivalence(tiny, "lvpruning", run, tiny.ref.calls[0], tiny.batch)


def test_lvpruning_on_a_video_and_an_image_equals_its_kept_tokens_by_hand(families, folder):
    """OneVision: a 4-frame video beside an image prompt (left padding); every frame gets the budget at every
    stage."""
    tiny = families("llava_onevision")
    processor = tiny.processor
    frames = [Image.new("RGB", (84, 84), (50 * f, 200 - 40 * f, 90)) for f in range(4)]

    def prompt(kind, text):
        content = [{"type": kind}, {"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    inputs = processor(text=[prompt("video", "what moves?"), prompt("image", "what is in the picture here?")],
                       images=[[], [Image.new("RGB", (336, 336), "red")]], videos=[frames], return_tensors="pt",
                       padding=True)
    assert (inputs["attention_mask"] == 0).any()
    ref = _generate(tiny.model, inputs)
    path = lvpruning_modules(folder / "onevision-video.safetensors", tiny.model.config)
    run = _pruned(tiny.model, "lvpruning", {"path": str(path)}, inputs, budget=0.5)
    _check_equivalence(tiny, "lvpruning", run, ref.calls[0], inputs)
    video = next(r for r in run.images if r.row == 0)
    per_frame = video.tokens_in // 4
    assert video.stage_tokens == [4 * min(per_frame, tokens_to_keep(0.5, per_frame) + round(0.25 * per_frame)),
                                  4 * tokens_to_keep(0.5, per_frame)]


def test_lvpruning_with_several_images_in_a_prompt_equals_its_kept_tokens_by_hand(families, folder):
    """LLaVA: two images in one prompt beside a one-image prompt: each image keeps its stage counts, and the rows'
    stage lengths differ by what their images dropped."""
    tiny = families("llava")
    samples = [Q.make_sample("test", "multi_image", 0), Q.make_sample("test", "color", 1)]
    inputs = tiny.processor(images=[[W.render_pil(sc) for sc in s["scenes"]] for s in samples],
                            text=[M.format_prompt(s["question"], len(s["scenes"])) for s in samples],
                            padding=True, return_tensors="pt")
    assert [len(s["scenes"]) for s in samples] == [2, 1] and (inputs["attention_mask"] == 0).any()
    ref = _generate(tiny.model, inputs)
    path = lvpruning_modules(folder / "llava-multi.safetensors", tiny.model.config)
    run = _pruned(tiny.model, "lvpruning", {"path": str(path)}, inputs, budget=32)
    assert [r.row for r in run.images] == [0, 0, 1]
    assert [r.stage_tokens for r in run.images] == [[32 + 144, 32]] * 3  # shift: k + (0.5 - 0.25) * 576
    # a row keeps its own left padding: the one-image row, which drops least, sets each stage's width
    length = inputs["input_ids"].shape[1]
    assert [c.shape[1] for c in run.stage_columns] == [length - (576 - 176), length - (576 - 32)]
    _check_equivalence(tiny, "lvpruning", run, ref.calls[0], inputs)


def test_lvpruning_with_a_budget_per_part_equals_its_kept_tokens_by_hand(families, folder):
    """LLaVA-NeXT, scope "part": each view (base and crops) gets the budget and the stage counts on its own."""
    tiny = families("llava_next")
    path = lvpruning_modules(folder / "llava-next-part.safetensors", tiny.model.config)
    run = _pruned(tiny.model, "lvpruning", {"path": str(path)}, tiny.batch, budget=4, budget_scope="part")
    for r in run.images:  # 4 a view (scope "image" would keep 4 an image), more after the first stage
        assert r.stage_tokens[-1] % 4 == 0 and r.stage_tokens[-1] > 4 and r.stage_tokens[0] > r.stage_tokens[1]
    _check_equivalence(tiny, "lvpruning", run, tiny.ref.calls[0], tiny.batch)


def test_lvpruning_beside_a_prompt_without_images_equals_its_kept_tokens_by_hand(families, folder):
    """OneVision: a text-only row in the batch loses nothing at any stage."""
    tiny = families("llava_onevision")
    processor = tiny.processor

    def prompt(kinds, text):
        content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    inputs = processor(text=[prompt(["image"], "what?"), prompt([], "is there no picture at all?")],
                       images=[[Image.new("RGB", (336, 336), "red")], []], return_tensors="pt", padding=True)
    ref = _generate(tiny.model, inputs)
    path = lvpruning_modules(folder / "onevision-text.safetensors", tiny.model.config)
    run = _pruned(tiny.model, "lvpruning", {"path": str(path)}, inputs)
    assert [r.row for r in run.images] == [0]
    _check_equivalence(tiny, "lvpruning", run, ref.calls[0], inputs)


# ------------------------------------------------------------------------------------------ (b) stage counts
def test_stage_counts_follow_the_schedule_and_end_at_the_budget(tmp_path):
    config = SimpleNamespace(hidden_size=16, num_hidden_layers=3)
    path = lvpruning_modules(tmp_path / "m.safetensors", config)  # targets 0.5, 0.3, 0.1
    shift = methods.get("lvpruning", path=str(path))
    scale = methods.get("lvpruning", path=str(path), schedule="scale")
    assert shift.schedule == "shift" and shift.stage_layers() == (0, 1, 2)
    # shift: k + (t_s - t_last) * N, capped at N
    assert shift.stage_counts(576, 64) == [64 + 230, 64 + 115, 64]
    assert shift.stage_counts(576, 400) == [576, 400 + 115, 400]
    assert shift.stage_counts(64, 1) == [1 + 26, 1 + 13, 1]
    # scale: k * t_s / t_last, capped at N
    assert scale.stage_counts(576, 64) == [320, 192, 64]
    assert scale.stage_counts(576, 100) == [500, 300, 100]
    assert scale.stage_counts(576, 150) == [576, 450, 150]
    for method in (shift, scale):
        assert method.stage_counts(576, 576) == [576, 576, 576]  # every token, at every stage
        for n in (9, 64, 576):
            for k in range(1, n + 1):
                counts = method.stage_counts(n, k)
                assert counts[-1] == k and all(n >= a >= b for a, b in pairwise(counts))


def test_a_budget_of_every_token_keeps_every_token_at_every_stage(qwen, folder):
    path = lvpruning_modules(folder / "qwen-all.safetensors", qwen.model.config)
    for schedule in ("shift", "scale"):
        run = _pruned(qwen.model, "lvpruning", {"path": str(path), "schedule": schedule}, qwen.batch, budget=1.0)
        assert run.stages == (0, 1, 2)
        assert [r.stage_tokens for r in run.images] == [[r.tokens_in] * 3 for r in run.images]
        assert torch.equal(run.tokens, qwen.ref.tokens)
        assert torch.allclose(run.scores, qwen.ref.scores, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ (c) what a stage sees
@pytest.mark.parametrize("layers", [(0, 1, 2), (1, 2)])
def test_each_stage_chooses_among_the_previous_stages_tokens_from_the_hidden_states_entering_its_layer(
        qwen, folder, layers):
    path = lvpruning_modules(folder / f"qwen-{'-'.join(map(str, layers))}.safetensors", qwen.model.config,
                             layers=layers, targets=(0.5, 0.3, 0.1)[-len(layers):])
    method = methods.get("lvpruning", path=str(path))
    seen = _recording(method)
    entering = {}  # layer K -> the prefill's hidden states entering it (before the adapter gathers)

    def keep(layer, hidden):
        entering.setdefault(layer, hidden.detach().clone())

    lm = qwen.lm
    handles = [lm.register_forward_pre_hook(lambda m, a, k: keep(0, k["inputs_embeds"]), with_kwargs=True)]
    handles += [lm.layers[k - 1].register_forward_hook(
        lambda m, a, out, k=k: keep(k, out[0] if isinstance(out, tuple) else out)) for k in layers if k > 0]
    try:
        run = _pruned(qwen.model, method, {}, qwen.batch)
    finally:
        for h in handles:
            h.remove()
    ids = qwen.batch["input_ids"]
    batch, length = ids.shape
    visual = _visual(qwen.model, ids)
    valids = _valids(run, length, qwen.adapter.visual_tokens_per_row(qwen.model, qwen.batch))
    real = qwen.batch["attention_mask"].bool()
    assert [ctx.stage for ctx, _ in seen] == [s for s in range(len(layers)) for _ in range(batch)]
    for s, k in enumerate(layers):
        columns, valid = ((torch.arange(length).expand(batch, -1), torch.ones_like(real)) if s == 0 else
                          (run.stage_columns[s - 1], valids[s - 1]))
        for b in range(batch):
            ctx, count = seen[s * batch + b]
            record = run.images[b]
            assert count == record.stage_tokens[s]
            assert ctx.num_tokens == (record.tokens_in if s == 0 else record.stage_tokens[s - 1])
            assert ctx.grid[0] * ctx.grid[1] == ctx.num_tokens
            hidden = entering[k][b]  # in the sequence the previous stage left
            present = valid[b] & visual[b, columns[b]]
            assert torch.equal(ctx.features, hidden[present])  # the image's tokens still present, in order
            # the prompt's text: every non-visual, non-padding token up to the last prompt token (the last column)
            text = valid[b] & ~visual[b, columns[b]] & real[b, columns[b]]
            assert len(ctx.text_features) == int((~visual[b] & real[b]).sum())
            assert torch.equal(ctx.text_features, hidden[text])


# ------------------------------------------------------------------------------------------ (d) the KV cache
def test_each_layers_cache_holds_the_tokens_that_layer_saw_and_the_generated_ones(qwen, qwen_late):
    def caches():
        with torch.no_grad():
            out = qwen.model.generate(**qwen.batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                                      return_dict_in_generate=True, output_scores=True)
        fed = len(out.scores) - 1  # the last new token is never fed back
        return [out.past_key_values.get_seq_length(i) for i in range(len(qwen.lm.layers))], fed

    length = qwen.batch["input_ids"].shape[1]
    unpruned, fed = caches()
    assert unpruned == [length + fed] * 3
    with prune(qwen.model, "lvpruning", BUDGET, path=str(qwen_late)) as run:
        pruned, fed = caches()
        widths = [c.shape[1] for c in run.stage_columns()]
        layers = run.stages
    assert layers == (1, 2) and length > widths[0] > widths[1]
    assert pruned == [length + fed, widths[0] + fed, widths[1] + fed]


# ------------------------------------------------------------------------------------------ (e) module files
def _edited(source, target, edit):
    """A copy of the module file `source` at `target`, its tensors changed by `edit(tensors)` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        meta, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(target), metadata=meta)
    return target


def _bad_files(folder, config):
    """name -> (a module file that cannot run on a model of `config` (3 decoder layers, 64 wide), error, match)."""
    good = lvpruning_modules(folder / "good.safetensors", config)
    (folder / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator()
                                                              .manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])

    def wrong_shape(tensors):
        tensors["stage1.decide.weight"] = torch.zeros(2, 63)

    def not_finite(tensors):
        tensors["stage0.ffn.1.weight"][3, 5] = float("nan")

    readable = "is not a readable safetensors file"
    return {
        "missing": (folder / "absent.safetensors", ModuleFileError,
                    r"not found: .*absent\.safetensors.*harness lvpruning train"),
        "random bytes": (folder / "random.safetensors", ModuleFileError, readable),
        "truncated": (folder / "truncated.safetensors", ModuleFileError, readable),
        "another width": (lvpruning_modules(folder / "w32.safetensors", SimpleNamespace(
            hidden_size=32, num_hidden_layers=3)), ModuleFileError,
                          r"width 32 and 3 layers; this model's has width 64 and 3 layers"),
        "another depth": (lvpruning_modules(folder / "d4.safetensors", SimpleNamespace(
            hidden_size=64, num_hidden_layers=4), layers=(0, 1, 2)), ModuleFileError, r"width 64 and 4 layers"),
        "a tensor of the wrong shape": (_edited(good, folder / "shape.safetensors", wrong_shape), ModuleFileError,
                                        r"stage1\.decide\.weight has shape \(2, 63\), expected \(2, 64\)"),
        "non-finite values": (_edited(good, folder / "nan.safetensors", not_finite), ModuleFileError,
                              r"stage0\.ffn\.1\.weight is not finite"),
        "a layer out of range": (lvpruning_modules(folder / "range.safetensors", config, layers=(1, 3)), ValueError,
                                 r"every stage's layer must be in 0\.\.2 for this model, got \[1, 3\]"),
        "layers not increasing": (lvpruning_modules(folder / "order.safetensors", config, layers=(2, 1)),
                                  ValueError, r"stage layers must increase, got \[2, 1\]"),
        "a repeated layer": (lvpruning_modules(folder / "repeat.safetensors", config, layers=(1, 1)), ValueError,
                             r"stage layers must increase, got \[1, 1\]"),
    }


BAD_FILES = ["missing", "random bytes", "truncated", "another width", "another depth", "a tensor of the wrong shape",
             "non-finite values", "a layer out of range", "layers not increasing", "a repeated layer"]


@pytest.fixture(scope="module")
def bad_files(qwen, tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad-modules"), qwen.model.config)


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_module_file_is_one_clear_error_before_any_forward(qwen, bad_files, case):
    path, error, match = bad_files[case]
    with pytest.raises(error, match=match) as refused:
        qwen.adapter.check(methods.get("lvpruning", path=str(path)), qwen.model.config)
    assert "\n" not in str(refused.value)
    forwards = []
    handles = [m.register_forward_pre_hook(lambda *a: forwards.append(1)) for m in (qwen.model, qwen.model.model)]
    try:
        with pytest.raises(error, match=match), prune(qwen.model, "lvpruning", BUDGET, path=str(path)):
            _generate(qwen.model, qwen.batch)
    finally:
        for h in handles:
            h.remove()
    assert forwards == [] and _hooks(qwen.model) == qwen.hooks


def test_a_module_file_whose_metadata_is_missing_or_inconsistent_is_a_clear_error(qwen, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))  # a safetensors file, not ours
    with pytest.raises(ModuleFileError, match=r"lacks its metadata .*hidden, heads, layers, decoder_layers, targets"):
        qwen.adapter.check(methods.get("lvpruning", path=str(tmp_path / "foreign.safetensors")), qwen.model.config)
    good = lvpruning_modules(tmp_path / "good.safetensors", qwen.model.config, layers=(1, 2))
    for key, value, match in [("targets", "[0.5]", r"2 layers but 1 targets"),
                              ("heads", "7", r"hidden size 64 is not divisible by 7 heads")]:
        from safetensors import safe_open

        with safe_open(str(good), framework="pt") as f:
            meta, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        target = tmp_path / f"{key}.safetensors"
        save_file(tensors, str(target), metadata={**meta, key: value})
        with pytest.raises(ModuleFileError, match=match):
            qwen.adapter.check(methods.get("lvpruning", path=str(target)), qwen.model.config)


def test_the_file_as_written_loads_back_exactly(tmp_path):
    from methods import lvpruning_modules as files

    config = SimpleNamespace(hidden_size=16, num_hidden_layers=2)
    path = lvpruning_modules(tmp_path / "m.safetensors", config, seed=3)
    loaded, meta = files.load(path)
    built = files.build(16, 2, 8, seed=3)
    assert meta["layers"] == [0, 1] and meta["decoder_layers"] == 2 and meta["targets"] == [0.5, 0.25]
    assert meta["hidden"] == 16 and meta["heads"] == 8
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), built.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


# ------------------------------------------------------------------------------------------ (f) parameters
def test_bad_parameters_are_clear_errors():
    with pytest.raises(ValueError, match=r"^schedule must be one of shift, scale, got 'bogus'$"):
        methods.get("lvpruning", schedule="bogus")
    with pytest.raises(ValueError, match=r"position_policy must be one of renumber, original, got 'shuffled'"):
        methods.get("lvpruning", position_policy="shuffled")
    with pytest.raises(ValueError, match=r"method 'lvpruning' has no parameter\(s\) ratio; it accepts: path, "
                                         r"position_policy, schedule"):
        methods.get("lvpruning", ratio=0.5)
