"""G-Prune (graph propagation) and LoFi (SVD leverage) against hand-computed cases and their formulas.

The adapter contracts (budget, batch = single, model unchanged) are in test_methods.py, which runs
every registered method.
"""

import math

import pytest
import torch

import methods
from methods.base import VisualContext
from methods.gprune import graph, propagate
from methods.lofi import leverage_scores


def _ctx(features, grid=None):
    return VisualContext(features=features, grid=grid or (1, features.shape[0]))


def _clustered(n=96, d=8, clusters=6, noise=0.3, seed=0):
    """Tokens around a few centres: a similarity graph with real structure at threshold 0.5."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    return centres[torch.randint(clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)


# ----------------------------------------------------------------------------------------- G-Prune
# Four 2-D tokens at angles 0, 40, 80 and 180 degrees with norms 1, 2, 3, 0.5: cos = cos(angle
# difference), so the edges (cos >= 0.5) are 0-1 and 1-2 (cos 40 = 0.766) plus self-loops; token 3
# points the other way and has only its self-loop.
ANGLES, NORMS = [0, 40, 80, 180], [1.0, 2.0, 3.0, 0.5]
FOUR = torch.tensor([[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(ANGLES, NORMS)])


def _four_by_hand(temperature):
    """A and deg of the four-token graph, written out: softmax over each row's edges of cos / T."""
    c = math.cos(math.radians(40))
    e = math.exp((c - 1) / temperature)  # an edge of cos c next to the self-loop (cos 1)
    a = torch.tensor([[1, e, 0, 0],
                      [e, 1, e, 0],
                      [0, e, 1, 0],
                      [0, 0, 0, 1]], dtype=torch.float64)
    return a / a.sum(1, keepdim=True), torch.tensor([2, 3, 2, 1])


@pytest.mark.parametrize("temperature", [0.03, 0.5])
def test_gprune_graph_of_four_tokens_by_hand(temperature):
    a, deg = graph(FOUR, 0.5, temperature)
    a_hand, deg_hand = _four_by_hand(temperature)
    assert torch.equal(deg, deg_hand)
    assert torch.allclose(a.double(), a_hand, atol=1e-6)
    assert (a[a_hand == 0] == 0).all()  # non-edges are exactly 0, not just small
    w = torch.tensor(NORMS, dtype=torch.float64)
    expected = w @ torch.linalg.matrix_power(a_hand, 5) / deg_hand
    assert torch.allclose(propagate(FOUR, 0.5, temperature, 5).double(), expected, rtol=1e-5)


def test_gprune_four_tokens_simple_cases():
    # No propagation: the norm over the degree.
    assert torch.allclose(propagate(FOUR, 0.5, 0.03, 0), torch.tensor([1 / 2, 2 / 3, 3 / 2, 0.5 / 1]))
    # An isolated token keeps its own norm, whatever the number of hops.
    assert propagate(FOUR, 0.5, 0.03, 7)[3].item() == pytest.approx(0.5, rel=1e-6)
    # One hop, by hand: what flows into token 0 is w0 A00 + w1 A10.
    a, _ = _four_by_hand(0.03)
    one_hop = propagate(FOUR, 0.5, 0.03, 1)
    assert one_hop[0].item() == pytest.approx((1.0 * a[0, 0] + 2.0 * a[1, 0]).item() / 2, rel=1e-6)
    # A higher threshold cuts the 40-degree edges: every token alone, each keeps its norm.
    assert torch.allclose(propagate(FOUR, 0.8, 0.03, 5), torch.tensor(NORMS))


def test_gprune_vector_matrix_propagation_equals_matrix_power():
    x = _clustered(n=200, d=16)
    a, deg = graph(x, 0.5, 0.03)
    assert (deg > 1).float().mean() > 0.5  # a real graph: most tokens have neighbours
    w = torch.linalg.vector_norm(x, dim=-1).double()
    for hops in (1, 5, 9):
        expected = w @ torch.linalg.matrix_power(a.double(), hops) / deg
        assert torch.allclose(propagate(x, 0.5, 0.03, hops).double(), expected, rtol=1e-5)


def test_gprune_degree_counts_the_edges_the_softmax_keeps():
    x = _clustered(n=120, d=16, seed=3)
    a, deg = graph(x, 0.5, 0.03)
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T
    assert torch.equal(deg, (cos >= 0.5).sum(1))
    assert torch.equal(deg, (a > 0).sum(1))  # the release's count, identical in float32
    assert torch.allclose(a.sum(1), torch.ones(120))


def test_gprune_zero_token_scores_zero_and_harms_nothing():
    x = torch.cat([_clustered(n=20), torch.zeros(1, 8)])
    scores = propagate(x, 0.5, 0.03, 5)
    assert torch.isfinite(scores).all() and scores[-1] == 0
    assert torch.allclose(scores[:-1], propagate(x[:-1], 0.5, 0.03, 5))


def test_gprune_defaults_are_the_release():
    m = methods.get("gprune")
    assert (m.threshold, m.temperature, m.hops, m.position_policy, m.stage) == (0.5, 0.03, 5, "original", "pre_llm")
    x = _clustered()
    assert torch.equal(m.score(_ctx(x)), propagate(x, 0.5, 0.03, 5))


# -------------------------------------------------------------------------------------------- LoFi
def _known_spectrum(sigmas, n=12, d=9, seed=0):
    """H = Q1 diag(sigmas) Q2^T with orthonormal Q1 (n x r), Q2 (d x r)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    q1 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q
    return (q1 * torch.tensor(sigmas, dtype=torch.float64)) @ q2.T


@pytest.mark.parametrize("shape", [(50, 20), (30, 40)])  # both sides of the Gram-matrix choice
@pytest.mark.parametrize("rank", [1, 5, "energy"])
def test_lofi_leverage_sums_to_k_and_equals_the_svd(shape, rank):
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    scores, k = leverage_scores(h, rank, 0.9, False)
    assert 1 <= k <= min(shape)
    assert scores.sum().item() == pytest.approx(k, abs=1e-9)
    assert ((scores >= 0) & (scores <= 1 + 1e-12)).all()
    u = torch.linalg.svd(h.double(), full_matrices=False).U
    assert torch.allclose(scores, (u[:, :k] ** 2).sum(1), atol=1e-10)


def test_lofi_full_rank_leverage_is_the_hat_matrix_diagonal():
    h = torch.randn(40, 6, generator=torch.Generator().manual_seed(2)).double()
    scores, k = leverage_scores(h, 6)
    hat = h @ torch.linalg.inv(h.T @ h) @ h.T
    assert k == 6 and torch.allclose(scores, torch.diagonal(hat), atol=1e-10)


@pytest.mark.parametrize("energy, k", [(0.6, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_lofi_energy_rule_on_a_known_spectrum(energy, k):
    # sigma^2 = 9, 4, 1, 0.25: cumulative shares 0.632, 0.912, 0.982, 1
    h = _known_spectrum([3.0, 2.0, 1.0, 0.5])
    assert leverage_scores(h, "energy", energy)[1] == k


def test_lofi_rank_never_exceeds_the_numerical_rank():
    h = _known_spectrum([2.0, 1.0], n=10, d=6)  # rank 2
    for rank in (5, "energy"):
        scores, k = leverage_scores(h, rank, 1.0)
        assert k == 2 and scores.sum().item() == pytest.approx(2, abs=1e-9)
    scores, k = leverage_scores(torch.zeros(5, 3))
    assert k == 0 and torch.equal(scores, torch.zeros(5, dtype=torch.float64))
    assert methods.get("lofi").select(_ctx(torch.zeros(5, 3)), 2).kept.tolist() == [0, 1]  # ties: lower index


def test_lofi_centring():
    h = torch.randn(30, 10, generator=torch.Generator().manual_seed(4))
    shifted = h + torch.randn(1, 10, generator=torch.Generator().manual_seed(5)) * 10
    centred, _ = leverage_scores(h, 4, center=True)
    assert torch.allclose(centred, leverage_scores(h - h.mean(0), 4)[0], atol=1e-10)
    assert torch.allclose(centred, leverage_scores(shifted, 4, center=True)[0], atol=1e-8)  # shift-invariant
    assert not torch.allclose(leverage_scores(shifted, 4)[0], centred, atol=1e-3)


def test_lofi_selects_the_top_leverage_and_records_its_rank():
    h = torch.randn(64, 12, generator=torch.Generator().manual_seed(6))
    for params, k_expected in [({}, None), ({"rank": 3}, 3), ({"rank": "budget"}, 10)]:
        m = methods.get("lofi", **params)
        selection = m.select(_ctx(h), 10)
        scores, k = leverage_scores(h, 10 if m.rank == "budget" else m.rank, m.energy, m.center)
        assert torch.equal(selection.kept, torch.topk(scores, 10).indices.sort().values)
        assert selection.extra["lofi_rank"] == k == (k_expected or k)
    assert methods.get("lofi").position_policy == "renumber" and methods.get("lofi").stage == "pre_llm"


# ---------------------------------------------------------------------------------------- both
@pytest.mark.parametrize("name, params", [("gprune", {}), ("lofi", {}), ("lofi", {"rank": "budget"}),
                                          ("lofi", {"center": True})])
def test_permuting_the_tokens_permutes_the_kept_set(name, params):
    x = _clustered(n=96, d=8, seed=7)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(8))
    m = methods.get(name, **params)
    kept = m.select(_ctx(x), 24).kept
    kept_permuted = m.select(_ctx(x[perm]), 24).kept  # index j of the permuted tokens is token perm[j]
    assert torch.equal(perm[kept_permuted].sort().values, kept)


def test_bad_parameters_are_clear_errors():
    cases = [
        ("gprune", {"threshold": 0}, r"threshold must be a cosine similarity in \(0, 1\)"),
        ("gprune", {"threshold": 1.5}, r"threshold must be a cosine similarity in \(0, 1\)"),
        ("gprune", {"threshold": "0.5"}, "threshold must be a number"),
        ("gprune", {"temperature": 0}, "temperature must be > 0"),
        ("gprune", {"temperature": -0.03}, "temperature must be > 0"),
        ("gprune", {"temperature": float("nan")}, "temperature must be > 0"),
        ("gprune", {"hops": -1}, r"hops must be in \[0, inf\]"),
        ("gprune", {"hops": 2.5}, "hops must be an integer"),
        ("gprune", {"position_policy": "kept"}, "position_policy must be one of renumber, original"),
        ("lofi", {"rank": "full"}, "rank must be 'energy', 'budget' or a positive integer, got 'full'"),
        ("lofi", {"rank": 0}, "rank must be 'energy', 'budget' or a positive integer, got 0"),
        ("lofi", {"rank": 2.5}, "rank must be 'energy', 'budget' or a positive integer"),
        ("lofi", {"rank": True}, "rank must be 'energy', 'budget' or a positive integer"),
        ("lofi", {"energy": 0}, r"energy must be in \(0, 1\]"),
        ("lofi", {"energy": 1.2}, r"energy must be in \(0, 1\]"),
        ("lofi", {"energy": None}, "energy must be a number"),
        ("lofi", {"center": "yes"}, "center must be True or False"),
    ]
    for name, params, match in cases:
        with pytest.raises(ValueError, match=match):
            methods.get(name, **params)
    with pytest.raises(ValueError, match="has no parameter.*keep_ratio"):
        methods.get("gprune", keep_ratio=0.5)  # the budget is the harness's (a float budget is a ratio)
