"""The redundancy codebook: JSD forms, labels, DPC-KNN, the file format and the two methods."""

import json
import math

import pytest
import torch

import methods
from harness.codebook import build as B
from harness.codebook import dpc
from harness.codebook.jsd import jsd_official, jsd_textbook, p_max
from harness.codebook.probes import RELEASE_RANKS, probe_positions, window
from methods import codebook_files as files
from methods.base import VisualContext


def test_textbook_jsd_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    m = (p + q) / 2
    expected = 0.5 * float((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    assert jsd_textbook(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)
    disjoint = jsd_textbook(torch.tensor([0.0, -60.0]), torch.tensor([-60.0, 0.0])).item()
    assert disjoint == pytest.approx(math.log(2), rel=1e-5)  # the maximum, in nats


def test_official_jsd_is_the_release_formula():
    """Top-k of the reference, softmax on each, KL(M||P) and KL(M||Q) averaged over the k entries."""
    ref = torch.tensor([3.0, 2.0, 1.0, 0.0, -5.0])
    abl = torch.tensor([1.0, 2.5, 1.0, 0.5, 9.0])  # the last token is outside the reference's top 3
    idx = torch.tensor([0, 1, 2])
    p, q = ref[idx].softmax(-1), abl[idx].softmax(-1)
    m = (p + q) / 2
    expected = 0.5 * float((m * (m.log() - p.log())).mean() + (m * (m.log() - q.log())).mean())
    assert jsd_official(ref, abl, topk=3).item() == pytest.approx(expected, rel=1e-6)
    assert jsd_official(ref, ref, topk=3).item() == 0


def test_p_max_is_over_the_top_50():
    logits = torch.full((100,), -1e4)
    logits[:50] = 0.0
    logits[0] = math.log(2)  # 2 / (2 + 49)
    assert p_max(logits).item() == pytest.approx(2 / 51, rel=1e-6)


def test_labels_from_constructed_probe_results():
    cfg = B.BuildConfig(jsd_threshold=2e-3, pmax_threshold=0.15)
    result = {"jsd_local": torch.tensor([0.0, 0.0, 1e-3, 0.0]), "jsd_global": torch.tensor([0.0, 1e-3, 0.0, 0.0]),
              "p_max": torch.tensor([0.1, 0.1, 0.1, 0.5])}
    # 1e-3 local passes (< 2e-3); 16 x 1e-3 global does not; p_max 0.5 says too much on its own
    assert B.label(result, cfg, B.thresholds({"x": result}, cfg)).tolist() == [True, False, True, False]


def test_derived_thresholds_follow_the_quantile_rule():
    result = {"jsd_local": torch.linspace(0, 1, 101), "jsd_global": torch.zeros(101),
              "p_max": torch.linspace(0, 1, 101)}
    limits = B.thresholds({"x": result}, B.BuildConfig(jsd_quantile=0.3))
    assert limits["jsd_threshold"] == pytest.approx(0.3) and limits["pmax_threshold"] == pytest.approx(0.5)


def test_dpc_knn_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.5 * torch.randn(60, 2, generator=g)
    found = dpc.dpc_knn(x, clusters=3)
    # the same partition, whatever the cluster numbering
    assert all(len(set(found[truth == c].tolist())) == 1 for c in range(3))
    assert len(set(found.tolist())) == 3


def test_stage_one_keeps_redundant_tokens_of_small_clusters_only():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(30, 4, generator=g) * 0.1  # one large group of similar tokens
    small = torch.randn(5, 4, generator=g) * 0.1 + 10  # a small group elsewhere
    redundant = torch.ones(35, dtype=torch.bool)
    redundant[34] = False
    kept = dpc.stage_one(torch.cat([big, small]), redundant, clusters=2, max_size=8).tolist()
    assert kept == [30, 31, 32, 33]  # labelled members of the small cluster; the big group is out


def test_stage_two_needs_clusters_spread_over_many_images():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(40, 4, generator=g) * 0.1  # from 40 images
    rare = torch.randn(40, 4, generator=g) * 0.1 + 10  # from 2 images
    sources = [f"img{i}" for i in range(40)] + ["a", "b"] * 20
    keep, stats = dpc.stage_two(torch.cat([common, rare]), sources, clusters=2, min_sources=10)
    assert keep.tolist() == list(range(40)) and len(stats["kept_clusters"]) == 1


def test_probe_positions_and_windows():
    sim = torch.arange(576, dtype=torch.float)  # token i has rank 576 - i
    picks = probe_positions(sim, RELEASE_RANKS)
    assert len(picks) == 96 and picks[0] == 575 and picks[24] == 576 - 37
    assert window(0, 24, 24) == [0, 1, 2, 24, 25, 26, 48, 49, 50]  # shifted inward at the corner
    assert window(30, 24, 24) == [5, 6, 7, 29, 30, 31, 53, 54, 55]
    assert len(window(575, 24, 24)) == 9 and 575 in window(575, 24, 24)


def _ctx(features):
    return VisualContext(features=features, grid=(1, len(features)))


def test_lower_tau_never_keeps_more(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(576, 32, generator=g)
    files.save(tmp_path / "cb.pt", torch.randn(50, 32, generator=g), ["s"] * 50, {})
    counts = [len(methods.get("codebook", path=str(tmp_path / "cb.pt"), tau=t).select(_ctx(x), 576).kept)
              for t in (0.9, 0.5, 0.3, 0.2, 0.1, -0.5)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_codebook_fixed_keeps_the_least_redundant(tmp_path):
    x = torch.eye(8)
    files.save(tmp_path / "cb.pt", x[:3] + 0.01, ["s"] * 3, {})  # tokens 0-2 look like prototypes
    kept = methods.get("codebook_fixed", path=str(tmp_path / "cb.pt")).select(_ctx(x), 5).kept
    assert kept.tolist() == [3, 4, 5, 6, 7]


def test_tau_defaults_to_the_build_record_then_the_release(tmp_path):
    files.save(tmp_path / "a.pt", torch.randn(4, 8), ["s"] * 4, {"tau": 0.2})
    assert methods.get("codebook", path=str(tmp_path / "a.pt")).threshold() == 0.2
    torch.save(torch.randn(4, 8).half(), tmp_path / "released.pt")  # a release: no build record
    assert methods.get("codebook", path=str(tmp_path / "released.pt")).threshold() == 0.45


@pytest.mark.parametrize("content,message", [
    (None, "codebook not found"),
    (b"not a torch file", "not a readable torch file"),
    (torch.randn(3), "expected [prototypes, hidden]"),
    (torch.zeros(4, 8, dtype=torch.long), "expected a floating-point tensor"),
    ({"prototypes": torch.randn(4, 8)}, "holds a dict"),
    (torch.tensor([[float("nan")] * 8]), "NaN"),
])
def test_bad_codebook_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "cb.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(files.CodebookError, match=message.replace("[", r"\[").replace("]", r"\]")):
        files.load(path)


def test_a_codebook_of_the_wrong_width_is_refused_before_any_forward(tmp_path):
    from harness.adapters import prune
    from harness.testbed import model as M

    model, _ = M.build_model(M.TINY)
    hidden = model.config.text_config.hidden_size
    files.save(tmp_path / "cb.pt", torch.randn(5, hidden + 1), ["s"] * 5, {})
    with pytest.raises(files.CodebookError, match=f"hidden size {hidden + 1}.*outputs {hidden}"):
        with prune(model, "codebook_fixed", 64, path=str(tmp_path / "cb.pt")):
            pass


def test_build_round_trip_writes_the_release_format(tmp_path):
    protos = torch.randn(6, 16)
    path = files.save(tmp_path / "cb.pt", protos, ["a", "b", "a", "c", "d", "e"], {"tau": 0.3})
    raw = torch.load(path, weights_only=True)
    assert raw.dtype == torch.float16 and raw.shape == (6, 16)
    assert torch.allclose(files.load(path), protos.half().float())
    assert files.build_record(path)["tau"] == 0.3


def test_probes_match_a_direct_forward(tiny_llava_dir):
    """The batched probe forward gives the logits a plain model forward gives for the same embeddings."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from harness.codebook.probes import Prober

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    prober = Prober(model, processor)
    images = B.testbed_images(1)
    pixels = processor.image_processor([images[0][1]()], return_tensors="pt")["pixel_values"]
    x, _ = prober.visual_tokens(pixels)
    with torch.no_grad():
        ours = prober.first_token_logits(x[None])[0]
        text = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": prober.config.prompt}]}], add_generation_prompt=True)
        inputs = processor(images=[images[0][1]()], text=[text], return_tensors="pt")
        direct = model(**inputs).logits[0, -1]
    assert torch.allclose(ours, direct, atol=1e-4)


def test_build_resume_and_analyze_end_to_end(tiny_llava_dir, tmp_path, monkeypatch):
    from harness.codebook import probes
    from harness.codebook.analyze import analyze

    cfg = B.BuildConfig(images=6, image_clusters=4, image_max_size=40, cross_clusters=2, min_images=1,
                        jsd_quantile=0.9, pmax_quantile=0.9)
    record = B.build(str(tiny_llava_dir), tmp_path / "cb.pt", cfg, cache=tmp_path / "cache", say=lambda m: None)
    protos = files.load(tmp_path / "cb.pt")
    assert protos.shape[0] == record["statistics"]["prototypes"] > 0 and len(list((tmp_path / "cache").glob("*.pt"))) == 6
    assert len(json.loads((tmp_path / "cb.json").read_text())) == protos.shape[0]
    # Analysis reads the build's probes; one lost from the cache is probed again.
    lost = sorted((tmp_path / "cache").glob("*.pt"))[0]
    lost.unlink()
    summary = analyze(str(tmp_path / "cb.pt"), tmp_path / "analysis", say=lambda m: None)
    assert lost.is_file() and summary["probed_tokens"] == 6 * 96
    assert 0 <= summary["not_redundant_share_attention_unimportant"] <= 1
    assert (tmp_path / "analysis" / "analysis.png").stat().st_size > 0
    # A second build reads every probe from the cache: no image is probed again.
    monkeypatch.setattr(probes.Prober, "probe", lambda *a, **k: pytest.fail("probed again"))
    again = B.build(str(tiny_llava_dir), tmp_path / "cb2.pt", cfg, cache=tmp_path / "cache", say=lambda m: None)
    assert torch.equal(files.load(tmp_path / "cb2.pt"), protos) and again["tau"] == record["tau"]
