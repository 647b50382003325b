"""The LLaVA-OneVision adapter (harness/adapters/llava_onevision.py) on a tiny random
`LlavaOnevisionForConditionalGeneration` (harness.testbed.tiny_families), through `prune(...)` around
`generate`, for every registered method but `cls_attention` (refused: SigLIP has no [CLS]).

The equivalence test is the adapter's proof: a pruned generate equals the unpruned model's own
language-model inputs cut by hand to the kept columns (text, every newline, the kept visual tokens:
run.images' kept indices mapped to columns by this file's own layout, computed from the processor's
image sizes with transformers' anyres functions, not by the adapter's reading of the sequence), then
the language model and lm_head run layer by layer and decoded greedily by hand with the cache.
"""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

import methods
from harness.adapters import prune
from harness.adapters.llava_onevision import PruningRun
from harness.adapters.processing import OnevisionStandIn
from harness.testbed import tiny_families as tf
from methods.base import Method, Selection
from methods.codebook_files import save as save_codebook

from default_methods import SINGLE_STAGE as DEFAULT_METHODS, default_params  # multi-stage: test_families

REFUSED = "cls_attention"
RUNNABLE = [name for name in DEFAULT_METHODS if name != REFUSED]
SIDE = 6  # 84 px / patch 14: a view's tokens a side
POOLED = 3  # a frame's side after 2x2 pooling
STEPS = 3  # generated tokens
#: (width, height): a 2x2 grid of whole crops; rows cut (4 crops of 4 x 6); columns cut (2 crops of 6 x 4)
IMAGE_SIZES = [(336, 336), (336, 200), (100, 300)]


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def prompt(processor, kinds, text="what is it?") -> str:
    content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def tiny():
    return tf.build("llava_onevision")


@pytest.fixture(scope="module")
def batches(tiny):
    """Processor outputs: a 4-frame video alone; three images of different sizes (a 2x2 grid, rows cut,
    columns cut), left-padded; and two images in one prompt (base views), a video, an image."""
    _, processor = tiny
    frames = [picture(10 + f, 336, 336) for f in range(4)]
    video = processor(text=[prompt(processor, ["video"])], videos=[frames], return_tensors="pt")
    images = processor(text=[prompt(processor, ["image"], "q" * (5 * i + 1)) for i in range(3)],
                       images=[[picture(i, *size)] for i, size in enumerate(IMAGE_SIZES)], return_tensors="pt",
                       padding=True)
    mixed = processor(text=[prompt(processor, ["image", "image"]), prompt(processor, ["video"], "why?"),
                            prompt(processor, ["image"], "which one?")],
                      images=[[picture(20, 336, 336), picture(21, 200, 120)], [], [picture(22, 150, 336)]],
                      videos=[frames], return_tensors="pt", padding=True)
    return {"video": video, "images": images, "mixed": mixed}


@pytest.fixture(scope="module")
def unpruned(tiny, batches):
    return {key: unpruned_run(tiny[0], inputs) for key, inputs in batches.items()}


@pytest.fixture(scope="module")
def codebook(tiny, batches, tmp_path_factory):
    """A codebook in the LLM's width (the projector's space): 20 of the model's own image tokens, perturbed."""
    model, _ = tiny
    inputs = batches["images"]
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    tokens = torch.cat(list(tokens.pooler_output))
    generator = torch.Generator().manual_seed(0)
    picked = tokens[torch.randperm(len(tokens), generator=generator)[:20]]
    path = tmp_path_factory.mktemp("codebook") / "codebook.pt"
    save_codebook(path, picked + 0.05 * picked.std() * torch.randn(picked.shape, generator=generator),
                  ["test"] * 20, {})
    return path


# ------------------------------------------------------------------ the layout, computed independently
def layout(model, inputs, scope="image") -> list[dict]:
    """Each image / video in the order the batch holds them: its row, its parts' columns (base view then
    the grid (scope "image") or its crops in crop order (scope "part"); a video's frames) and its newline
    columns, from the processor's image sizes."""
    config = model.config
    ids = inputs["input_ids"]
    media = []
    sizes = inputs.get("image_sizes")
    if sizes is not None:
        per_prompt = inputs["batch_num_images"].tolist()
        alone = [n == 1 for n in per_prompt for _ in range(n)]
        queue = list(zip(sizes.tolist(), alone))
        for row in range(len(ids)):
            columns = (ids[row] == config.image_token_id).nonzero().flatten()
            while len(columns):
                size, patched = queue.pop(0)
                base, rest = columns[:SIDE * SIDE], columns[SIDE * SIDE:]
                if not patched:
                    media.append({"row": row, "parts": [base], "newlines": rest[:1]})
                    columns = rest[1:]
                    continue
                nh, nw = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
                canvas = torch.arange(nh * SIDE * nw * SIDE).view(1, nh * SIDE, nw * SIDE)
                kept = unpad_image(canvas, size)[0]  # the canvas cells the grid holds
                rows, cols = kept.shape
                grid = rest[:rows * (cols + 1)].view(rows, cols + 1)
                crop = (kept // (nw * SIDE) // SIDE) * nw + (kept % (nw * SIDE)) // SIDE
                if scope == "part":
                    parts = [base] + [grid[:, :cols][crop == c] for c in crop.unique().tolist()]
                else:
                    parts = [base, grid[:, :cols].flatten()]
                media.append({"row": row, "parts": parts, "newlines": grid[:, cols]})
                columns = rest[rows * (cols + 1):]
        assert not queue
    videos = inputs.get("pixel_values_videos")
    if videos is not None:
        frames = videos.shape[1]
        for row in range(len(ids)):
            columns = (ids[row] == config.video_token_id).nonzero().flatten()
            for v in range(len(columns) // (frames * POOLED ** 2 + 1)):
                video = columns[v * (frames * POOLED ** 2 + 1):(v + 1) * (frames * POOLED ** 2 + 1)]
                media.append({"row": row, "parts": list(video[:-1].view(frames, -1)), "newlines": video[-1:],
                              "video": True})
    return sorted(media, key=lambda m: (m["row"], int(m["parts"][0][0])))


def kept_columns(media: list[dict], run) -> list[torch.Tensor]:
    """The columns each image's kept indices (run.images) stand for."""
    assert len(run.images) == len(media)
    out = []
    for record, medium in zip(run.images, media):
        columns = torch.cat(medium["parts"])
        assert record.row == medium["row"] and record.tokens_in == len(columns)
        out.append(columns[record.kept])
    return out


# ------------------------------------------------------------------ generation, with hooks and by hand
def generate(model, inputs, steps=STEPS):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def unpruned_run(model, inputs) -> dict:
    """The unpruned generation and its language model's prefill inputs, as generate() gives them."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        tokens, logits = generate(model, inputs)
    finally:
        hook.remove()
    kwargs = seen[0]
    embeds = kwargs["inputs_embeds"]
    mask = kwargs.get("attention_mask")
    mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask
    return {"embeds": embeds, "mask": mask, "positions": kwargs["position_ids"], "tokens": tokens, "logits": logits}


def hooks(model) -> list:
    return [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()]


def causal(mask2d: torch.Tensor, queries: int) -> torch.Tensor:
    """(B, 1, q, k) additive mask: the last `queries` columns attend to real columns at or before them."""
    keys = mask2d.shape[1]
    allowed = mask2d.bool()[:, None, None, :] & torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def by_hand(model, full: dict, keep: torch.Tensor, layer: int, policy: str, tokens: torch.Tensor):
    """Greedy decoding by hand: layers < `layer` read the whole prompt, layers >= `layer` only the columns
    `keep` (B, T) keeps (rows left-padded again); new tokens fed from `tokens` (generate's), positions
    renumbered or original. Returns the logits (B, steps, V) and the greedy choices."""
    lm = model.model.language_model
    batch = keep.shape[0]
    lengths = keep.sum(1)
    width = int(lengths.max())
    index = torch.zeros(batch, width, dtype=torch.long)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for b in range(batch):
        index[b, width - int(lengths[b]):] = keep[b].nonzero().flatten()
        valid[b, width - int(lengths[b]):] = True
    short_mask = full["mask"].gather(1, index) * valid
    if policy == "renumber":
        short_pos = (short_mask.cumsum(-1) - 1).clamp(min=0)
    else:
        short_pos = full["positions"].gather(1, index)
    streams = {"full": (full["mask"], full["positions"]), "short": (short_mask, short_pos)}
    cache = DynamicCache(config=lm.config)
    hidden = full["embeds"]
    logits, choices = [], []
    with torch.no_grad():
        for step in range(tokens.shape[1] + 1):
            for i, decoder_layer in enumerate(lm.layers):
                if step == 0 and i == layer:
                    hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
                mask, pos = streams["full" if i < layer else "short"]
                here = pos[:, -hidden.shape[1]:]
                hidden = decoder_layer(hidden, attention_mask=causal(mask, hidden.shape[1]), position_ids=here,
                                       past_key_values=cache, use_cache=True,
                                       position_embeddings=lm.rotary_emb(hidden, here))
            out = model.lm_head(lm.norm(hidden[:, -1]))
            logits.append(out)
            choices.append(out.argmax(-1))
            if step == tokens.shape[1]:
                break
            hidden = model.get_input_embeddings()(tokens[:, step:step + 1])
            for name, (mask, pos) in streams.items():
                streams[name] = (torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1),
                                 torch.cat([pos, pos[:, -1:] + 1], 1))
    return torch.stack(logits[:-1], 1), torch.stack(choices[:-1], 1)


def check_equivalence(model, inputs, full, name, budget, codebook, budget_scope="image"):
    """Pruned generate == the kept columns of the unpruned LM inputs `full`, by hand; the model unchanged after."""
    method = methods.get(name, **default_params(name, codebook))
    media = layout(model, inputs, budget_scope)
    state, before = {k: v.clone() for k, v in model.state_dict().items()}, hooks(model)
    with prune(model, method, budget, budget_scope=budget_scope) as run:
        tokens, logits = generate(model, inputs)
    assert hooks(model) == before, "a hook outlived the block"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    ids = inputs["input_ids"]
    visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
    keep = ~visual
    for medium, columns in zip(media, kept_columns(media, run)):
        keep[medium["row"], medium["newlines"]] = True
        keep[medium["row"], columns] = True
    if method.uses_budget and not method.adaptive:
        assert int(keep.sum()) < keep.numel()  # something was pruned
    layer = getattr(method, "layer", 0) if method.stage == "in_llm" else 0
    ref_logits, ref_choices = by_hand(model, full, keep, layer, method.position_policy, tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    eos = (tokens == model.generation_config.eos_token_id).long()
    live = (eos.cumsum(1) - eos) == 0  # up to each row's end of text (then generate pads)
    assert torch.equal(tokens[live], ref_choices[live])
    return run, media, tokens, logits


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", RUNNABLE)
def test_a_pruned_video_generates_what_its_kept_tokens_give_by_hand(tiny, batches, unpruned, codebook, name):
    model, _ = tiny
    run, *_ = check_equivalence(model, batches["video"], unpruned["video"], name, 2, codebook)
    if name != "none" and not methods.get(name, **default_params(name, codebook)).adaptive:
        assert [len(r.kept) for r in run.images] == [4 * 2]  # 2 tokens in each of the 4 frames
    tokens, logits = generate(model, batches["video"])  # after the block: the unpruned model's own outputs
    assert torch.equal(tokens, unpruned["video"]["tokens"]) and torch.equal(logits, unpruned["video"]["logits"])


@pytest.mark.parametrize("name", RUNNABLE)
def test_a_left_padded_batch_of_images_generates_what_its_kept_tokens_give_by_hand_and_each_row_alone(
        tiny, batches, unpruned, codebook, name):
    model, processor = tiny
    _, _, tokens, logits = check_equivalence(model, batches["images"], unpruned["images"], name, 0.25, codebook)
    for i, size in enumerate(IMAGE_SIZES):  # batch of 3 == each row alone
        alone = processor(text=[prompt(processor, ["image"], "q" * (5 * i + 1))], images=[picture(i, *size)],
                          return_tensors="pt")
        with prune(model, name, 0.25, **default_params(name, codebook)):
            row_tokens, row_logits = generate(model, alone)
        assert torch.equal(row_tokens[0], tokens[i])
        torch.testing.assert_close(row_logits[0], logits[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["random", "fastv", "divprune"])
def test_images_among_several_and_a_video_in_one_batch_generate_what_their_kept_tokens_give(
        tiny, batches, unpruned, codebook, name):
    model, _ = tiny
    run, media, *_ = check_equivalence(model, batches["mixed"], unpruned["mixed"], name, 3, codebook,
                                       budget_scope="part")
    assert [len(m["parts"]) for m in media] == [1, 1, 4, 3]  # two base views; 4 frames; base + 2 crops
    assert [len(r.kept) for r in run.images] == [3, 3, 12, 9]


def test_newlines_are_never_dropped_and_a_video_keeps_its_budget_in_every_frame(tiny, batches):
    model, _ = tiny
    inputs = batches["mixed"]
    media = layout(model, inputs)
    newline = model.model.image_newline
    seen = []
    for scope in ("image", "part"):
        with prune(model, "uniform", 1, budget_scope=scope) as run:
            hook = model.model.language_model.register_forward_pre_hook(
                lambda m, a, k: seen.append(k["inputs_embeds"]) if not seen else None, with_kwargs=True)
            try:
                generate(model, inputs, steps=1)
            finally:
                hook.remove()
        pruned = seen.pop()
        expected = [sum(len(m["newlines"]) for m in media if m["row"] == row) for row in range(3)]
        assert (pruned == newline).all(-1).sum(-1).tolist() == expected == [2, 1, 12]
        video = run.images[2]
        assert sorted(set((video.kept // POOLED ** 2).tolist())) == [0, 1, 2, 3] and len(video.kept) == 4
    assert PruningRun.visual_tokens_per_row(model, inputs) == [sum(sum(len(p) for p in m["parts"]) for m in media
                                                                   if m["row"] == row) for row in range(3)]


@pytest.mark.parametrize("name", ["random", "uniform"])
def test_crops_as_parts_generate_what_their_kept_tokens_give_by_hand(tiny, batches, unpruned, codebook, name):
    model, _ = tiny
    check_equivalence(model, batches["images"], unpruned["images"], name, 5, codebook, budget_scope="part")


def test_a_budget_splits_over_the_base_view_and_the_grid_or_applies_to_each_crop(tiny, batches):
    model, _ = tiny
    inputs = batches["images"]
    whole, crops = layout(model, inputs, "image"), layout(model, inputs, "part")
    assert [[len(p) for p in m["parts"]] for m in whole] == [[36, 144], [36, 96], [36, 48]]
    assert [[len(p) for p in m["parts"]] for m in crops] == [[36] * 5, [36] + [24] * 4, [36, 24, 24]]
    for scope, media, expected in (("image", whole, [5, 5, 5]), ("part", crops, [25, 25, 15])):
        with prune(model, "random", 5, budget_scope=scope) as run:
            generate(model, inputs, steps=1)
        assert [r.extra["part_sizes"] for r in run.images] == [[len(p) for p in m["parts"]] for m in media]
        assert [len(r.kept) for r in run.images] == expected
        assert {r.extra["budget_scope"] for r in run.images} == {scope}


@dataclass
class Probe(Method):
    """Keeps the first k tokens and records what each part's context holds."""

    seen: list = field(default_factory=list, repr=False)

    def select(self, ctx, k):
        vision = ctx.vision_features
        projected = None if vision is None else ctx.project(vision)
        self.seen.append((ctx.grid, ctx.num_tokens, projected is not None and torch.allclose(
            projected, ctx.features, atol=1e-6), ctx.image_seed()))
        return Selection(torch.arange(k))


@pytest.mark.parametrize("scope", ["image", "part"])
def test_vision_features_are_each_tokens_projector_input_and_frames_have_none(tiny, batches, scope):
    model, _ = tiny
    probe = Probe()
    with prune(model, probe, 1, budget_scope=scope):
        generate(model, batches["mixed"], steps=1)
    grids = [grid for grid, *_ in probe.seen]
    crops = [(6, 6), (6, 6)] if scope == "part" else [(12, 6)]
    assert grids == [(6, 6), (6, 6)] + [(3, 3)] * 4 + [(6, 6)] + crops
    assert [matched for _, _, matched, _ in probe.seen] == [True, True] + [False] * 4 + [True] * (1 + len(crops))
    assert len({seed for *_, seed in probe.seen}) == len(probe.seen)  # pixels and part: every part its own draw


def test_a_reduced_grid_is_one_part(tiny, batches, monkeypatch):
    """anyres_max_1: the 12 x 12 grid is pooled to 6 x 6 (crops gone): base view + one part."""
    model, processor = tiny
    monkeypatch.setattr(model.config, "vision_aspect_ratio", "anyres_max_1")
    reduced = OnevisionStandIn(processor.image_processor, processor.tokenizer, processor.video_processor,
                                    chat_template=processor.chat_template, num_image_tokens=36,
                                    vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")
    inputs = reduced(text=[prompt(reduced, ["image"])], images=[picture(0, 336, 336)], return_tensors="pt")
    assert PruningRun.visual_tokens_per_row(model, inputs) == [36 + 36]
    with prune(model, "random", 5, budget_scope="part") as run:
        generate(model, inputs, steps=1)
    assert run.images[0].tokens_in == 72 and len(run.images[0].kept) == 10


@pytest.mark.parametrize("name", RUNNABLE)
def test_a_budget_that_keeps_every_token_gives_the_unpruned_outputs(tiny, batches, unpruned, codebook, name):
    model, _ = tiny
    inputs = batches["mixed"]
    ref_tokens, ref_logits = unpruned["mixed"]["tokens"], unpruned["mixed"]["logits"]
    params = default_params(name, codebook)
    if methods.get(name, **params).adaptive:
        params["tau"] = 1.0  # a threshold above every similarity keeps every token
    with prune(model, name, 1.0, **params) as run:
        tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert [len(r.kept) for r in run.images] == [r.tokens_in for r in run.images] == [36, 36, 36, 108]


def test_cls_attention_is_refused_in_one_line_before_any_hook(tiny):
    model, _ = tiny
    before = hooks(model)
    with pytest.raises(ValueError) as error, prune(model, REFUSED, 8):
        pass
    message = str(error.value)
    assert "\n" not in message and message.startswith("cls_attention cannot run on llava_onevision: ")
    assert "[CLS]" in message and hooks(model) == before
    with pytest.raises(ValueError, match="cls_attention cannot run on llava_onevision"):
        PruningRun.check(methods.get(REFUSED), model.config)  # what the runner asks before any cell
