"""The Qwen2-VL / Qwen2.5-VL adapter (harness/adapters/qwen2_vl.py) on tiny random models of both real
classes (harness.testbed.tiny_families), with every registered method but the refused `cls_attention`.

The central test: generation under a method's hooks equals the language model fed, by hand, only the
tokens the run kept, with their unpruned 3-D M-RoPE positions gathered (every row), and decoded with
positions continuing from the unpruned prompt (its last position + 1 + step on every row) — at batch
1 and in a left-padded batch whose rows hold images of different sizes. The kept columns are found
here from the input ids and grids, not through the adapter's parts.

Images are sized so counts differ: 112x112 -> 16 tokens (4x4), 168 wide x 112 -> 24 (4x6),
112 wide x 224 -> 32 (8x4), 224x224 -> 64 (8x8; four 4x4 windows in Qwen2.5-VL's ViT).
"""

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

import methods
from harness.adapters import prune
from harness.adapters.attention import last_token_attention
from harness.adapters.qwen2_vl import MediaNotEncoded
from harness.testbed import tiny_families as T
from methods.base import Method, Selection
from methods.codebook_files import save as save_codebook

from default_methods import SINGLE_STAGE as DEFAULT_METHODS, default_params  # multi-stage: test_families

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
METHODS = [name for name in DEFAULT_METHODS if name != "cls_attention"]  # refused (its own test)
STEPS = 3  # new tokens


def _image(width, height, seed):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


A, B, C, D = _image(112, 112, 0), _image(168, 112, 1), _image(112, 224, 2), _image(224, 224, 3)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _prompt(content):
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


#: (text, images) per row: one image; three rows of 16, 24 + 32 (two images) and 64 tokens, left-padded
SINGLE = [(_prompt(f"{IMAGE}What is it?"), [B])]
BATCH = [(_prompt(f"{IMAGE}What colour is the thing on the left of it?"), [A]),
         (_prompt(f"Compare {IMAGE} and {IMAGE}, please."), [B, C]),
         (_prompt(f"{IMAGE}Why?"), [D])]


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request, tmp_path_factory):
    model, processor = T.build(request.param)
    model.generation_config.eos_token_id = None  # every row decodes STEPS tokens (no early stop to pad)
    path = tmp_path_factory.mktemp("codebook") / "codebook.pt"
    inputs = _inputs(processor, BATCH[2:])
    with torch.no_grad():  # 20 of the model's own merged tokens, perturbed: a codebook of the LLM width
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        tokens = torch.cat(encoded.pooler_output)
    torch.manual_seed(0)
    picked = tokens[torch.randperm(len(tokens))[:20]]
    save_codebook(path, picked + 0.05 * picked.std() * torch.randn_like(picked), ["test"] * 20, {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small run several times faster on one thread than on two shared ones
    yield SimpleNamespace(family=request.param, model=model, processor=processor, codebook=path, cache={})
    torch.set_num_threads(threads)


def _inputs(processor, rows):
    return processor(text=[t for t, _ in rows], images=[ims for _, ims in rows], padding=True, return_tensors="pt")


def _generate(model, inputs, steps=STEPS):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def _params(qwen, name):
    return default_params(name, qwen.codebook)


def _unpruned_lm_inputs(qwen, key, inputs):
    """The language model's inputs at an unpruned prefill: inputs_embeds, attention mask, position ids (4, B, T)."""
    if key not in qwen.cache:
        calls = []
        handle = qwen.model.model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
        try:
            _generate(qwen.model, inputs, steps=1)
        finally:
            handle.remove()
        embeds, mask, positions = (calls[0][k] for k in ("inputs_embeds", "attention_mask", "position_ids"))
        if mask is None:  # generate() drops an all-ones mask (batch 1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        qwen.cache[key] = embeds.clone(), mask, positions.clone()
    return qwen.cache[key]


def _media(model, inputs):
    """[(row, columns)] of every image and video, in batch order: their pad tokens, split by the grids."""
    config, merge = model.config, model.config.vision_config.spatial_merge_size
    media = []
    for token, key in ((config.image_token_id, "image_grid_thw"), (config.video_token_id, "video_grid_thw")):
        if key not in inputs:
            continue
        sizes = iter((inputs[key].prod(-1) // merge ** 2).tolist())
        for row, ids in enumerate(inputs["input_ids"]):
            columns = (ids == token).nonzero().flatten().tolist()
            while columns:
                n = next(sizes)
                media.append((row, columns[:n]))
                columns = columns[n:]
    return sorted(media, key=lambda m: (m[0], m[1][0]))


def _kept_columns(model, inputs, run) -> list[torch.Tensor]:
    """Each row's columns that survive the run: its text (padding included) and the visual tokens it kept."""
    media = _media(model, inputs)
    assert [(r.row, r.tokens_in) for r in run.images] == [(row, len(cols)) for row, cols in media]
    keep = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
    for (row, columns), record in zip(media, run.images):
        dropped = torch.ones(len(columns), dtype=torch.bool)
        dropped[record.kept] = False
        keep[row, torch.tensor(columns)[dropped]] = False
    return [row.nonzero().flatten() for row in keep]


def _pad_rows(rows, length):
    """Right-align each row's tensor (n, ...) in `length` positions, zeros before: (B, length, ...)."""
    out = rows[0].new_zeros(len(rows), length, *rows[0].shape[1:])
    for b, row in enumerate(rows):
        out[b, length - len(row):] = row
    return out


def _by_hand(model, full, columns, layer=0, steps=STEPS):
    """Greedy decoding of the kept tokens by hand: the language model (all of it; in-LLM, layers >= `layer`)
    reads each row's kept `columns` of the unpruned prefill's inputs `full`, every position row gathered;
    the new tokens' positions continue the unpruned prompt's on every row. (tokens (B, steps), logits)."""
    lm = model.model.language_model
    embeds, mask, positions = full
    length = max(len(c) for c in columns)
    kept = (_pad_rows([embeds[b, c] for b, c in enumerate(columns)], length),
            _pad_rows([mask[b, c] for b, c in enumerate(columns)], length),
            torch.stack([_pad_rows([p[b, c] for b, c in enumerate(columns)], length) for p in positions]))
    gather = (lambda h: _pad_rows([h[b, c] for b, c in enumerate(columns)], length))
    cache = DynamicCache(config=lm.config)
    tokens, logits = [], []
    hidden, masks, pos = (embeds, kept[0]), (mask, kept[1]), (positions, kept[2])
    with torch.no_grad():
        for step in range(steps):
            if layer == 0:  # pre-LLM: the text model itself, on the kept tokens only
                out = lm(inputs_embeds=hidden[1], attention_mask=masks[1], position_ids=pos[1],
                         past_key_values=cache, use_cache=True).last_hidden_state
            else:
                out = _layers_by_hand(lm, hidden[0], masks, pos, cache, layer, gather if step == 0 else None)
            logits.append(model.lm_head(out[:, -1]))
            tokens.append(logits[-1].argmax(-1))
            new = lm.embed_tokens(tokens[-1])[:, None]
            hidden = (new, new)
            ones = torch.ones(len(new), 1, dtype=mask.dtype)
            masks = (torch.cat([masks[0], ones], 1), torch.cat([masks[1], ones], 1))
            following = positions[:, :, -1:] + step + 1  # the unpruned prompt's last position + 1 + step
            pos = (following, following)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def _layers_by_hand(lm, hidden, masks, positions, cache, layer, gather):
    """The decoder layers one by one: those below `layer` on the full sequence, the rest on the kept
    tokens (at prefill the hidden states are gathered before `layer`)."""
    for i, decoder in enumerate(lm.layers):
        pruned = int(i >= layer)
        if i == layer and gather is not None:
            hidden = gather(hidden)
        mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=masks[pruned],
                                  past_key_values=cache, layer_idx=i)
        rotary = lm.rotary_emb(hidden, positions[pruned][1:])
        hidden = decoder(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache,
                         use_cache=True)
    return lm.norm(hidden)


# ------------------------------------------------------------------------------------- the equivalence
@pytest.mark.parametrize("rows", ["single", "batch"])
@pytest.mark.parametrize("name", METHODS)
def test_pruned_generation_equals_the_kept_tokens_fed_by_hand(qwen, name, rows):
    """No registered method that runs here merges tokens (cls_attention, the one that does, is refused),
    so the kept tokens' features are the unpruned ones."""
    model = qwen.model
    inputs = _inputs(qwen.processor, SINGLE if rows == "single" else BATCH)
    full = _unpruned_lm_inputs(qwen, rows, inputs)
    method = methods.get(name, **_params(qwen, name))
    with prune(model, method, budget=12) as run:
        tokens, logits = _generate(model, inputs)
    columns = _kept_columns(model, inputs, run)
    if method.uses_budget and not method.adaptive:
        assert [len(r.kept) for r in run.images] == [12] * len(run.images)
    layer = getattr(method, "layer", 0) if method.stage == "in_llm" else 0
    ref_tokens, ref_logits = _by_hand(model, full, columns, layer)
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-5)


def test_a_video_is_pruned_as_one_image_of_frames_and_equals_the_kept_tokens_fed_by_hand(qwen):
    frames = [_image(112, 112, 10 + i) for i in range(4)]  # 4 frames -> 2 temporal steps of 4x4 tokens
    inputs = qwen.processor(text=[_prompt(f"{IMAGE} then {VIDEO} what changed?")], images=[[A]], videos=[frames],
                            return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]
    full = _unpruned_lm_inputs(qwen, "video", inputs)
    with prune(qwen.model, "uniform", budget=0.5) as run:
        tokens, logits = _generate(qwen.model, inputs)
    assert [(r.tokens_in, len(r.kept)) for r in run.images] == [(16, 8), (32, 16)]  # the video: 8 a frame
    assert (run.images[1].kept < 16).sum() == 8
    ref_tokens, ref_logits = _by_hand(qwen.model, full, _kept_columns(qwen.model, inputs, run))
    assert torch.equal(tokens, ref_tokens) and torch.allclose(logits, ref_logits, atol=1e-5)


# ------------------------------------------------------------------------------------------ contracts
@pytest.mark.parametrize("name", METHODS)
def test_keeping_every_token_is_the_unpruned_run_and_the_model_is_unchanged_after(qwen, name):
    model = qwen.model
    inputs = _inputs(qwen.processor, BATCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = lambda: [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()]
    hooks_before = hooks()
    ref_tokens, ref_logits = _generate(model, inputs)
    params = _params(qwen, name)
    if methods.get(name, **params).adaptive:
        params["tau"] = 1.0  # a threshold above every similarity keeps every token
    with prune(model, name, budget=1.0, **params) as run:
        tokens, logits = _generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    assert [len(r.kept) for r in run.images] == [r.tokens_in for r in run.images] == [16, 24, 32, 64]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hooks() == hooks_before
    assert all(torch.equal(a, b) for a, b in zip(_generate(model, inputs), (ref_tokens, ref_logits)))


@pytest.mark.parametrize("name", METHODS)
def test_a_padded_batch_of_three_equals_three_single_runs(qwen, name):
    inputs = _inputs(qwen.processor, BATCH)
    assert (inputs["attention_mask"] == 0).any()
    with prune(qwen.model, name, budget=12, **_params(qwen, name)) as run:
        tokens, logits = _generate(qwen.model, inputs)
        batch_kept = [r.kept for r in run.images]
        singles = [_generate(qwen.model, _inputs(qwen.processor, [row])) for row in BATCH]
        single_kept = [r.kept for r in run.images[len(batch_kept):]]
    for b, (t, s) in enumerate(singles):
        assert torch.equal(tokens[b], t[0])
        assert torch.allclose(logits[b], s[0], atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(batch_kept, single_kept))


def test_a_count_budget_is_capped_at_each_image_and_a_fraction_applies_per_image(qwen):
    inputs = _inputs(qwen.processor, BATCH)  # images of 16, 24, 32 and 64 tokens
    for budget, kept in ((20, [16, 20, 20, 20]), (100, [16, 24, 32, 64]), (0.25, [4, 6, 8, 16])):
        with prune(qwen.model, "random", budget=budget) as run:
            _generate(qwen.model, inputs, steps=1)
        assert [len(r.kept) for r in run.images] == kept, budget


def test_cls_attention_is_refused_in_one_line_before_any_forward(qwen):
    model = qwen.model
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        with pytest.raises(ValueError) as error, prune(model, "cls_attention", budget=8):
            model(**_inputs(qwen.processor, SINGLE))
    finally:
        handle.remove()
    message = str(error.value)
    assert message.startswith(f"cls_attention cannot run on {qwen.family}: ") and "[CLS]" in message
    assert "\n" not in message and forwards == []


def test_images_encoded_before_the_block_are_refused_not_left_unpruned(qwen):
    model = qwen.model
    inputs = dict(_inputs(qwen.processor, SINGLE))
    with torch.no_grad():
        encoded = {"image": model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"],
                                                           return_dict=True)}
    with pytest.raises(MediaNotEncoded, match="encoded inside the prune"), prune(model, "random", budget=4):
        model.generate(**inputs, mm_encoder_outputs=encoded, max_new_tokens=1)


# ------------------------------------------------------------------------------------------ positions
def _record(module, key):
    """A pre-hook recording `key` of each call's kwargs (registered last: it sees what the module reads)."""
    seen = []
    return seen, module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs[key]), with_kwargs=True)


@pytest.mark.parametrize("name", ["random", "fastv"])
def test_decoding_positions_are_the_unpruned_ones(qwen, name):
    """At every decoding step the first pruned layer (layer 0 pre-LLM, K in-LLM) reads the rotation the
    unpruned run's reads there, and the language model the same position ids (all four rows: the unpruned
    prompt's last + step); at prefill the kept tokens' rotation is gathered from the unpruned one."""
    model = qwen.model
    lm = model.model.language_model
    inputs = _inputs(qwen.processor, BATCH)
    params = _params(qwen, name)
    first = lm.layers[params.get("layer", 0)]
    runs = {}
    for label in ("unpruned", "pruned"):
        with prune(model, name, budget=1.0 if label == "unpruned" else 5, **params) as run:
            (rotary, h1), (positions, h2) = _record(first, "position_embeddings"), _record(lm, "position_ids")
            try:
                _generate(model, inputs)
            finally:
                h1.remove(), h2.remove()
            runs[label] = [cos for cos, _ in rotary], positions, _kept_columns(model, inputs, run)
    (cos, positions, _), (pruned_cos, pruned_positions, columns) = runs["unpruned"], runs["pruned"]
    assert len(pruned_cos) == len(cos) == STEPS and positions[0].shape[0] == 4
    for step in range(1, STEPS):
        assert torch.equal(pruned_cos[step], cos[step])
        assert torch.equal(pruned_positions[step], positions[0][:, :, -1:] + step)
    length = max(len(c) for c in columns)
    assert pruned_cos[0].shape[1] == length < cos[0].shape[1]
    for b, c in enumerate(columns):
        assert torch.equal(pruned_cos[0][b, length - len(c):], cos[0][b, c])


def test_the_models_own_decoding_numbering_continues_the_unpruned_prompt(qwen):
    """Without generate(): a forward, then a step with the cache and no mask. The model numbers the step
    from its cache's length plus its `rope_deltas`; the pruned cache is shorter, so the adapter gives the
    step the positions the unpruned prompt's numbering continues with. (transformers 5.23 cannot take a
    step with a mask and no position ids: its `compute_3d_position_ids` then numbers the whole mask.)"""
    model = qwen.model
    inputs = _inputs(qwen.processor, SINGLE)
    positions = {}
    for label, budget in (("unpruned", 1.0), ("pruned", 5)):
        with prune(model, "random", budget=budget), torch.no_grad():
            seen, handle = _record(model.model.language_model, "position_ids")
            try:
                out = model(**inputs, use_cache=True)
                model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
            finally:
                handle.remove()
        positions[label] = seen
    prompt = positions["unpruned"][0]
    assert prompt.shape[0] == 3 and positions["pruned"][0].shape[-1] == prompt.shape[-1] - 19  # 24 -> 5 tokens
    assert torch.equal(positions["pruned"][1], prompt[:, :, -1:] + 1)
    assert torch.equal(positions["pruned"][1], positions["unpruned"][1])


# --------------------------------------------------------------------------------------- what methods see
@dataclass
class _Spy(Method):
    """Keeps every token and records each part's context."""

    seen: list = None

    def select(self, ctx, k):
        self.seen.append(ctx)
        return Selection(torch.arange(ctx.num_tokens))


def test_each_image_is_a_part_of_its_grid_with_its_merger_input_and_its_own_seed(qwen):
    model = qwen.model
    merger = model.model.visual.merger
    seen = {}
    for label, rows in (("batch", BATCH), ("alone", [(_prompt(f"{IMAGE}x"), [D])])):
        spy = _Spy(seen=[])
        with prune(model, spy, budget=None), torch.no_grad():
            model(**_inputs(qwen.processor, rows))
        seen[label] = spy.seen
    batch = seen["batch"]
    assert [c.grid for c in batch] == [(4, 4), (4, 6), (8, 4), (8, 8)]
    for ctx in batch:  # the merger's input, 2x2 patches a row in raster order: the merger gives the features
        n, width = ctx.vision_features.shape
        assert n == ctx.num_tokens and width == 4 * merger.ln_q.weight.shape[0]
        with torch.no_grad():
            merged = merger(ctx.vision_features.reshape(4 * n, -1))
        assert torch.allclose(merged, ctx.features, atol=1e-5)
    seeds = [ctx.image_seed() for ctx in batch]
    assert len(set(seeds)) == 4 and seeds[3] == seen["alone"][0].image_seed()  # the pixels, not the batch place
    assert all(ctx.cls_attention is None and ctx.project is None for ctx in batch)


def test_fastv_row_equals_eager_attention_and_keeps_its_top_per_image(qwen):
    """Qwen2's attention (q/k biases, M-RoPE folded into cos/sin) through the shared one-row helper."""
    model = qwen.model
    inputs = _inputs(qwen.processor, BATCH)
    layer = model.model.language_model.layers[0]
    captured = {}

    def grab(m, args, kwargs):
        captured["hidden"], captured["rotary"] = args[0], kwargs["position_embeddings"]

    model.set_attn_implementation("eager")
    try:
        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
            row = last_token_attention(layer, captured["hidden"], captured["rotary"], inputs["attention_mask"])
        handle.remove()
        with prune(model, "fastv", budget=6, **_params(qwen, "fastv")) as run, torch.no_grad():
            model(**inputs)
    finally:
        model.set_attn_implementation("sdpa")
    reference = out.attentions[0][:, :, -1].mean(1)  # (B, T), heads averaged
    assert torch.allclose(row, reference, atol=1e-6)
    for (b, columns), record in zip(_media(model, inputs), run.images):
        assert torch.equal(record.kept, torch.topk(reference[b, columns], 6).indices.sort().values)
