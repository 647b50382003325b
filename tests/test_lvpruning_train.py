"""Training LVPruning's decision modules (harness.lvpruning) on a tiny random testbed-class model (2 layers).

- THE KEY CHECK: the masked forward with hard decisions equals the shared adapter's pruned forward (tokens
  dropped, original positions), for nested kept sets chosen by a test method and for the `lvpruning` method
  reading a module file (its top-k rule); all-ones decisions equal the unpruned model.
- The answer's loss reaches the modules through the masked attention; training moves only the modules: the
  model's parameters stay bit-identical and its attention implementation is restored.
- Resuming from a checkpoint gives the modules (and log) of an uninterrupted run.
- The CLI's bad input: one clear line before any work.
"""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import methods
from harness.adapters import prune
from harness.cli import main
from harness.lvpruning import masked as MK
from harness.lvpruning.train import Settings, Trainer, TrainingInputError, lr_at, make_batch
from harness.testbed import model as M
from harness.testbed import questions as Q
from harness.testbed import world as W
from methods import lvpruning_modules as files
from methods.base import Method, Selection
from methods.lvpruning_modules import ModuleFileError, mapped_layers

LAYERS = (0, 1)  # the tiny decoder has 2 layers: LLaVA's mapping collides there
N = W.GRID * W.GRID


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


@pytest.fixture(scope="module")
def tiny():
    return M.build_model(M.TINY, seed=0)


@pytest.fixture(scope="module")
def inputs(tiny):
    """Two prompts of different lengths (left-padded), one image each."""
    _, processor = tiny
    samples = [Q.make_sample("validation", family, 0) for family in ("color", "spatial")]
    return processor(images=[[W.render_pil(s["scenes"][0])] for s in samples],
                     text=[M.format_prompt(s["question"], 1) for s in samples], padding=True, return_tensors="pt")


def _settings(**kw):
    base = {"steps": 4, "batch": 2, "layers": LAYERS, "eval_docs": 0, "checkpoint_every": 2, "log_every": 1,
            "lr": 1e-2}
    return Settings(**{**base, **kw})


@dataclass
class NestedRandom(Method):
    """Test method: two in-LLM stages before layers 0 and 1, each keeping a seeded random subset of the tokens
    still present; it records what it kept (indices into the tokens it was shown)."""

    position_policy: str = "original"
    stage: ClassVar[str] = "in_llm"

    def __post_init__(self):
        super().__post_init__()
        self.log = []

    def stage_layers(self):
        return LAYERS

    def stage_counts(self, n, k):
        return [k + (n - k) // 3, k]

    def select(self, ctx, k):
        kept = torch.randperm(ctx.num_tokens, generator=torch.Generator().manual_seed(17 * len(self.log) + 3))[:k]
        self.log.append((ctx.stage, kept.sort().values))
        return Selection(kept.sort().values)


def _unpruned_and_pruned(model, inputs, method, budget, **params):
    with torch.no_grad():
        full = model(**inputs).logits
        with prune(model, method, budget, record_ipr=False, **params) as run:
            pruned = model(**inputs).logits
    return full, pruned, run


def test_masked_forward_with_hard_decisions_equals_the_adapters_pruned_forward(tiny, inputs):
    model, _ = tiny
    method = NestedRandom()
    full, pruned, run = _unpruned_and_pruned(model, inputs, method, 0.1)
    firsts = [kept for stage, kept in method.log if stage == 0]
    seconds = [kept for stage, kept in method.log if stage == 1]
    keep = [torch.zeros(2, N), torch.zeros(2, N)]
    for image in range(2):
        keep[0][image, firsts[image]] = 1
        keep[1][image, firsts[image][seconds[image]]] = 1  # stage 1 chose among stage 0's tokens
        assert torch.equal(firsts[image][seconds[image]], run.images[image].kept)
    assert [r.extra["stage_tokens"] for r in run.images] == [[58 + (N - 58) // 3, 58]] * 2
    batch = MK.prepare(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    modules = files.build(M.TINY.text_hidden, 2)
    with torch.no_grad():
        out = MK.masked_forward(model, batch, modules, LAYERS, keep)
    assert (pruned[:, -1] - full[:, -1]).abs().max() > 1e-3  # pruning changes the answer's logits...
    torch.testing.assert_close(out.logits[:, -1], pruned[:, -1], atol=1e-5, rtol=0)  # ...exactly as masking does
    assert [d.sum(1).tolist() for d in out.decisions] == [[float(len(firsts[0]))] * 2, [58.0, 58.0]]


def test_masked_topk_with_a_module_file_equals_the_lvpruning_method(tiny, inputs, tmp_path):
    model, _ = tiny
    modules = files.build(M.TINY.text_hidden, 2, seed=5)
    path = files.save(tmp_path / "m.safetensors", modules, layers=LAYERS, decoder_layers=2, targets=[0.5, 0.3])
    _, pruned, run = _unpruned_and_pruned(model, inputs, "lvpruning", 0.1, path=str(path))
    counts = methods.get("lvpruning", path=str(path)).stage_counts(N, 58)
    batch = MK.prepare(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    with torch.no_grad():
        out = MK.masked_forward(model, batch, modules, LAYERS, "topk", counts=counts)
    for image in range(2):  # the same text tokens and hidden states: the same choice at every stage
        assert torch.equal(out.decisions[-1][image].nonzero().flatten(), run.images[image].kept)
    assert [r.extra["stage_tokens"] for r in run.images] == [counts] * 2
    torch.testing.assert_close(out.logits[:, -1], pruned[:, -1], atol=1e-5, rtol=0)


def test_all_ones_decisions_equal_the_unpruned_model(tiny, inputs):
    model, _ = tiny
    batch = MK.prepare(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    with torch.no_grad():
        full = model(**inputs).logits
        out = MK.masked_forward(model, batch, files.build(M.TINY.text_hidden, 2), LAYERS, [torch.ones(2, N)] * 2)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], full[real], atol=1e-5, rtol=0)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_the_prompt_text_is_the_adapters_and_the_answer_is_never_read(tiny):
    model, processor = tiny
    raw = make_batch(_settings(), 0, processor.tokenizer, model.config.image_token_id)
    batch = MK.prepare(model, raw["input_ids"], raw["pixel_values"], raw["attention_mask"], raw["labels"])
    for row in range(2):
        text = batch.text_columns[row][~batch.text_padding[row]]
        answer = (raw["labels"][row] != -100).nonzero().flatten()
        assert int(text.max()) == int(answer.min()) - 1  # up to the last prompt token ("ASSISTANT:")
        assert not bool((raw["input_ids"][row, text] == model.config.image_token_id).any())
        assert int(text.min()) == 0 and len(text) == int(answer.min()) - N


def test_the_answers_loss_reaches_every_module_through_the_masked_attention(tiny):
    model, processor = tiny
    raw = make_batch(_settings(), 1, processor.tokenizer, model.config.image_token_id)
    batch = MK.prepare(model, raw["input_ids"], raw["pixel_values"], raw["attention_mask"], raw["labels"])
    modules = files.build(M.TINY.text_hidden, 2)
    out = MK.masked_forward(model, batch, modules, LAYERS, "gumbel", generator=torch.Generator().manual_seed(0))
    MK.answer_loss(out.logits, batch.labels).backward()  # no ratio loss: only the answer's gradient
    for module in modules:
        assert float(module.decide.weight.grad.abs().sum()) > 0


def test_training_moves_only_the_modules_and_restores_the_attention_implementation(tiny_llava_dir, tmp_path):
    trainer = Trainer(tiny_llava_dir, tmp_path / "work", _settings(steps=3, families=("color",)), log=lambda _: None)
    before = {name: p.detach().clone() for name, p in trainer.model.state_dict().items()}
    start = [p.detach().clone() for p in trainer.modules.parameters()]
    trainer.run()
    assert all(torch.equal(before[name], p) for name, p in trainer.model.state_dict().items())
    assert all(not p.requires_grad for p in trainer.model.parameters())
    assert trainer.model.config.text_config._attn_implementation == "sdpa"
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.modules.parameters()))
    # the adapter's path with the modules so far, on one validation document
    val = trainer.validate(1, ("lvpruning", "random"))
    assert set(val) == {"lvpruning", "random"} and 0 <= val["lvpruning"]["color"] <= 1
    path = trainer.export(tmp_path / "out" / "modules.safetensors", command="test")
    loaded, meta = files.load(path)
    assert meta["layers"] == [0, 1] and meta["targets"] == [0.5, 0.3] and meta["decoder_layers"] == 2
    assert meta["training"]["steps"] == 3 and meta["training"]["settings"]["lambda_ratio"] == 2.0
    assert all(torch.equal(a, b.cpu()) for a, b in zip(loaded.parameters(), trainer.modules.parameters()))
    lines = (path.parent / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"keep": [' in lines[0]


def test_a_resumed_run_ends_with_the_modules_of_an_uninterrupted_one(tiny_llava_dir, tmp_path):
    first = Trainer(tiny_llava_dir, tmp_path / "a", _settings(), log=lambda _: None)
    first.run(until=2)  # stopped after the checkpoint at step 2
    resumed = Trainer(tiny_llava_dir, tmp_path / "a", _settings(), log=lambda _: None)
    assert resumed.state.step == 2
    resumed.run()
    straight = Trainer(tiny_llava_dir, tmp_path / "b", _settings(), log=lambda _: None)
    straight.run()
    for a, b in zip(resumed.modules.state_dict().values(), straight.modules.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda history: [{k: v for k, v in line.items() if k != "seconds"} for line in history]
    assert strip(resumed.state.history) == strip(straight.state.history) and len(straight.state.history) == 4
    with pytest.raises(TrainingInputError, match="another model or settings"):
        Trainer(tiny_llava_dir, tmp_path / "a", _settings(seed=1), log=lambda _: None)


def test_batches_are_a_function_of_seed_and_step_from_the_train_split(tiny):
    _, processor = tiny
    a = make_batch(_settings(), 3, processor.tokenizer, 3)
    b = make_batch(_settings(), 3, processor.tokenizer, 3)
    c = make_batch(_settings(seed=1), 3, processor.tokenizer, 3)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["pixel_values"], c["pixel_values"])
    s = _settings(steps=8, warmup=0.25)  # two warm-up steps, then cosine
    assert lr_at(0, s) < lr_at(1, s) == lr_at(2, s) == s.lr and lr_at(7, s) < lr_at(3, s) < s.lr


def test_layers_map_llavas_onto_the_decoder():
    assert mapped_layers(32) == (1, 8, 16) and mapped_layers(3) == (0, 1, 2) and mapped_layers(8) == (0, 2, 4)
    with pytest.raises(ModuleFileError, match=r"map to \(0, 1, 1\)"):
        mapped_layers(2)


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "not a model folder"),
    (["--model", "{tiny}"], "give the layers (pass --layers)"),
    (["--model", "{tiny}", "--layers", "0,2"], "must be in 0..1"),
    (["--model", "{tiny}", "--layers", "1,0"], "strictly increasing"),
    (["--model", "{tiny}", "--layers", "0,x"], "expected decoder layer indices"),
    (["--model", "{tiny}", "--layers", "0,1", "--steps", "0"], "steps must be a positive integer"),
    (["--model", "{tiny}", "--layers", "0,1", "--output", "{folder}"], "is a folder"),
    (["--model", "{tiny}", "--layers", "0,1", "--device", "tpu"], "--device"),
])
def test_bad_input_is_one_clear_line_before_any_work(tiny_llava_dir, tmp_path, capsys, args, message):
    fill = {"missing": str(tmp_path / "nowhere"), "tiny": str(tiny_llava_dir), "folder": str(tmp_path)}
    argv = ["lvpruning", "train", "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "o.safetensors")]
    assert main(argv + [a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness lvpruning train: error:") and message in err and "\n" not in err
    assert not (tmp_path / "work").exists()
