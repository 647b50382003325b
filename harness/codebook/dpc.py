"""DPC-KNN (density-peak clustering with k-nearest-neighbour density) and the codebook's two stages
(METHODS.md §1.3, as the release runs them).

dpc_knn: dist = cdist(x, x) / sqrt(D); density_i = exp(-mean squared distance to its k nearest
points, itself included) + tiny noise against ties; delta_i = distance to the nearest denser point
(the densest point: the largest distance in the matrix); centres = the `clusters` largest
delta·density; every point joins its nearest centre, and each centre its own cluster.
"""

from __future__ import annotations

import torch


def dpc_knn(x: torch.Tensor, clusters: int, k: int = 5, seed: int = 0) -> torch.Tensor:
    """(n, D) points -> (n,) cluster index in [0, min(clusters, n))."""
    x = x.float()
    n = x.shape[0]
    clusters = min(clusters, n)
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    dist = torch.cdist(x, x) / x.shape[1] ** 0.5
    nearest = dist.topk(min(k, n), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1e-6
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (delta * density).topk(clusters).indices
    assignment = dist[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters)
    return assignment


def stage_one(features: torch.Tensor, redundant: torch.Tensor, clusters: int = 8, max_size: int = 8,
              k: int = 5, seed: int = 0) -> torch.Tensor:
    """One image's probed tokens -> indices of the survivors: redundant-labelled tokens whose
    cluster (DPC-KNN over all of the image's probed tokens) has at most `max_size` members, so a
    survivor does not belong to a large group of similar tokens in its own image."""
    assignment = dpc_knn(features, clusters, k, seed)
    sizes = torch.bincount(assignment, minlength=clusters)
    return torch.nonzero(redundant.bool() & (sizes[assignment] <= max_size)).flatten()


def stage_two(features: torch.Tensor, sources: list, clusters: int = 64, min_sources: int = 64,
              k: int = 5, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Survivors pooled across images -> (indices of the prototypes, statistics): every member of a
    cluster whose members come from more than `min_sources` distinct images."""
    assignment = dpc_knn(features, clusters, k, seed)
    kept_clusters = []
    per_cluster = {}
    for c in range(int(assignment.max()) + 1 if len(assignment) else 0):
        members = torch.nonzero(assignment == c).flatten().tolist()
        distinct = len({sources[i] for i in members})
        per_cluster[c] = {"members": len(members), "distinct_images": distinct}
        if distinct > min_sources:
            kept_clusters.append(c)
    keep = torch.isin(assignment, torch.tensor(kept_clusters, dtype=torch.long))
    stats = {"candidates": len(sources), "clusters": per_cluster, "kept_clusters": kept_clusters}
    return torch.nonzero(keep).flatten(), stats
