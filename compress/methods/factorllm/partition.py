"""Partition an FFN's intermediate neurons into equal groups (experts).

Every function returns ``groups`` [shared + experts, m] of neuron ids: each id exactly once,
rows sorted, shared groups first. ``cluster`` follows MoEfication: balanced k-means, so that
neurons that fire together (or have similar weight rows) share an expert and a token's active
neurons concentrate in few experts.
"""

from __future__ import annotations

import torch

from ...errors import CompressError


def expert_size(intermediate: int, experts: int, shared: int) -> int:
    groups = experts + shared
    if intermediate % groups or intermediate < groups:
        raise CompressError(
            f"factorllm: intermediate size {intermediate} is not divisible into "
            f"experts + shared_experts = {groups} equal experts"
        )
    return intermediate // groups


def _sorted_rows(groups: torch.Tensor) -> torch.Tensor:
    return groups.sort(dim=1).values


def contiguous_partition(intermediate: int, experts: int, shared: int = 0) -> torch.Tensor:
    m = expert_size(intermediate, experts, shared)
    return torch.arange(intermediate).reshape(experts + shared, m)


def random_partition(intermediate: int, experts: int, shared: int = 0, seed: int = 0) -> torch.Tensor:
    m = expert_size(intermediate, experts, shared)
    perm = torch.randperm(intermediate, generator=torch.Generator().manual_seed(seed))
    return _sorted_rows(perm.reshape(experts + shared, m))


def balanced_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Cluster id per row of ``similarity`` [n, c] with exactly ``size`` rows per cluster.

    Greedy on all (row, cluster) pairs, most similar first: each row takes its best cluster that
    still has room (the usual balanced k-means assignment step; n * c is small here)."""
    n, c = similarity.shape
    order = similarity.reshape(-1).argsort(descending=True).tolist()
    labels = [-1] * n
    room = [size] * c
    left = n
    for flat in order:
        row, cluster = divmod(flat, c)
        if labels[row] < 0 and room[cluster] > 0:
            labels[row] = cluster
            room[cluster] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels)


def balanced_kmeans(features: torch.Tensor, clusters: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes on the rows of ``features`` [n, f]; labels [n]."""
    n = features.shape[0]
    if n % clusters:
        raise CompressError(f"factorllm: {n} neurons do not split into {clusters} equal clusters")
    x = features.float()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:clusters]].clone()
    labels = None
    for _ in range(iters):
        new = balanced_assign(x @ centroids.T, n // clusters)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return labels


def neuron_activations(gate: torch.Tensor, up: torch.Tensor, act_fn, x: torch.Tensor) -> torch.Tensor:
    """|act(gate x) * up x| per token and neuron: [tokens, I]."""
    x = x.to(gate.dtype)
    return (act_fn(x @ gate.T) * (x @ up.T)).abs()


def cluster_partition(
    features: torch.Tensor,
    experts: int,
    shared: int = 0,
    importance: torch.Tensor | None = None,
    iters: int = 25,
    seed: int = 0,
) -> torch.Tensor:
    """Groups from balanced k-means on per-neuron ``features`` [I, f].

    With ``shared`` > 0 the shared groups take the ``shared * m`` neurons of highest ``importance``
    (mean |activation|: the neurons most tokens need, as in DeepSeekMoE / LLaMA-MoE-v2); the rest
    are clustered into the routed experts."""
    intermediate = features.shape[0]
    m = expert_size(intermediate, experts, shared)
    all_ids = torch.arange(intermediate)
    shared_ids = torch.empty(0, dtype=torch.long)
    if shared:
        if importance is None:
            importance = features.norm(dim=1)
        shared_ids = importance.argsort(descending=True)[: shared * m]
        keep = torch.ones(intermediate, dtype=torch.bool)
        keep[shared_ids] = False
        all_ids = all_ids[keep]
    labels = balanced_kmeans(features[all_ids], experts, iters, seed)
    routed = torch.stack([all_ids[labels == e] for e in range(experts)])
    groups = torch.cat([shared_ids.reshape(shared, m), routed]) if shared else routed
    return _sorted_rows(groups)
