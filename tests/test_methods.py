"""Every registered method against the contracts of the LLaVA adapter, with its parameters from
`default_methods.DEFAULT_METHODS` (a registered method missing there fails).

Runs on a tiny randomly initialised `LlavaForConditionalGeneration` of the testbed's shape (576
visual tokens per image), through the public `prune(...)` context manager around `generate`.
"""

from types import SimpleNamespace

import pytest
import torch

import methods
from harness.adapters import prune
from harness.adapters.attention import last_token_attention
from harness.budget import BudgetError, check_budget, parse_budget, parse_budgets, tokens_to_keep
from harness.testbed import model as M
from harness.testbed import questions as Q
from harness.testbed import world as W
from methods.base import Method, VisualContext, top_k
from methods.codebook_files import save as save_codebook

from default_methods import DEFAULT_METHODS, default_params, lvpruning_modules

N = W.GRID * W.GRID


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = M.build_model(M.TINY)
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def tiny_codebook(tiny, tmp_path_factory):
    """The codebook methods' codebook, in the tiny model's projector space: 20 of its own tokens, perturbed."""
    model, processor = tiny
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("codebook") / "codebook.pt"
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=_inputs(processor, SAMPLES[:1])["pixel_values"])
    tokens = torch.cat(list(tokens.pooler_output))  # the projector outputs, per image
    picked = tokens[torch.randperm(len(tokens))[:20]]
    save_codebook(path, picked + 0.05 * picked.std() * torch.randn_like(picked), ["test"] * 20, {})
    return path


@pytest.fixture(scope="module")
def tiny_modules(tiny, tmp_path_factory):
    """LVPruning's modules for the tiny model (2 decoder layers: stages before layers 0 and 1), random."""
    return lvpruning_modules(tmp_path_factory.mktemp("lvpruning") / "modules.safetensors", tiny[0].config)


def _inputs(processor, samples):
    texts = [M.format_prompt(s["question"], len(s["scenes"])) for s in samples]
    images = [[W.render_pil(sc) for sc in s["scenes"]] for s in samples]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _generate(model, inputs, new_tokens=3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.scores, 1)


SAMPLES = [Q.make_sample("test", "color", 0), Q.make_sample("test", "spatial", 1),
           Q.make_sample("test", "exist", 2), Q.make_sample("test", "text", 3)]


def test_default_methods_name_every_registered_method():
    assert list(DEFAULT_METHODS) == methods.names()


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_a_budget_that_keeps_every_token_gives_the_unpruned_outputs(tiny, tiny_codebook, tiny_modules, name):
    model, processor = tiny
    inputs = _inputs(processor, SAMPLES[:2])
    ref_tokens, ref_scores = _generate(model, inputs)
    params = default_params(name, tiny_codebook, tiny_modules)
    if methods.get(name, **params).adaptive:
        params["tau"] = 1.0  # a threshold above every similarity keeps every token
    with prune(model, name, budget=N, **params) as run:
        tokens, scores = _generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)
    assert [len(r.kept) for r in run.images] == [N, N]


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_the_model_is_unchanged_after_the_block(tiny, tiny_codebook, tiny_modules, name):
    model, processor = tiny
    inputs = _inputs(processor, SAMPLES[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _generate(model, inputs)
    hooks = lambda: [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()]  # noqa: E731
    hooks_before = hooks()
    with prune(model, name, budget=32, **default_params(name, tiny_codebook, tiny_modules)):
        _generate(model, inputs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hooks() == hooks_before  # every hook of ours removed, transformers' own untouched
    tokens, scores = _generate(model, inputs)
    assert torch.equal(tokens, ref[0]) and torch.equal(scores, ref[1])


@pytest.mark.parametrize("name", [n for n in DEFAULT_METHODS if methods.get(n).uses_budget])
def test_pruning_removes_tokens_and_changes_the_forward(tiny, tiny_codebook, tiny_modules, name):
    model, processor = tiny
    inputs = _inputs(processor, SAMPLES[:1])
    lengths = []
    final_norm = model.model.language_model.norm  # after every decoder layer
    handle = final_norm.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            full = model(**inputs).logits[0, -1]
            with prune(model, name, budget=32, **default_params(name, tiny_codebook, tiny_modules)) as run:
                pruned = model(**inputs).logits[0, -1]
    finally:
        handle.remove()
    assert lengths[1] == lengths[0] - (N - 32)  # the LLM's output has 544 fewer positions
    assert [len(r.kept) for r in run.images] == [32]
    assert not torch.allclose(full, pruned)


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_a_padded_batch_of_four_equals_four_single_runs(tiny, tiny_codebook, tiny_modules, name):
    model, processor = tiny
    batch_inputs = _inputs(processor, SAMPLES)  # different prompt lengths: left padding
    assert (batch_inputs["attention_mask"] == 0).any()
    with prune(model, name, budget=48, **default_params(name, tiny_codebook, tiny_modules)) as run:
        tokens, scores = _generate(model, batch_inputs)
        batch_kept = [r.kept for r in run.images]
        singles = [_generate(model, _inputs(processor, [s])) for s in SAMPLES]
        single_kept = [r.kept for r in run.images[len(SAMPLES):]]
    for i, (t, s) in enumerate(singles):
        assert torch.equal(tokens[i], t[0])
        assert torch.allclose(scores[i], s[0], atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(batch_kept, single_kept))


def test_several_images_in_one_prompt(tiny):
    model, processor = tiny
    sample = Q.make_sample("test", "multi_image", 0)
    inputs = _inputs(processor, [sample])
    with prune(model, "random", budget=24) as run:
        _generate(model, inputs)
    assert [len(r.kept) for r in run.images] == [24] * len(sample["scenes"])
    assert len({tuple(r.kept.tolist()) for r in run.images}) == len(sample["scenes"])  # seeded per image


def _context(n=N, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    vision = torch.randn(n, 8, generator=g)
    proj = torch.nn.Linear(8, d)
    text = torch.randn(5, d, generator=g)
    return VisualContext(features=feats, grid=(24, 24), image_seed=lambda: seed, vision_features=vision, project=proj,
                         cls_attention=lambda: torch.rand(n, generator=torch.Generator().manual_seed(1)),
                         vision_keys=lambda: vision, attention_row=torch.rand(n, generator=g), text_features=text)


@pytest.fixture
def context_codebook(tmp_path):
    """A codebook in `_context()`'s feature space: 10 of its tokens, perturbed."""
    path = tmp_path / "cb.pt"
    save_codebook(path, _context().features[:10] + 0.1 * torch.randn(10, 16), ["t"] * 10, {})
    return path


@pytest.fixture(scope="module")
def context_modules(tmp_path_factory):
    """LVPruning modules of `_context()`'s width (16) for a 2-layer decoder, random."""
    config = SimpleNamespace(hidden_size=16, num_hidden_layers=2)
    return lvpruning_modules(tmp_path_factory.mktemp("context-lvpruning") / "modules.safetensors", config)


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_kept_indices_are_sorted_distinct_and_the_top_scored_ones(name, context_codebook, context_modules):
    ctx = _context()
    method = methods.get(name, **default_params(name, context_codebook, context_modules))
    k = 64 if method.uses_budget else N
    kept = method.select(ctx, k).kept
    assert torch.equal(kept, kept.unique())  # unique() sorts
    if method.adaptive:  # it decides how many: some, not all, of these random tokens
        assert 0 < len(kept) < N
        return
    assert len(kept) == k
    if type(method).select is Method.select:  # score-based: the top-k scores, exactly
        top = torch.topk(method.score(ctx), k).indices.sort().values
        assert torch.equal(kept, top)


def test_top_k_breaks_ties_towards_the_lower_index_and_sorts():
    scores = torch.tensor([0.0, 2.0, 1.0, 2.0, 2.0, 1.0])
    assert top_k(scores, 2).tolist() == [1, 3]
    assert top_k(scores, 4).tolist() == [1, 2, 3, 4]
    assert top_k(scores, 0).tolist() == [] and top_k(scores, 6).tolist() == list(range(6))


def test_divprune_is_greedy_max_min():
    from methods.divprune import greedy_max_min

    ctx = _context(n=50)
    order = greedy_max_min(ctx.features, 10)
    x = torch.nn.functional.normalize(ctx.features, dim=-1)
    dist = 1 - x @ x.T
    nearest_other = (dist + torch.eye(50) * 9).min(dim=1).values
    assert int(order[0]) == int(nearest_other.argmax())
    for step in range(1, 10):
        chosen = order[:step]
        to_set = dist[:, chosen].min(dim=1).values
        to_set[chosen] = -1
        assert int(order[step]) == int(to_set.argmax())


def test_uniform_lattice_spreads_over_the_grid():
    from methods.uniform import lattice

    kept = lattice(24, 24, 64)
    rows, cols = kept // 24, kept % 24
    assert len(kept) == 64 and rows.unique().numel() == 8 and cols.unique().numel() == 8
    assert [len(lattice(24, 24, k)) for k in (1, 5, 192, 575, 576)] == [1, 5, 192, 575, 576]


def test_fastv_attention_row_equals_eager_attention(tiny):
    """FastV's row, computed from layer K-1's queries and keys, equals what eager attention returns;
    and the tokens FastV keeps are the top of that reference row."""
    model, processor = tiny
    inputs = _inputs(processor, SAMPLES[:2])  # left-padded
    model.set_attn_implementation("eager")
    try:
        captured = {}
        layer = model.model.language_model.layers[0]

        def grab(m, args, kwargs):
            captured["hidden"], captured["pe"] = args[0], kwargs["position_embeddings"]

        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
            row = last_token_attention(layer, captured["hidden"], captured["pe"], inputs["attention_mask"])
        handle.remove()
        reference = out.attentions[0][:, :, -1].mean(1)  # (B, T), heads averaged
        assert torch.allclose(row, reference, atol=1e-6)
        with prune(model, "fastv", budget=64, **default_params("fastv")) as run:
            with torch.no_grad():
                model(**inputs)
    finally:
        model.set_attn_implementation("sdpa")
    image = inputs["input_ids"] == model.config.image_token_id
    for b, record in enumerate(run.images):
        scores = reference[b][image[b]]
        assert torch.equal(record.kept, torch.topk(scores, 64).indices.sort().values)


def test_budgets():
    assert tokens_to_keep(None, 576) == 576 and tokens_to_keep(64, 576) == 64
    assert tokens_to_keep(0.25, 576) == 144 and tokens_to_keep(0.0001, 576) == 1
    accepted = r"accepted: an integer 1\.\.576 \(visual tokens kept per image\) or a fraction in \(0, 1\]"
    for bad, match in [(0, "budget 0 keeps no token"), (-3, "budget -3 keeps no token"),
                       (577, "budget 577 is above the 576 visual tokens"), (1.5, r"1\.5 is a fraction outside \(0, 1\]"),
                       (float("nan"), "nan is a fraction outside"), ("64", "'64' is not a number"),
                       (True, "True is not a number")]:
        with pytest.raises(BudgetError, match=f"{match}.*; {accepted}$"):
            check_budget(bad, 576)


def test_budgets_are_parsed_and_checked_as_typed():
    assert parse_budgets("192, 128,0.25,192") == [192, 128, 0.25] and parse_budgets(" ") == []
    assert parse_budget("full") is None and parse_budget(64) == 64
    for text, match in [("0", "budget 0 keeps no token"), ("-1", "budget -1 keeps no token"),
                        ("1.5", "budget 1.5 is a fraction outside"), ("abc", "budget 'abc' is not a number"),
                        ("64,x", "budget 'x' is not a number")]:
        with pytest.raises(BudgetError, match=f"{match}.*; accepted: an integer at least 1 "):
            parse_budgets(text)
    assert parse_budgets("577") == [577]  # above this model's tokens: only the model can say (runner)


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_a_budget_of_zero_selects_nothing(name, context_codebook, context_modules):
    ctx = _context()
    method = methods.get(name, **default_params(name, context_codebook, context_modules))
    if not method.uses_budget or method.adaptive:
        pytest.skip(f"{name} decides how many tokens it keeps")
    kept = method.select(ctx, 0).kept
    assert kept.dtype == torch.long and kept.shape == (0,)


@pytest.mark.parametrize("name", ["gprune", "divprune", "lofi", "fastv", "random", "lvpruning"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_refused_before_the_method_sees_them(tiny, tiny_modules, name, bad):
    """A NaN (or inf) row, as an fp16 overflow makes: one clear error naming the image, the method
    and the dtype, from the adapter, before any method chooses from it."""
    from harness.adapters import NonFiniteFeatures

    model, processor = tiny
    inputs = _inputs(processor, SAMPLES[:2])
    # One token's projector output (FastV: the hidden state entering layer K-1 = 0, the same row; LVPruning's
    # first stage: the hidden state entering layer 0).
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, out: out.index_fill(1, torch.tensor([5]), bad))
    try:
        with pytest.raises(NonFiniteFeatures, match=rf"image 0 of the batch: the features handed to {name} hold "
                                                     r"\d+ non-finite value\(s\) \(NaN or inf\) of \d+, in float32"):
            with prune(model, name, budget=64, **default_params(name, modules=tiny_modules)):
                _generate(model, inputs)
    finally:
        handle.remove()


def test_bad_inputs_are_clear_errors(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods: none, random"):
        prune(model, "nope").__enter__()
    with pytest.raises(ValueError, match="has no parameter.*accepts"):
        methods.get("fastv", ratio=0.5)
    with pytest.raises(ValueError, match="above the 576 visual tokens"):
        prune(model, "random", budget=1000).__enter__()
    with pytest.raises(ValueError, match="layer K must be in 1..1"):
        prune(model, "fastv", budget=64).__enter__()  # K = 2 on a 2-layer model
    with pytest.raises(ValueError, match="position_policy must be one of renumber, original"):
        methods.get("random", position_policy="shuffled")
    with pytest.raises(ValueError, match="seed must be in"):
        methods.get("random", seed=-1)


def test_ipr_of_known_spectra():
    from harness.metrics.ipr import ipr

    assert ipr(torch.ones(5, 3)) == pytest.approx(1.0)  # rank one
    assert ipr(torch.eye(4)) == pytest.approx(0.25)  # flat spectrum of rank 4
    x = torch.diag(torch.tensor([2.0, 1.0]))
    assert ipr(x) == pytest.approx((4 / 5) ** 2 + (1 / 5) ** 2)


def test_delta_ipr_is_recorded_per_image(tiny):
    model, processor = tiny
    with prune(model, "random", budget=N) as run:
        _generate(model, _inputs(processor, SAMPLES[:1]))
    assert run.images[0].extra["delta_ipr"] == pytest.approx(0.0, abs=1e-6)  # every token kept
    with prune(model, "random", budget=16) as run:
        _generate(model, _inputs(processor, SAMPLES[:1]))
    assert run.images[0].extra["delta_ipr"] != 0.0
