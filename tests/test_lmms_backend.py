"""The vtp_llava lmms-eval backend on a tiny random LLaVA: registration, requests, MC scoring, reuse."""

import json

import pytest
import torch

import methods
from harness.evaluation import lmms_compat

lmms_compat.apply(restore_log=False)

from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from PIL import Image  # noqa: E402

from harness.evaluation.inputs import stop_at as _stop_at  # noqa: E402
from harness.evaluation.lmms_backend import CheckpointError, VTPLlava  # noqa: E402

from default_methods import default_params  # noqa: E402

COLOURS = ("red", "blue", "green", "white")


@pytest.fixture(scope="module")
def lm(tiny_llava_dir):
    # As the evaluator builds it from a model_args string (the CLI passes batch_size as a string).
    return VTPLlava.create_from_arg_string(f"pretrained={tiny_llava_dir}",
                                           {"batch_size": "2", "max_batch_size": None, "device": "cpu"})


def _doc_to_visual(doc):
    return [Image.new("RGB", (336, 336), c) for c in doc["colours"]]


def _requests(lm, request_type, n=4, second=None):
    docs = [{"colours": [COLOURS[i % 4]] * (1 + i % 2)} for i in range(n)]  # 1 or 2 images
    lm.task_dict = {"t": {"test": docs}}
    reqs = []
    for i in range(n):
        second_arg = second if second is not None else {"max_new_tokens": 3, "until": ["\n"]}
        args = (f"What colour is image {i}?", second_arg, _doc_to_visual, i, "t", "test")
        reqs.append(Instance(request_type, args, 0, {"task": "t", "doc_id": i, "repeats": 1}))
    return reqs


def test_plugin_resolves_through_the_entry_point():
    from importlib.metadata import entry_points

    import lmms_eval.models as models

    names = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert names.get("vtp_llava") == "harness.evaluation.lmms_plugin:manifests", \
        "entry point missing: run `pip install --no-deps -e .` in the venv"
    assert models.get_model("vtp_llava") is VTPLlava
    assert models.get_model("vtp_llava", force_simple=True) is VTPLlava


def test_generate_until_answers(lm):
    reqs = _requests(lm, "generate_until")
    out = lm.generate_until(reqs)
    assert len(out) == 4 and all(isinstance(o, GenerationResult) and isinstance(o.text, str) for o in out)
    assert all(o.token_counts.output_tokens <= 3 for o in out)
    rec = lm.records[("t", 1, 0)]
    assert rec["visual_tokens_in"] == rec["visual_tokens_kept"] == 2 * 576
    assert len(rec["generated_ids"]) <= 3 and rec["text"] == out[1].text
    first = rec["first_token"]
    assert first["full"] and len(first["ids"]) == len(lm.tokenizer)  # small vocabulary: whole distribution
    assert abs(torch.tensor(first["logprobs"]).exp().sum().item() - 1) < 1e-4
    # batching with left padding gives the batch-1 answers
    lm.batch_size_per_gpu = 1
    try:
        single = lm.generate_until(reqs)
    finally:
        lm.batch_size_per_gpu = 2
    assert [o.text for o in single] == [o.text for o in out]


def test_until_and_max_new_tokens(lm):
    assert _stop_at("red\n\nblue", ["\n\n"]) == "red"
    assert _stop_at("a.b,c", [",", "."]) == "a"
    assert _stop_at("abc", "b") == "a"
    assert _stop_at("abc", []) == "abc"
    out = lm.generate_until(_requests(lm, "generate_until", n=2, second={"max_new_tokens": 1, "until": []}))
    assert all(o.token_counts.output_tokens <= 1 for o in out)


def test_loglikelihood_is_a_loss_and_batch_invariant(lm):
    reqs = _requests(lm, "loglikelihood", second=" blue")
    out = lm.loglikelihood(reqs)
    assert all(isinstance(loss, float) and loss > 0 and isinstance(greedy, bool) for loss, greedy in out)
    lm.batch_size_per_gpu = 1
    try:
        single = lm.loglikelihood(reqs)
    finally:
        lm.batch_size_per_gpu = 2
    assert all(abs(a[0] - b[0]) < 1e-4 and a[1] == b[1] for a, b in zip(out, single))
    # the loss is the summed NLL of the continuation tokens, computed by hand for request 0
    rec = lm.records[("t", 0, 0)]
    prompt = lm.build_prompt(reqs[0].args[0], 1)
    inputs = lm.processor(text=prompt, images=_doc_to_visual(lm.task_dict["t"]["test"][0]), return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([rec["continuation_ids"]])], dim=1)
    with torch.no_grad():
        logits = lm.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
    n = len(rec["continuation_ids"])
    logprobs = logits[-n - 1:-1].log_softmax(-1)
    expected = -logprobs.gather(-1, torch.tensor(rec["continuation_ids"])[:, None]).sum().item()
    assert out[0][0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("method", ["random", "fastv"])  # pre-LLM and in-LLM
def test_pruned_requests(lm, method):
    """Under a method: a budget keeping every token answers exactly as unpruned; at 64 the records
    say what was kept, batching changes nothing, and the loss is that of the pruned model computed
    by hand for one request."""
    params = default_params(method)
    import methods as registry

    gen, ll = _requests(lm, "generate_until"), _requests(lm, "loglikelihood", second=" blue")
    lm.configure("none")
    ref_gen, ref_ll = lm.generate_until(gen), lm.loglikelihood(ll)
    try:
        lm.configure(registry.get(method, **params), 576)
        assert [o.text for o in lm.generate_until(gen)] == [o.text for o in ref_gen]
        assert lm.loglikelihood(ll) == ref_ll
        lm.configure(registry.get(method, **params), 64)
        batched = lm.loglikelihood(ll)
        rec = lm.records[("t", 1, 0)]  # two images
        assert rec["visual_tokens_in"] == 1152 and rec["visual_tokens_kept"] == 128
        assert [len(k) for k in rec["kept_indices"]] == [64, 64]
        lm.batch_size_per_gpu = 1
        try:
            single = lm.loglikelihood(ll)
        finally:
            lm.batch_size_per_gpu = 2
        assert all(abs(a[0] - b[0]) < 1e-4 for a, b in zip(batched, single))
        assert batched != ref_ll
        from harness.adapters import prune

        prompt = lm.build_prompt(ll[0].args[0], 1)
        inputs = lm.processor(text=prompt, images=_doc_to_visual(lm.task_dict["t"]["test"][0]), return_tensors="pt")
        cont = lm.records[("t", 0, 0)]["continuation_ids"]
        ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)
        with torch.no_grad(), prune(lm.model, method, 64, **params) as run:
            run.query_positions = torch.tensor([inputs["input_ids"].shape[1] - 1])  # the prompt's last token
            logits = lm.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
        expected = -logits[-len(cont) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert batched[0][0] == pytest.approx(expected, abs=1e-4)
    finally:
        lm.configure("none")


@pytest.mark.parametrize("method", ["random", "fastv"])  # pre-LLM and in-LLM
def test_teacher_forced_nll_is_read_from_generate_where_the_answers_agree(lm, method):
    """The reference answer's NLL under the pruned model: read from generate's step logits where the
    pruned answer follows the reference, computed by a teacher-forced forward (for those rows only)
    where it does not; both equal scoring the reference alone, teacher-forced."""
    import methods as registry

    reqs = _requests(lm, "generate_until", second={"max_new_tokens": 3, "until": []})
    lm.configure(registry.get(method, **default_params(method)), 64)
    rerun_rows = []
    score = lm._score_continuations

    def counting(prompts, conts):
        rerun_rows.append(len(prompts))
        return score(prompts, conts)

    try:
        lm.generate_until(reqs)
        own = {key: record["generated_ids"] for key, record in lm.records.items()}
        assert all(len(ids) >= 2 for ids in own.values())  # a prefix to follow
        special = {lm.eos_token_id, lm.pad_token_id}
        other = next(t for t in range(len(lm.tokenizer)) if t not in special and t != own[("t", 2, 0)][0])
        # requests 0 and 1: their own answer; 2: another first token (rerun); 3: its own first token, then
        # another (read: generate's second step follows the same first token)
        lm.reference_answers = {**{k: v for k, v in own.items() if k[1] < 2},
                                ("t", 2, 0): [other] + own[("t", 2, 0)][1:], ("t", 3, 0): own[("t", 3, 0)][:1] + [other]}
        lm._score_continuations = counting
        lm.generate_until(reqs)
        got = {key: record["teacher_forced_nll"] for key, record in lm.records.items()}
        lm._score_continuations = score
        assert rerun_rows == [1]  # request 2 alone
        for req in reqs:
            ctx, _, doc_to_visual, doc_id, task, split = req.args[:6]
            images = lm._visuals(doc_to_visual, doc_id, task, split)
            scored, _ = score([(lm.build_prompt(ctx, len(images)), images)], [lm.reference_answers[(task, doc_id, 0)]])
            assert got[(task, doc_id, 0)] == pytest.approx(scored[0][0], abs=1e-4)
    finally:
        lm._score_continuations = score
        lm.reference_answers = {}
        lm.pop_records()
        lm.configure("none")


def _options(lm, choices=(" red", " blue", " green", " white")):
    """Four single-token options of one question per doc (a multiple_choice task's requests)."""
    _requests(lm, "loglikelihood")  # sets the docs
    return [Instance("loglikelihood", (f"What colour is image {d}?", c, _doc_to_visual, d, "t", "test"), k,
                     {"task": "t", "doc_id": d, "repeats": 1}) for d in range(2) for k, c in enumerate(choices)]


@pytest.mark.parametrize("method", ["none", "random", "fastv"])
def test_options_of_one_prompt_share_a_forward(lm, method):
    """Single-token options of one prompt are scored from one forward: the same losses, greedy flags
    and records as scoring each option alone, pruned or not."""
    import methods as registry

    reqs = _options(lm)
    assert all(len(lm.tokenizer(r.args[1], add_special_tokens=False)["input_ids"]) == 1 for r in reqs)
    params = default_params(method)
    lm.configure(registry.get(method, **params), None if method == "none" else 64)
    try:
        shared = lm.loglikelihood(reqs)
        shared_records = {k: dict(v) for k, v in lm.records.items()}
        alone = [lm.loglikelihood([r])[0] for r in reqs]
    finally:
        lm.configure("none")
    assert all(a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == b[1] for a, b in zip(shared, alone))
    assert len({round(loss, 4) for loss, _ in shared[:4]}) == 4  # really four different options
    assert sum(greedy for _, greedy in shared[:4]) <= 1
    for key, record in shared_records.items():
        assert record["continuation_ids"] == lm.records[key]["continuation_ids"]
        assert record["kept_indices"] == lm.records[key]["kept_indices"]


def test_images_and_pixels_are_reused_across_calls(lm):
    """A second pass over the same docs renders nothing and processes no image again, and gives
    the same answers (harness.evaluation.image_cache)."""
    reqs = _requests(lm, "loglikelihood", second=" blue")
    calls = []
    original = _doc_to_visual

    def counting(doc):
        calls.append(1)
        return original(doc)

    reqs = [Instance(r.request_type, r.args[:2] + (counting,) + r.args[3:], r.idx, r.metadata) for r in reqs]
    first = lm.loglikelihood(reqs)
    n_calls, misses = len(calls), lm.processor.image_processor.cache.misses
    assert lm.loglikelihood(reqs) == first
    assert len(calls) == n_calls and lm.processor.image_processor.cache.misses == misses
    lm.task_dict["t"]["test"][0] = {"colours": ["green"]}  # a changed doc is loaded afresh
    lm.loglikelihood(reqs[:1])
    assert len(calls) == n_calls + 1


def test_prompt_uses_the_chat_template(lm):
    assert lm.build_prompt("Q?", 2) == "USER: <image><image>\nQ? ASSISTANT:"
    assert lm.build_prompt("<image>\nQ?", 1) == "USER: <image>\nQ? ASSISTANT:"  # no second placeholder
    assert lm.build_prompt("Q?", 0) == "USER: Q? ASSISTANT:"


def test_multi_round_is_refused(lm):
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        lm.generate_until_multi_round([])


def test_method_and_budget_are_in_the_cache_identity(lm):
    lm.configure("none", 64)
    assert lm.budget is None  # `none` takes no budget
    assert "method=NoPruning()" in str(lm) and "budget=None" in str(lm) and " at 0x" not in str(lm)
    lm.configure("random", 64)
    assert "method=RandomPruning(position_policy='renumber', seed=0)" in str(lm) and "budget=64" in str(lm)
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods: none"):
        lm.configure("nope")
    with pytest.raises(ValueError, match="above the 576 visual tokens"):
        lm.configure("random", 1000)
    lm.configure("none")


def test_bad_checkpoints_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="needs pretrained"):
        VTPLlava()
    with pytest.raises(CheckpointError, match="model not found"):
        VTPLlava(pretrained=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="no config.json"):
        VTPLlava(pretrained=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama' checkpoint"):
        VTPLlava(pretrained=str(tmp_path))


def test_bad_arguments_are_reported(tiny_llava_dir):
    with pytest.raises(ValueError, match="batch_size"):
        VTPLlava(pretrained=str(tiny_llava_dir), batch_size="auto")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        VTPLlava(pretrained=str(tiny_llava_dir), method="nope")
    with pytest.raises(ValueError, match="method 'fastv' has no parameter.*ratio; it accepts: layer, position_policy"):
        VTPLlava(pretrained=str(tiny_llava_dir), method="fastv", budget=64, ratio=0.5)
    lm = VTPLlava.create_from_arg_string(f"pretrained={tiny_llava_dir},method=fastv,budget=64,layer=1", {})
    assert lm.method == __import__("methods").get("fastv", layer=1) and lm.budget == 64


@pytest.fixture()
def blue_biased_lm(tiny_llava_dir):
    """A separate instance whose lm_head output is biased towards the tokens of ' blue'."""
    lm = VTPLlava(pretrained=str(tiny_llava_dir), batch_size=4)
    bias = torch.zeros(len(lm.tokenizer))
    bias[lm.tokenizer(" blue", add_special_tokens=False)["input_ids"]] = 30.0
    handle = lm.model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    yield lm
    handle.remove()


def test_multiple_choice_end_to_end(blue_biased_lm, tiny_tasks_dir, tmp_path):
    """lmms-eval scores MC by argmin of the loss; without the unwrap fix it fails (RetryError)."""
    tm = lmms_compat.task_manager(tiny_tasks_dir)
    for use_cache in (None, str(tmp_path / "cache"), str(tmp_path / "cache")):  # the last run is all cache hits
        res = simple_evaluate(model=blue_biased_lm, tasks=["vtp_tiny_mc"], task_manager=tm, log_samples=True,
                              bootstrap_iters=0, use_cache=use_cache,
                              datetime_str=lmms_compat.fresh_datetime_str())
        samples = sorted(res["samples"]["vtp_tiny_mc"], key=lambda s: s["doc_id"])
        # ' blue' has the lowest loss: right for docs 0 and 1, wrong for doc 2 (gold is green)
        assert [s["acc"] for s in samples] == [1.0, 1.0, 0.0]
        assert res["results"]["vtp_tiny_mc"]["acc,none"] == pytest.approx(2 / 3)
        for s in samples:
            losses = [r[0] for r in s["filtered_resps"]]
            assert all(isinstance(x, float) for x in losses)
            assert s["doc"]["choices"][losses.index(min(losses))] == "blue"


def test_instance_survives_two_evaluations(lm, tiny_tasks_dir):
    """lmms-eval 0.7.3 calls lm.clean() after inference; the base class would delete the model."""
    tm = lmms_compat.task_manager(tiny_tasks_dir)
    runs = []
    for _ in range(2):
        lm.pop_records()
        res = simple_evaluate(model=lm, tasks=["vtp_tiny_gen", "vtp_tiny_mc"], task_manager=tm, limit=2,
                              log_samples=True, bootstrap_iters=0, datetime_str=lmms_compat.fresh_datetime_str())
        assert isinstance(lm.model, torch.nn.Module)
        runs.append(([s["filtered_resps"] for s in res["samples"]["vtp_tiny_gen"]], res["results"]))
        records = lm.pop_records()
        assert {("vtp_tiny_gen", 0, 0), ("vtp_tiny_mc", 1, 2)} <= set(records)
    assert runs[0] == runs[1]


def test_flops_are_shared_by_cells_of_one_layout_only_where_the_count_is_the_same(lm):
    """Pre-LLM methods that call no model module while choosing share one count per (task, tokens per layer);
    the others (a method that runs a ViT layer for [CLS] attention, an in-LLM one) are counted afresh. Either
    way each equals the count made with nothing shared."""
    lm.generate_until(_requests(lm, "generate_until", n=1))  # the task's first prompt: what the counts are made on
    names = ("random", "uniform", "divprune", "cls_attention", "fastv", "none")
    shared = {}
    for name in names:
        lm.configure(methods.get(name, **default_params(name)), 16)
        before = len(lm._flops_by_layout)
        shared[name] = (lm.flops("t"), len(lm._flops_by_layout) - before)
    for name in names:
        lm.configure(methods.get(name, **default_params(name)), 16)
        lm._flops_by_layout.clear()
        assert lm.flops("t") == shared[name][0], name
    assert [shared[n][1] for n in names] == [1, 0, 0, 0, 0, 1]  # random's layout, reused; none's own
    assert shared["cls_attention"][0]["flops_vision"] > shared["random"][0]["flops_vision"]  # its ViT work counted
    lm.configure("none")
