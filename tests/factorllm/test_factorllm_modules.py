"""MoEFeedForward and the partitions: exact split, balanced cover, grouped skipping, FLOP count."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compress.methods.factorllm import dense_ffn_flops, ffn_flops_per_token, moe_ffn_flops
from compress.methods.factorllm.config import FactorLLMConfig
from compress.methods.factorllm.partition import balanced_kmeans, contiguous_partition, random_partition
from compress.methods.factorllm.split import make_groups, split_ffn
from compress.modules import MODULE_TYPES, MoEFeedForward
from tests.tiny import make_tiny_llama

LAYOUTS = [(4, 2, 0), (8, 2, 0), (3, 1, 1), (4, 3, 1)]  # (experts, top_k, shared); intermediate 160 = 5 * 32
PARTITIONS = [
    ("contiguous", "activations"),
    ("random", "activations"),
    ("cluster", "weights"),
    ("cluster", "activations"),
]


@pytest.fixture(scope="module")
def mlp_and_tokens():
    model = make_tiny_llama(intermediate=160)
    mlp = model.model.layers[1].mlp
    tokens = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    return mlp, tokens


def split(mlp, tokens, experts, top_k, shared, partition="cluster", cluster_on="activations", combine="sum"):
    config = FactorLLMConfig(
        experts=experts, top_k=top_k, shared_experts=shared, partition=partition, cluster_on=cluster_on, combine=combine
    )
    return split_ffn("mlp", mlp, config, tokens)


@pytest.mark.parametrize("partition,cluster_on", PARTITIONS)
@pytest.mark.parametrize("experts,top_k,shared", LAYOUTS)
def test_partition_is_balanced_and_covers_every_neuron_once(
    mlp_and_tokens, partition, cluster_on, experts, top_k, shared
):
    if 160 % (experts + shared):
        pytest.skip("layout does not divide 160")
    mlp, tokens = mlp_and_tokens
    config = FactorLLMConfig(
        experts=experts, top_k=top_k, shared_experts=shared, partition=partition, cluster_on=cluster_on
    )
    groups = make_groups(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, mlp.act_fn, config, tokens)
    assert groups.shape == (experts + shared, 160 // (experts + shared))
    assert torch.equal(groups.reshape(-1).sort().values, torch.arange(160))


@pytest.mark.parametrize("partition,cluster_on", PARTITIONS)
@pytest.mark.parametrize("experts,shared", [(4, 0), (8, 0), (4, 1)])
def test_all_experts_active_equals_the_dense_ffn(mlp_and_tokens, partition, cluster_on, experts, shared):
    mlp, tokens = mlp_and_tokens
    moe = split(mlp, tokens, experts, experts, shared, partition, cluster_on)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense, routed = mlp(x), moe(x)
    assert torch.allclose(routed, dense, rtol=1e-5, atol=1e-6 * dense.abs().max())
    gate, up, down = moe.to_dense()  # the split kept the weights themselves
    assert torch.equal(gate, mlp.gate_proj.weight) and torch.equal(up, mlp.up_proj.weight)
    assert torch.equal(down, mlp.down_proj.weight)


def masked_dense_reference(mlp, moe, x):
    """The dense FFN with every neuron outside the chosen (and shared) experts zeroed, times the combine weight."""
    h = x.reshape(-1, 64)
    _, chosen, weights = moe.route(h)
    per_neuron = torch.zeros(h.shape[0], 160)
    for g in range(moe.shared):
        per_neuron[:, moe.neurons[g].long()] = 1.0
    for slot in range(moe.top_k):
        for n in range(h.shape[0]):
            per_neuron[n, moe.neurons[moe.shared + chosen[n, slot]].long()] = weights[n, slot]
    act = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
    return mlp.down_proj(act * per_neuron).reshape(x.shape)


@pytest.mark.parametrize("combine", ["sum", "scale", "weights"])
@pytest.mark.parametrize("experts,top_k,shared", [(4, 2, 0), (8, 2, 0), (4, 1, 1)])
def test_grouped_skipping_equals_masked_dense_reference(mlp_and_tokens, combine, experts, top_k, shared):
    mlp, tokens = mlp_and_tokens
    moe = split(mlp, tokens, experts, top_k, shared, combine=combine)
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, chosen, _ = moe.route(x.reshape(-1, 64))
        assert len(chosen.unique()) > 1  # a real mix of experts, not one expert for everything
        expected = masked_dense_reference(mlp, moe, x)
        got = moe(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    assert not torch.allclose(got, mlp(x), rtol=1e-3, atol=1e-3 * expected.abs().max())  # it really drops experts


@pytest.mark.parametrize("experts,top_k,shared", LAYOUTS)
def test_flop_count_matches_the_formula(mlp_and_tokens, experts, top_k, shared):
    mlp, tokens = mlp_and_tokens
    if 160 % (experts + shared):
        pytest.skip("layout does not divide 160")
    moe = split(mlp, tokens, experts, top_k, shared)
    x = torch.randn(1, 37, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with FlopCounterMode(display=False) as moe_count:
            moe(x)
        with FlopCounterMode(display=False) as dense_count:
            mlp(x)
    m = 160 // (experts + shared)
    assert ffn_flops_per_token(moe) == moe_ffn_flops(64, m, experts, top_k, shared)
    assert moe_count.get_total_flops() == 37 * ffn_flops_per_token(moe)
    assert dense_count.get_total_flops() == 37 * ffn_flops_per_token(mlp) == 37 * dense_ffn_flops(64, 160)
    ratio = ffn_flops_per_token(moe) / ffn_flops_per_token(mlp)
    assert ratio == pytest.approx((top_k + shared) / (experts + shared) + experts / (3 * 160), rel=1e-12)


def test_spec_rebuilds_an_empty_module_of_the_same_shape(mlp_and_tokens):
    mlp, tokens = mlp_and_tokens
    moe = split(mlp, tokens, 4, 1, 1, combine="weights")
    twin = MODULE_TYPES[moe.spec()["type"]].from_spec(moe.spec())
    assert isinstance(twin, MoEFeedForward)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in moe.state_dict().items()}
    assert twin.spec() == moe.spec()


def test_balanced_kmeans_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(4)
    centres = torch.linalg.qr(torch.randn(32, 4, generator=gen)).Q.T  # 4 orthonormal directions
    truth = torch.arange(4).repeat_interleave(25)[torch.randperm(100, generator=gen)]
    features = centres[truth] + 0.2 * torch.randn(100, 32, generator=gen) / 32**0.5
    labels = balanced_kmeans(features, 4, seed=1)
    assert torch.bincount(labels).tolist() == [25] * 4
    for c in range(4):  # each found cluster is exactly one planted cluster
        assert len(truth[labels == c].unique()) == 1


def test_simple_partitions_are_what_they_say():
    assert torch.equal(contiguous_partition(12, 3), torch.arange(12).reshape(3, 4))
    a, b = random_partition(12, 3, seed=0), random_partition(12, 3, seed=1)
    assert not torch.equal(a, b) and torch.equal(a, random_partition(12, 3, seed=0))
