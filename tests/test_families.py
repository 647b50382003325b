"""The contracts every family's adapter must pass, for every registered method: harness.adapters.FAMILIES
x tests/default_methods.DEFAULT_METHODS, on the tiny random model of each family
(harness.testbed.tiny_families.build), three testbed prompts of different lengths and image sizes.

1. A budget that keeps every token gives the unpruned outputs.
2. The model is unchanged after the `with prune(...)` block (weights bit for bit, no hook left).
3. A left-padded batch equals its prompts run one by one.
4. Pruning removes tokens, and `run.columns()` holds the kept visual columns and every other one.
5. The pruned run equals the model fed only the kept tokens by hand (`_by_hand`): the columns
   `run.stage_columns()` reports for each stage (pre-LLM and single-stage: `run.columns()`), their
   embeddings (a merging method's own at its merged columns), the mask and positions of
   `run.position_policy`, each group of decoder layers on its stage's columns, greedy decoding continued
   by hand. Which columns are the right ones is each family's own test; this one tests the sequence surgery.

A method a family refuses (`PruningRun.refusals`) must fail at `prune(...)` with a one-line
ValueError naming it, before any forward: the only accepted way not to run. Each (family, method)
runs its pruned generations once (`Zoo.pair`); the tests assert on what they recorded.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

import methods
from harness.adapters import FAMILIES, prune
from harness.budget import tokens_to_keep
from harness.testbed import questions as Q
from harness.testbed import tiny_families as T
from harness.testbed import world as W
from methods.codebook_files import save as save_codebook

from default_methods import DEFAULT_METHODS, default_params, lvpruning_modules

BUDGET = 0.25
NEW_TOKENS = 3
#: Three prompts of different lengths (left padding), images of different sizes (kept by Qwen's and
#: the anyres processors; LLaVA-1.5 resizes them all to 336).
PROMPTS = (("color", (336, 336)), ("spatial", (224, 336)), ("exist", (336, 168)))
#: Methods whose Selection replaces kept tokens' features (elsewhere the run's embeddings must be the inputs').
MERGING = {"cls_attention"}
ONE_PART = ("llava", "qwen2_vl", "qwen2_5_vl")  # every image is one part: budget scopes agree
PAIRS = [(f, m) for f in FAMILIES for m in DEFAULT_METHODS]
PAIR_IDS = [f"{f}-{m}" for f, m in PAIRS]


def _inputs(processor, indices):
    texts, images = [], []
    for i in indices:
        kind, size = PROMPTS[i]
        sample = Q.make_sample("test", kind, i)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.append([W.render_pil(sample["scenes"][0]).resize(size)])
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def _hooks(model):
    return [(n, list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()]


def _generate(model, inputs):
    """(tokens, scores, the language model's inputs at each step) of greedy decoding; the capture hook
    is registered now, so inside a `prune` block it sees what the adapter's hooks hand the LM."""
    calls = []

    def capture(module, args, kwargs):
        calls.append({k: kwargs.get(k).detach().clone() if kwargs.get(k) is not None else None
                      for k in ("inputs_embeds", "attention_mask", "position_ids")})

    handle = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    finally:
        handle.remove()
    return SimpleNamespace(tokens=out.sequences[:, inputs["input_ids"].shape[1]:], scores=torch.stack(out.scores, 1),
                           calls=calls)


class Family:
    """One family's tiny model, inputs, codebook and unpruned reference (built once)."""

    def __init__(self, name, folder):
        self.name = name
        self.model, self.processor = T.build(name)
        self.adapter = FAMILIES[name].PruningRun
        self.batch = _inputs(self.processor, range(3))
        self.singles = [_inputs(self.processor, [i]) for i in range(3)]
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.ref = _generate(self.model, self.batch)
        self.ref_singles = [_generate(self.model, s) for s in self.singles]
        self.hooks = _hooks(self.model)  # after a forward: transformers adds its own output-capture hooks then
        self.codebook = self._codebook(folder / f"{name}.pt")
        #: LVPruning's random modules: a stage before each decoder layer (2 for the LLaVA families, 3 for Qwen's)
        self.modules = lvpruning_modules(folder / f"{name}-lvpruning.safetensors", self.model.config)

    def _codebook(self, path):
        """20 of the model's own visual tokens as the LM reads them (LLM width), perturbed."""
        embeds = self.ref.calls[0]["inputs_embeds"]
        tokens = embeds[_visual(self.model, self.batch["input_ids"])]
        g = torch.Generator().manual_seed(0)
        picked = tokens[torch.randperm(len(tokens), generator=g)[:20]]
        noise = torch.randn(picked.shape, generator=g)
        return save_codebook(path, picked + 0.05 * picked.std() * noise, ["test"] * 20, {})

    def params(self, name):
        return default_params(name, self.codebook, self.modules)


def _visual(model, input_ids):
    """(B, T) the image / video token columns."""
    out = torch.zeros_like(input_ids, dtype=torch.bool)
    for attr in ("image_token_id", "video_token_id"):
        token = getattr(model.config, attr, None)
        if token is not None:
            out |= input_ids == token
    return out


def _pruned(model, name, params, inputs, budget=BUDGET, **kwargs):
    """What one pruned generation shows (read inside the block: `columns()` is gone after it)."""
    with prune(model, name, budget, **params, **kwargs) as run:
        out = _generate(model, inputs)
        columns = run.columns()
        out.columns = None if columns is None else columns.clone()
        out.stage_columns = [c.clone() for c in run.stage_columns()]
        out.images = [SimpleNamespace(row=r.row, tokens_in=r.tokens_in, kept=r.kept.clone(),
                                      stage_tokens=list(r.extra.get("stage_tokens", [len(r.kept)])))
                      for r in run.images]
        out.policy, out.stage, out.layer, out.stages = run.position_policy, run.method.stage, run.layer, run.stages
    return out


class Zoo:
    """Families and (family, method) runs, each made once; a failure is kept and raised again."""

    def __init__(self, folder):
        self.folder = folder
        self._made = {}

    def _once(self, key, make):
        if key not in self._made:
            try:
                self._made[key] = (True, make())
            except Exception as e:  # noqa: BLE001 - kept and re-raised in every test that needs it
                self._made[key] = (False, e)
        ok, value = self._made[key]
        if not ok:
            raise value
        return value

    def family(self, name) -> Family:
        return self._once(name, lambda: Family(name, self.folder))

    def pair(self, family, name):
        """Every pruned generation of `name` on `family`'s model, then the model's state."""
        fam = self.family(family)

        def make():
            model, params = fam.model, fam.params(name)
            full = dict(params)
            if methods.get(name, **params).adaptive:
                full["tau"] = 1.0  # a threshold above every similarity keeps every token
            rec = SimpleNamespace(full=_pruned(model, name, full, fam.batch, budget=1.0),
                                  batch=_pruned(model, name, params, fam.batch),
                                  singles=[_pruned(model, name, params, s) for s in fam.singles])
            after = model.state_dict()
            rec.same_weights = fam.state.keys() == after.keys() and all(
                torch.equal(fam.state[k], after[k]) for k in fam.state)
            rec.hooks = _hooks(model)
            rec.after = _generate(model, fam.singles[0])  # unpruned again
            return rec

        return self._once((family, name), make)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, one_thread):
    return Zoo(tmp_path_factory.mktemp("families"))


def _runs(zoo, family, name):
    """The pair's runs, or None where the family refuses the method, having checked the refusal: a
    one-line ValueError naming the method at `prune(...)`, before any forward, with no hook left."""
    fam = zoo.family(family)
    if name not in fam.adapter.refusals:
        return zoo.pair(family, name)
    forwards = []
    handles = [m.register_forward_pre_hook(lambda *a: forwards.append(1)) for m in (fam.model, fam.model.model)]
    try:
        with pytest.raises(ValueError) as refused, prune(fam.model, name, BUDGET, **fam.params(name)):
            _generate(fam.model, fam.singles[0])
    finally:
        for h in handles:
            h.remove()
    message = str(refused.value)
    assert name in message and "\n" not in message, message
    assert forwards == [] and _hooks(fam.model) == fam.hooks
    return None


# ------------------------------------------------------------------------------------------ by hand
def _split(positions):
    """(text positions for the mask, rotary positions): Qwen's (4, B, T) carry the text row first."""
    if positions.ndim == 3 and positions.shape[0] == 4:
        return positions[0], positions[1:]
    return (None, positions) if positions.ndim == 3 else (positions, positions)


def _layers(lm, hidden, mask2d, positions, cache, layers):
    """Decoder `layers` (a range) in turn, with the mask and rotary embeddings of `mask2d` and `positions`; the
    mask is sized by the cache of the range's first layer (each group of layers has its own cache length)."""
    if not layers:
        return hidden
    text, rotary = _split(positions)
    mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask2d, past_key_values=cache,
                              position_ids=text, layer_idx=layers[0])
    embeddings = lm.rotary_emb(hidden, rotary)
    for i in layers:
        hidden = lm.layers[i](hidden, attention_mask=mask, position_ids=text, past_key_values=cache, use_cache=True,
                              position_embeddings=embeddings)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def _locate(before, before_valid, columns, valid):
    """(B, T_s) where each of a stage's `columns` sits among the previous stage's (`before`); asserts a stage
    keeps only columns the previous one kept (padding, `valid` False, may point anywhere: it is masked)."""
    match = (before[:, None, :] == columns[:, :, None]) & before_valid[:, None, :]
    assert bool(match.any(-1)[valid].all()), "a stage kept a column the previous stage had removed"
    return match.int().argmax(-1)


def _by_hand(model, full, stages, policy, layers=(0,), embeds=None, steps=NEW_TOKENS):
    """Greedy decoding of the model fed only the kept columns of the unpruned LM inputs `full` (inputs_embeds,
    attention_mask, position_ids), stage by stage: `stages` holds, for each stage s, (columns (B, T_s), valid
    (B, T_s)): the full-sequence columns its layers see, and which of them are the row's (the rest: the left
    padding pruning adds). Layers [0, K_1) run on the full sequence, [K_s, K_s+1) on stage s's columns (the last
    up to the decoder's end), with `layers` = (K_1, K_2, ...); pre-LLM is one stage at layer 0 (`embeds`: its
    gathered embeddings, merged ones in place). Each group has its own mask, positions (`original` gathered from
    the unpruned ones, every leading row; `renumber` contiguous from the stage's mask) and cache layers. A new
    token's position in a group is its prompt's last + 1 + step. Returns (tokens (B, n), logits (B, n, V)) as
    generate() gives them."""
    lm = model.model.language_model
    e_full, m_full, p_full = full["inputs_embeds"], full["attention_mask"], full["position_ids"]
    if m_full is None:  # generate() passes none for an unpadded batch
        m_full = torch.ones(e_full.shape[:2], dtype=torch.long)
    assert len(stages) == len(layers)
    bounds = list(layers) + [len(lm.layers)]
    groups = []  # per stage: (columns, valid, mask, positions, its layers)
    for s, (columns, valid) in enumerate(stages):
        mask = m_full.gather(1, columns) * valid
        if policy == "original":
            positions = p_full.gather(-1, columns.expand(*p_full.shape[:-2], -1, -1))
        else:
            assert p_full.ndim == 2, "M-RoPE positions are gathered, never renumbered"
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        groups.append((columns, valid, mask, positions, range(bounds[s], bounds[s + 1])))
    cache = DynamicCache(config=lm.config)
    batch, length = m_full.shape
    with torch.no_grad():
        hidden = _layers(lm, e_full, m_full, p_full, cache, range(layers[0]))
        before, before_valid = torch.arange(length).expand(batch, -1), torch.ones(batch, length, dtype=torch.bool)
        for s, (columns, valid, mask, positions, group) in enumerate(groups):
            where = _locate(before, before_valid, columns, valid)
            hidden = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))
            if s == 0 and embeds is not None:
                hidden = embeds
            hidden = _layers(lm, hidden, mask, positions, cache, group)
            before, before_valid = columns, valid
        logits = model.lm_head(lm.norm(hidden[:, -1]))
        config = model.generation_config
        eos = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
        unfinished = torch.ones(batch, dtype=torch.bool)
        tokens, scores = [], []
        for step in range(steps):
            token = torch.where(unfinished, logits.argmax(-1), torch.tensor(config.pad_token_id))
            tokens.append(token)
            scores.append(logits)
            unfinished &= ~torch.isin(token, eos)
            if step == steps - 1 or not unfinished.any():
                break
            hidden = model.get_input_embeddings()(token)[:, None]
            new = torch.ones(batch, step + 1, dtype=m_full.dtype)
            hidden = _layers(lm, hidden, torch.cat([m_full, new], 1), p_full[..., -1:] + 1 + step, cache,
                             range(layers[0]))
            for _, _, mask, positions, group in groups:
                hidden = _layers(lm, hidden, torch.cat([mask, new.to(mask.dtype)], 1), positions[..., -1:] + 1 + step,
                                 cache, group)
            logits = model.lm_head(lm.norm(hidden[:, -1]))
    return torch.stack(tokens, 1), torch.stack(scores, 1)


def _valids(run, length, visual_per_row):
    """For each stage, (B, T_s) the stage's columns that hold a column of the row (the rest: padding pruning
    added), from the records: a row's stage-s length is every column but the visual ones its images had
    dropped by then (tokens_in - stage_tokens[s])."""
    assert run.stage_columns and torch.equal(run.stage_columns[-1], run.columns)
    for r in run.images:
        assert len(r.stage_tokens) == len(run.stage_columns) and r.stage_tokens[-1] == len(r.kept)
    for b in range(len(run.columns)):
        assert sum(r.tokens_in for r in run.images if r.row == b) == visual_per_row[b]
    valids = []
    for s, columns in enumerate(run.stage_columns):
        valid = torch.zeros_like(columns, dtype=torch.bool)
        lengths = []
        for b in range(len(columns)):
            lengths.append(length - sum(r.tokens_in - r.stage_tokens[s] for r in run.images if r.row == b))
            valid[b, columns.shape[1] - lengths[-1]:] = True
        assert columns.shape[1] == max(lengths)  # as long as the stage's longest row, no longer
        assert not columns[~valid].any()  # the padding pruning adds holds column 0
        valids.append(valid)
    return valids


def _valid(run, length, visual_per_row):
    """(B, T') the last stage's columns (`run.columns`) that hold a column of the row."""
    return _valids(run, length, visual_per_row)[-1]


# ------------------------------------------------------------------------------------------ tests
def test_every_family_and_method_is_covered():
    assert list(DEFAULT_METHODS) == methods.names()
    assert set(FAMILIES) == set(T.KNOWN)
    for family in FAMILIES:
        assert set(FAMILIES[family].PruningRun.refusals) <= set(methods.names()), family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_by_hand_decoding_reproduces_the_unpruned_generation(zoo, family):
    """The test's own decoder, on every column and at every stage, is generate(): so a difference in
    the equivalence test is the adapter's."""
    fam = zoo.family(family)
    full = fam.ref.calls[0]
    batch, length = full["attention_mask"].shape
    every = (torch.arange(length).expand(batch, -1).contiguous(), torch.ones(batch, length, dtype=torch.bool))
    policies = ["original"] + (["renumber"] if full["position_ids"].ndim == 2 else [])
    depth = len(fam.model.model.language_model.layers)
    schedules = [(0,), (1,), (0, 1)] + ([(1, 2), (0, 1, 2)] if depth > 2 else [])
    for policy in policies:
        for layers in schedules:
            tokens, scores = _by_hand(fam.model, full, [every] * len(layers), policy, layers)
            assert torch.equal(tokens, fam.ref.tokens), (policy, layers)
            assert torch.allclose(scores, fam.ref.scores, atol=1e-5, rtol=0), (policy, layers)


@pytest.mark.parametrize("family,name", PAIRS, ids=PAIR_IDS)
def test_a_budget_that_keeps_every_token_gives_the_unpruned_outputs(zoo, family, name):
    runs = _runs(zoo, family, name)
    if runs is None:
        return
    ref = zoo.family(family).ref
    assert torch.equal(runs.full.tokens, ref.tokens)
    assert torch.allclose(runs.full.scores, ref.scores, atol=1e-5, rtol=0)
    assert runs.full.images and all(len(r.kept) == r.tokens_in for r in runs.full.images)


@pytest.mark.parametrize("family,name", PAIRS, ids=PAIR_IDS)
def test_the_model_is_unchanged_after_the_block(zoo, family, name):
    runs = _runs(zoo, family, name)
    if runs is None:
        return
    fam = zoo.family(family)
    assert runs.same_weights  # every parameter and buffer, bit for bit
    assert runs.hooks == fam.hooks  # every hook of the adapter removed, transformers' own untouched
    assert torch.equal(runs.after.tokens, fam.ref_singles[0].tokens)
    assert torch.equal(runs.after.scores, fam.ref_singles[0].scores)


@pytest.mark.parametrize("family,name", PAIRS, ids=PAIR_IDS)
def test_a_padded_batch_equals_its_prompts_one_by_one(zoo, family, name):
    runs = _runs(zoo, family, name)
    if runs is None:
        return
    assert (zoo.family(family).batch["attention_mask"] == 0).any()  # left padding
    assert len(runs.batch.images) == 3
    for i, single in enumerate(runs.singles):
        assert torch.equal(runs.batch.tokens[i], single.tokens[0]), i
        assert torch.allclose(runs.batch.scores[i], single.scores[0], atol=1e-4, rtol=0), i
        assert [r.row for r in single.images] == [0] and runs.batch.images[i].row == i
        assert torch.equal(runs.batch.images[i].kept, single.images[0].kept), i


@pytest.mark.parametrize("family,name", PAIRS, ids=PAIR_IDS)
def test_pruning_removes_tokens_and_the_columns_say_which_remain(zoo, family, name):
    runs = _runs(zoo, family, name)
    if runs is None:
        return
    fam = zoo.family(family)
    method = methods.get(name, **fam.params(name))
    run, ids = runs.batch, fam.batch["input_ids"]
    per_row = fam.adapter.visual_tokens_per_row(fam.model, fam.batch)
    assert [r.tokens_in for r in run.images] == per_row  # one image a row
    for r in run.images:
        if not method.uses_budget and not method.adaptive:  # `none`
            assert len(r.kept) == r.tokens_in
        elif method.adaptive:
            assert 0 < len(r.kept) < r.tokens_in
        else:
            assert len(r.kept) == tokens_to_keep(BUDGET, r.tokens_in) < r.tokens_in
    visual = _visual(fam.model, ids)
    valid = _valid(run, ids.shape[1], per_row)
    for b in range(len(ids)):
        kept_columns = run.columns[b][valid[b]]
        assert bool((kept_columns[1:] > kept_columns[:-1]).all())  # ascending, distinct
        never_pruned = int(visual[b].sum()) - per_row[b]
        assert int(visual[b, kept_columns].sum()) == len(run.images[b].kept) + never_pruned
        text = (~visual[b]).nonzero().flatten()  # every text and padding column stays
        assert torch.equal(kept_columns[~visual[b, kept_columns]], text)


def _check_equivalence(fam, name, run, full, inputs):
    """The pruned run `run` of `inputs` equals `_by_hand` on the unpruned LM inputs `full`, stage by stage."""
    ids = inputs["input_ids"]
    valids = _valids(run, ids.shape[1], fam.adapter.visual_tokens_per_row(fam.model, inputs))
    valid = valids[-1]
    embeds, layers = None, (0,)
    if run.stage == "in_llm":
        layers = run.stages
        assert run.layer == layers[0]
    else:
        gathered = full["inputs_embeds"].gather(1, run.columns[..., None].expand(-1, -1,
                                                                                 full["inputs_embeds"].shape[-1]))
        seen = run.calls[0]["inputs_embeds"]  # what the adapter handed the LM
        assert seen.shape == gathered.shape
        merged = (seen != gathered).any(-1) & valid
        if name not in MERGING:
            assert not merged.any()
        assert not (merged & ~_visual(fam.model, ids.gather(1, run.columns))).any()  # only visual tokens merge
        embeds = torch.where(merged[..., None], seen, gathered)
    tokens, scores = _by_hand(fam.model, full, list(zip(run.stage_columns, valids)), run.policy, layers, embeds)
    assert torch.equal(tokens, run.tokens)
    assert torch.allclose(scores, run.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,name", PAIRS, ids=PAIR_IDS)
def test_the_pruned_run_equals_the_kept_tokens_fed_by_hand(zoo, family, name):
    runs = _runs(zoo, family, name)
    if runs is None:
        return
    fam = zoo.family(family)
    _check_equivalence(fam, name, runs.batch, fam.ref.calls[0], fam.batch)
    for single, ref, inputs in zip(runs.singles, fam.ref_singles, fam.singles):
        _check_equivalence(fam, name, single, ref.calls[0], inputs)


@pytest.mark.parametrize("family", ONE_PART)
def test_budget_scopes_agree_where_an_image_is_one_part(zoo, family):
    fam = zoo.family(family)
    image = _pruned(fam.model, "divprune", {}, fam.batch, budget_scope="image")
    part = _pruned(fam.model, "divprune", {}, fam.batch, budget_scope="part")
    assert torch.equal(image.tokens, part.tokens) and torch.equal(image.scores, part.scores)
    assert all(torch.equal(a.kept, b.kept) for a, b in zip(image.images, part.images))
    assert torch.equal(image.columns, part.columns)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_unknown_budget_scope_is_a_clear_error(zoo, family):
    fam = zoo.family(family)
    with pytest.raises(ValueError) as bad, prune(fam.model, "random", BUDGET, budget_scope="images"):
        _generate(fam.model, fam.singles[0])
    message = str(bad.value)
    assert "budget_scope" in message and "'images'" in message and "image" in message and "part" in message
    assert "\n" not in message and _hooks(fam.model) == fam.hooks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_in_llm_pruning_with_renumbered_positions_equals_the_kept_tokens_fed_by_hand(zoo, family):
    """FastV keeps original positions by default; renumbered (where the family's positions are 1-D),
    layers >= K see the kept tokens numbered as if they were the whole prompt."""
    fam = zoo.family(family)
    run = _pruned(fam.model, "fastv", {"layer": 1, "position_policy": "renumber"}, fam.batch)
    assert run.policy == ("original" if fam.adapter.gathers_positions else "renumber")
    _check_equivalence(fam, "fastv", run, fam.ref.calls[0], fam.batch)
