"""The LLaVA-NeXT adapter (harness/adapters/llava_next.py) on the tiny random LlavaNextForConditionalGeneration
(harness.testbed.tiny_families: 84 px views of 6x6 tokens, pinpoints [[84,168],[168,84],[168,168],[252,84],
[84,252]]), with every registered method (parameters from default_methods).

Three images of different crop grids, in a left-padded batch and alone (PIL width x height; the model's
image_sizes are (H, W)):
- 336x336: base + 2x2 crops, 12x12 map, 12 newlines: 36 + 144 visual tokens (192 image tokens);
- 168x336: base + 2x1 crops (tall), 12x6 map, 12 newlines: 36 + 72 (120);
- 336x250: base + 2x2 crops unpadded to 8x12 (the top and bottom two rows go; each crop keeps 4x6),
  8 newlines: 36 + 96 (140).

Which column of the sequence is which token is computed here independently of the adapter (`_layout`: the
anyres grid from transformers' `get_anyres_image_grid_shape`, the unpadding arithmetic written out), and
checked against the model's own packing. The equivalence test feeds the language model by hand only the
columns the run kept (text, newlines, kept visual tokens) of the unpruned prefill's inputs, with positions as
the method's policy says (renumber: contiguous from the mask; original: gathered), and decodes by hand with a
cache, feeding the run's tokens and checking they are the argmax of the hand's logits. Merging methods
(cls_attention) replace their kept tokens' features: at those slots only, the features are the ones the run
wrote into the sequence (captured at the language model's input). In-LLM methods (fastv) are decoded by hand
without a cache: each step runs layers < K on the whole sequence, cuts the hidden states entering layer K to
the kept columns and runs layers >= K on them.
"""

import copy

import pytest
import torch

import methods
from harness.adapters import llava_next as NX
from harness.adapters import prune
from harness.testbed import model as M
from harness.testbed import questions as Q
from harness.testbed import tiny_families as TF
from harness.testbed import world as W
from methods.base import Method, Selection
from methods.codebook_files import save as save_codebook

from default_methods import SINGLE_STAGE as DEFAULT_METHODS, default_params  # multi-stage: test_families

SIZES = [(336, 336), (168, 336), (336, 250)]  # PIL (width, height)
QUESTIONS = ["What colour is the ball?", "Where?", "Is there a big red cube in the picture?"]
VISUAL = [180, 108, 132]  # visual tokens per image (newlines excluded)
BUDGET = 24
BASE_SHARE = [5, 8, 7]  # the base view's share of 24, in proportion: 24*36/180 = 4.8, 24*36/108 = 8, 6.55
STEPS = 3
VIEW = 36  # tokens of one view (6x6)
MERGING = {"cls_attention"}  # methods that replace their kept tokens' features


@pytest.fixture(scope="module")
def tiny():
    model, processor = TF.build("llava_next")
    return model, processor


def _images():
    scene = W.render_pil(Q.make_sample("test", "color", 0)["scenes"][0])
    return [scene.resize(size) for size in SIZES]


def _inputs(processor, which):
    """A left-padded batch: one row per entry of `which`, an image index or a tuple of them (one prompt)."""
    images = _images()
    rows = [(i,) if isinstance(i, int) else tuple(i) for i in which]
    return processor(images=[[images[i] for i in row] for row in rows],
                     text=[M.format_prompt(QUESTIONS[row[0]], len(row)) for row in rows], padding=True,
                     return_tensors="pt")


@pytest.fixture(scope="module")
def codebook(tiny, tmp_path_factory):
    """A codebook in the tiny model's projector space: 20 of its own visual tokens, perturbed."""
    model, processor = tiny
    inputs = _inputs(processor, [0])
    with torch.no_grad():
        tokens = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)
    tokens = tokens[~(tokens == model.model.image_newline).all(-1)]
    gen = torch.Generator().manual_seed(0)
    picked = tokens[torch.randperm(len(tokens), generator=gen)[:20]]
    path = tmp_path_factory.mktemp("codebook") / "codebook.pt"
    save_codebook(path, picked + 0.05 * picked.std() * torch.randn(picked.shape, generator=gen), ["test"] * 20, {})
    return path


# ------------------------------------------------------------------------------------ the layout, by hand
def _layout(model, size) -> list[int]:
    """Each packed token of an image of `size` (H, W): view * 36 + token (view 0 the base), or -1 for a newline;
    the unpadding written out (base view first; crops joined into one map, rows cut to the image's aspect)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    side = 6
    rows_of_crops, cols_of_crops = get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints, 84)
    height, width = rows_of_crops * side, cols_of_crops * side
    image_h, image_w = size
    if image_w / image_h > width / height:  # wider than the map: padding rows above and below
        pad = (height - int(round(image_h * width / image_w, 7))) // 2
        ys, xs = range(pad, height - pad), range(width)
    else:
        pad = (width - int(round(image_w * height / image_h, 7))) // 2
        ys, xs = range(height), range(pad, width - pad)
    out = list(range(VIEW))
    for y in ys:
        out += [(1 + (y // side) * cols_of_crops + x // side) * VIEW + (y % side) * side + x % side for x in xs]
        out.append(-1)
    return out


def _image_columns(model, inputs):
    """Per image (batch order): (row, columns of its image tokens, its layout)."""
    ids = inputs["input_ids"]
    out, i = [], 0
    for row in range(len(ids)):
        cols = (ids[row] == model.config.image_token_id).nonzero().flatten()
        start = 0
        while start < len(cols):
            layout = _layout(model, inputs["image_sizes"][i].tolist())
            out.append((row, cols[start:start + len(layout)], layout))
            start, i = start + len(layout), i + 1
    return out


def _visual_columns(columns, layout, scope):
    """The image's visual columns in the order its kept indices count them: the base view, then the crops in
    sequence order (scope "image"), or crop by crop (scope "part")."""
    visual = [(s // VIEW, c) for s, c in zip(layout, columns.tolist()) if s >= 0]
    base, crops = visual[:VIEW], visual[VIEW:]
    if scope == "part":
        crops = sorted(crops)  # by view, then column
    return [c for _, c in base + crops]


def _kept_columns(model, inputs, images, scope="image"):
    """Per row, the set of full-sequence columns a run whose ImageRecords are `images` keeps: all but the
    dropped visual ones."""
    length = inputs["input_ids"].shape[1]
    keep = [set(range(length)) for _ in range(len(inputs["input_ids"]))]
    layouts = _image_columns(model, inputs)
    assert len(images) == len(layouts)
    for (row, columns, layout), record in zip(layouts, images):
        visual = _visual_columns(columns, layout, scope)
        assert record.row == row and record.tokens_in == len(visual)
        keep[row] -= set(visual) - {visual[i] for i in record.kept.tolist()}
    return keep


# ------------------------------------------------------------------------------------ running and by hand
def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def _capture_lm_input(model):
    """A pre-hook on the language model recording the prefill's inputs (the first call); its handle."""
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append({k: kwargs[k] for k in ("inputs_embeds", "attention_mask", "position_ids")})

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def _unpruned_prefill(model, inputs):
    seen, handle = _capture_lm_input(model)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    return seen[0]


def _mask(full):
    """The prefill's 2D attention mask (generate() gives none for a batch without padding)."""
    mask = full["attention_mask"]
    return torch.ones(full["inputs_embeds"].shape[:2], dtype=torch.long) if mask is None else mask


def _pruned_inputs(full, keep, merged=None):
    """The kept columns of the unpruned prefill, rows left-padded: (index, embeds, mask, original positions)."""
    rows = [sorted(k) for k in keep]
    length = max(map(len, rows))
    index = torch.zeros(len(rows), length, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, cols in enumerate(rows):
        index[b, length - len(cols):] = torch.tensor(cols)
        valid[b, length - len(cols):] = True
    embeds = full["inputs_embeds"].gather(1, index[..., None].expand(-1, -1, full["inputs_embeds"].shape[-1]))
    if merged is not None:  # a merging method's kept visual tokens: the features the run wrote
        slots, written = merged
        embeds = torch.where(slots[..., None], written, embeds)
    mask = _mask(full).gather(1, index) * valid
    return index, embeds, mask, full["position_ids"].gather(1, index)


def _by_hand_pre_llm(model, embeds, mask, positions, tokens):
    """Logits (B, STEPS, V): the language model and lm_head fed the pruned prefix, then `tokens` one at a time
    with the cache, the new token at the prefix's last position + 1 + step."""
    from transformers import DynamicCache

    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                 use_cache=True)
        logits = [model.lm_head(out.last_hidden_state[:, -1])]
        for step in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            out = lm(inputs_embeds=lm.embed_tokens(tokens[:, step])[:, None], attention_mask=mask,
                     position_ids=(positions[:, -1] + 1 + step)[:, None], past_key_values=cache, use_cache=True)
            logits.append(model.lm_head(out.last_hidden_state[:, -1]))
    return torch.stack(logits, 1)


def _by_hand_in_llm(model, full, index, mask, positions, tokens, layer):
    """Logits (B, STEPS, V) of an in-LLM method, without a cache: layers < K read the whole sequence (the
    unpruned prefill and the tokens so far); the hidden states entering layer K are cut to the kept columns
    (and the new tokens), which layers >= K read with the pruned mask and `positions`."""
    from transformers.masking_utils import create_causal_mask

    lm = model.model.language_model
    logits = []
    with torch.no_grad():
        for step in range(tokens.shape[1]):
            new = tokens[:, :step]
            ones = mask.new_ones(len(mask), step)
            steps = torch.arange(1, step + 1)
            embeds = torch.cat([full["inputs_embeds"], lm.embed_tokens(new)], 1)
            hidden = lm(inputs_embeds=embeds, attention_mask=torch.cat([_mask(full), ones], 1),
                        position_ids=torch.cat([full["position_ids"], full["position_ids"][:, -1:] + steps], 1),
                        output_hidden_states=True).hidden_states[layer]
            length = full["inputs_embeds"].shape[1]
            at = torch.cat([index, length + steps[None].expand(len(index), -1) - 1], 1)
            h = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
            pos = torch.cat([positions, positions[:, -1:] + steps], 1)
            mask4d = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=torch.cat([mask, ones], 1),
                                        past_key_values=None, position_ids=pos)
            rotation = lm.rotary_emb(h, pos)
            for decoder in lm.layers[layer:]:
                h = decoder(h, attention_mask=mask4d, position_ids=pos, position_embeddings=rotation)
            logits.append(model.lm_head(lm.norm(h)[:, -1]))
    return torch.stack(logits, 1)


def _run(model, inputs, name, params, budget=BUDGET, scope="image"):
    """The pruned generation: tokens, logits, the run's records and columns, what it wrote at the LM's input."""
    with prune(model, name, budget=budget, budget_scope=scope, **params) as run:
        seen, handle = _capture_lm_input(model)  # registered after the run's hooks: sees the pruned input
        try:
            tokens, logits = _generate(model, inputs)
        finally:
            handle.remove()
        columns = run.columns()
        return dict(tokens=tokens, logits=logits, images=list(run.images), columns=columns, written=seen[0],
                    method=run.method, name=name, sources=run.sources)


def _by_hand(model, inputs, full, result, scope="image"):
    method = result["method"]
    keep = _kept_columns(model, inputs, result["images"], scope)
    index = [sorted(k) for k in keep]
    merged = None
    if result["name"] in MERGING:  # the slots of the kept visual tokens (not text, not newlines)
        visual = [set() for _ in index]
        for row, columns, layout in _image_columns(model, inputs):
            visual[row] |= set(columns[torch.tensor(layout) >= 0].tolist())
        length = max(map(len, index))
        slots = torch.zeros(len(index), length, dtype=torch.bool)
        for b, cols in enumerate(index):
            slots[b, length - len(cols):] = torch.tensor([c in visual[b] for c in cols])
        merged = (slots, result["written"]["inputs_embeds"])
    index, embeds, mask, original = _pruned_inputs(full, keep, merged)
    positions = original if method.position_policy == "original" else (mask.long().cumsum(-1) - 1).clamp(min=0)
    if method.stage == "in_llm":
        return _by_hand_in_llm(model, full, index, mask, positions, result["tokens"], method.layer)
    return _by_hand_pre_llm(model, embeds, mask, positions, result["tokens"])


# ------------------------------------------------------------------------------------------------- tests
def test_layout_by_hand_is_the_models_own_packing(tiny):
    model, processor = tiny
    sizes = [(336, 336), (336, 168), (168, 336), (250, 336), (336, 250), (336, 120), (84, 336)]
    packed = NX.packed_sources(model, torch.tensor(sizes))
    for size, sources in zip(sizes, packed):
        assert sources.tolist() == _layout(model, size), size
    inputs = _inputs(processor, [0, 1, 2])
    assert [len(_layout(model, s.tolist())) for s in inputs["image_sizes"]] == [192, 120, 140]
    assert NX.PruningRun.visual_tokens_per_row(model, inputs) == VISUAL
    # two images in one row: both counted in it, less both images' newlines
    two = processor(images=[_images()[:2]], text=[M.format_prompt("Which?", 2)], return_tensors="pt")
    assert NX.PruningRun.visual_tokens_per_row(model, two) == [VISUAL[0] + VISUAL[1]]


def test_each_image_column_is_traced_to_its_view_and_token(tiny):
    """The adapter finds each image column's source by value from the sequence: it is the packing. Two images
    in one row (and one in the next): both traced, both pruned, the run equal to its kept tokens by hand."""
    model, processor = tiny
    inputs = _inputs(processor, [(0, 1), 2])
    full = _unpruned_prefill(model, inputs)
    result = _run(model, inputs, "random", {})
    expected, offset = [], 0
    for _, _, layout in _image_columns(model, inputs):
        expected += [s + offset * VIEW if s >= 0 else NX.NEWLINE for s in layout]
        offset += max(layout) // VIEW + 1
    assert result["sources"].tolist() == expected
    assert [(r.row, r.tokens_in, len(r.kept)) for r in result["images"]] == [(0, 180, 24), (0, 108, 24), (1, 132, 24)]
    assert torch.allclose(_by_hand(model, inputs, full, result), result["logits"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scope", ["image", "part"])
def test_what_a_method_reads_per_part(tiny, scope):
    """Each part's grid, features, ViT features, [CLS] attention of its own view and seed, against the model's
    own tensors (the [CLS] attention from an eager copy of the ViT)."""
    model, processor = tiny
    inputs = _inputs(processor, [0, 2])

    class Recorder(Method):
        def select(self, ctx, k):
            seen.append(dict(features=ctx.features, grid=ctx.grid, vision=ctx.vision_features,
                             cls=ctx.cls_attention(), keys=ctx.vision_keys(), seed=ctx.image_seed(),
                             projected=ctx.project(ctx.vision_features)))
            return Selection(torch.arange(k))

    seen, captured = [], {}
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda m, a, out: captured.update(vision=a[0], projected=out))
    try:
        with prune(model, Recorder(), budget=1.0, budget_scope=scope, record_ipr=False):
            _generate(model, inputs)
    finally:
        handle.remove()
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    pixels = torch.cat([inputs["pixel_values"][0, :5], inputs["pixel_values"][1, :5]])  # 5 views each
    with torch.no_grad():
        attentions = tower(pixels, output_attentions=True).attentions[0]  # feature layer -2 of 2: layer 0
    cls = attentions[:, :, 0, 1:].sum(1)  # (views, 36), heads summed
    expected_grids = {"image": [(6, 6), (12, 12), (6, 6), (8, 12)],
                      "part": [(6, 6)] + [(6, 6)] * 4 + [(6, 6)] + [(4, 6)] * 4}[scope]
    assert [s["grid"] for s in seen] == expected_grids
    parts, offset = [], 0
    for image, (_, _, layout) in enumerate(_image_columns(model, inputs)):
        visual = [s + offset * VIEW for s in layout if s >= 0]
        base, crops = visual[:VIEW], visual[VIEW:]
        parts.append(base)
        parts += [sorted(c for c in crops if c // VIEW == v) for v in sorted({c // VIEW for c in crops})] \
            if scope == "part" else [crops]
        offset += 5
    for part, s in zip(parts, seen):
        where = torch.tensor(part)
        assert torch.equal(s["features"], captured["projected"].flatten(0, 1)[where])
        assert torch.equal(s["vision"], captured["vision"].flatten(0, 1)[where])
        assert torch.allclose(s["projected"], s["features"], atol=1e-6)
        assert torch.allclose(s["cls"], cls.flatten()[where], atol=1e-5)
        assert s["keys"].shape == (len(part), 16)
    seeds = [s["seed"] for s in seen]
    assert len(set(seeds)) == len(seeds)  # each part of each image its own draw
    assert all(torch.isfinite(s["cls"]).all() for s in seen)


@pytest.fixture(scope="module")
def references(tiny):
    """The unpruned prefill's language-model inputs and the unpruned generation, for the batch and each image."""
    model, processor = tiny
    out = {}
    for which in ([0, 1, 2], [0], [1], [2]):
        inputs = _inputs(processor, which)
        out[tuple(which)] = (inputs, _unpruned_prefill(model, inputs), _generate(model, inputs))
    return out


def _hooks(model):
    return [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()]


@pytest.fixture(scope="module", params=list(DEFAULT_METHODS))
def pruned(request, tiny, codebook, references):
    """One method at BUDGET: the batch of three, then each image alone; the model's weights and hooks before
    and after."""
    model, _ = tiny
    name = request.param
    params = default_params(name, codebook)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, _hooks(model))
    results = {which: _run(model, inputs, name, params) for which, (inputs, _, _) in references.items()}
    return name, results, (before, (model.state_dict(), _hooks(model)))


def test_newlines_are_kept_and_never_counted(tiny, references, pruned):
    model, _ = tiny
    _, results, _ = pruned
    inputs, _, _ = references[(0, 1, 2)]
    result = results[(0, 1, 2)]
    assert [r.tokens_in for r in result["images"]] == VISUAL
    assert all(r.extra["budget_scope"] == "image" for r in result["images"])
    keep = _kept_columns(model, inputs, result["images"])
    newlines = [set(cols[torch.tensor(layout) < 0].tolist()) for _, cols, layout in _image_columns(model, inputs)]
    for row, lines in enumerate(newlines):
        assert lines <= keep[row]
    if result["columns"] is not None:  # the columns the pruned forward read: exactly the kept ones
        for row in range(3):
            assert set(result["columns"][row].tolist()) - {0} == keep[row] - {0}
    kept = [len(r.kept) for r in result["images"]]
    method = result["method"]
    if method.adaptive:  # the codebook's threshold
        assert all(1 <= k <= v for k, v in zip(kept, VISUAL))
    elif not method.uses_budget:  # none
        assert kept == VISUAL
    else:
        assert kept == [BUDGET] * 3
        assert [int((r.kept < VIEW).sum()) for r in result["images"]] == BASE_SHARE  # in proportion


@pytest.mark.parametrize("batch", [(0, 1, 2), (0,), (1,), (2,)], ids=["batch3", "336x336", "168x336", "336x250"])
def test_the_run_equals_the_kept_tokens_fed_by_hand(tiny, references, pruned, batch):
    model, _ = tiny
    name, results, _ = pruned
    inputs, full, _ = references[batch]
    result = results[batch]
    logits = _by_hand(model, inputs, full, result)
    assert torch.allclose(logits, result["logits"], atol=1e-5, rtol=1e-4), name
    assert torch.equal(logits.argmax(-1), result["tokens"])


def test_a_batch_of_three_equals_three_single_runs(pruned):
    _, results, _ = pruned
    batch = results[(0, 1, 2)]
    for i in range(3):
        single = results[(i,)]
        assert torch.equal(batch["tokens"][i], single["tokens"][0])
        assert torch.allclose(batch["logits"][i], single["logits"][0], atol=1e-4)
        assert torch.equal(batch["images"][i].kept, single["images"][0].kept)


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_a_budget_that_keeps_every_token_gives_the_unpruned_outputs(tiny, codebook, references, name):
    model, _ = tiny
    inputs, _, (ref_tokens, ref_logits) = references[(0, 1, 2)]
    params = default_params(name, codebook)
    if methods.get(name, **params).adaptive:
        params["tau"] = 1.0  # a threshold above every similarity keeps every token
    with prune(model, name, budget=1.0, **params) as run:
        tokens, logits = _generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    assert [len(r.kept) for r in run.images] == VISUAL


def test_the_model_is_unchanged_after_the_block(tiny, references, pruned):
    model, _ = tiny
    _, _, ((state, hooks), (state_after, hooks_after)) = pruned
    assert all(torch.equal(state[k], state_after[k]) for k in state)
    assert hooks_after == hooks  # every hook of the runs removed, transformers' own untouched
    inputs, _, (ref_tokens, ref_logits) = references[(1,)]
    tokens, logits = _generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("name", ["random", "gprune"])
def test_budget_per_crop(tiny, codebook, references, name):
    """budget_scope="part": the base view and each crop (its unpadded tokens) get the budget on their own."""
    model, _ = tiny
    inputs, full, _ = references[(0, 1, 2)]
    result = _run(model, inputs, name, default_params(name, codebook), budget=20, scope="part")
    sizes = [[36] * 5, [36] * 3, [36] + [24] * 4]
    for record, part_sizes in zip(result["images"], sizes):
        assert record.extra == {**record.extra, "budget_scope": "part", "part_sizes": part_sizes}
        bounds = torch.tensor(part_sizes).cumsum(0)
        per_part = torch.bincount(torch.bucketize(record.kept, bounds, right=True), minlength=len(part_sizes))
        assert per_part.tolist() == [20] * len(part_sizes)
    logits = _by_hand(model, inputs, full, result, scope="part")
    assert torch.allclose(logits, result["logits"], atol=1e-5, rtol=1e-4)
