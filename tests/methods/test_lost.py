"""lost: budget, channel selection, refinement, training, config validation."""

import pytest
import torch

from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.methods.lost import lost_shape, lowrank_sparse_factorize
from compress.methods.lost.factorize import best_split
from compress.modules import LowRankSparseLinear
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe

MLP = [r"re:.*\.(gate|up|down)_proj$"]


def _stage(**kw):
    return parse_recipe({"name": "t", "stages": [{"method": "lost", "targets": MLP, **kw}]}).stages[0]


def _windows():
    base = (torch.arange(48) * 5) % 256
    return torch.stack([(base + i) % 256 for i in range(12)])


CTX = StageContext(tokenizer=None, calibration_windows=_windows, progress=False)


def _outlier_matrix(seed=0):
    """Rank-6 weights plus noise whose per-input-channel scale is heavy-tailed (log-normal)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(40, 6, generator=gen) @ torch.randn(6, 60, generator=gen) / 3
    return W + 0.3 * torch.randn(40, 60, generator=gen) * torch.exp(torch.randn(60, generator=gen))


@pytest.mark.parametrize("reduction, fraction", [(0.3, 0.1), (0.5, 0.3), (0.4, 0.0)])
def test_budget_is_met_and_counted(tiny_llama, reduction, fraction):
    result = apply_stage(tiny_llama, _stage(reduction=reduction, sparse_fraction=fraction), CTX)
    s = result.summary
    assert reduction <= s["achieved_reduction"] < reduction + 0.01
    layers = [m for m in tiny_llama.modules() if isinstance(m, LowRankSparseLinear)]
    assert len(layers) == 6 and sum(m.stored_params for m in layers) == s["targeted_params_after"]
    assert sum(m.index_bytes for m in layers) == s["index_bytes"]
    for row, layer in zip(result.rows, layers):
        assert (row["rank"], row["channels"]) == (layer.rank, layer.channels)
        assert (layer.channels > 0) == (fraction > 0)
        assert row["rel_error"] <= row["plain_rel_error"] + 1e-9


def test_shape_never_costs_more_than_dense():
    assert lost_shape(1, 100, 0.3, 0.0) is None
    shape = lost_shape(1536, 576, 0.3, 0.2)
    assert shape.params(1536, 576) <= 0.7 * 1536 * 576 and shape.channels > 0


def test_residual_channel_pick_beats_random_channels():
    W = _outlier_matrix()
    ours = lowrank_sparse_factorize(W, 6, 8, refine_iters=0)
    for seed in range(5):
        rand = lowrank_sparse_factorize(W, 6, 8, refine_iters=0, select="random", seed=seed)
        assert ours.error < 0.85 * rand.error
    residual_norms = (W - ours.U @ ours.V).norm(dim=0)
    assert set(ours.sc_channels.tolist()) == set(residual_norms.topk(8).indices.tolist())


def test_reconstruction_matches_the_reported_error_and_refinement_helps():
    W = _outlier_matrix(1)
    plain = lowrank_sparse_factorize(W, 6, 8, refine_iters=0)
    refined = lowrank_sparse_factorize(W, 6, 8, refine_iters=3)
    assert refined.error < plain.error and refined.plain_error == pytest.approx(plain.error)
    layer = LowRankSparseLinear.from_factors(refined.U, refined.V, refined.sc_values, refined.sc_channels)
    assert float((W - layer.weight.detach()).norm() / W.norm()) == pytest.approx(refined.error, rel=1e-4)
    assert refined.error < refined.svd_error  # heavy-tailed channels: the split beats SVD at equal values


def test_activation_scaling_and_training(tiny_llama):
    result = apply_stage(
        tiny_llama, _stage(reduction=0.4, scaling="activation", train={"steps": 10, "lr": 3e-3, "batch_size": 4}), CTX
    )
    assert result.summary["calibration"]["layers"] == 2
    training = result.summary["training"]
    assert training["calibration_loss_after"] < training["calibration_loss_before"] - 0.05
    assert all(isinstance(m, LowRankSparseLinear) for n, m in tiny_llama.named_modules() if n.endswith("up_proj"))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(reduction=0.3, sparse_fraction=1.0), "stages[0].sparse_fraction"),
        (dict(reduction=0.3, sparse_fraction="half"), "stages[0].sparse_fraction"),
        (dict(reduction=0.0), "stages[0].reduction"),
        (dict(reduction=0.3, refine_iters=-1), "stages[0].refine_iters"),
        (dict(reduction=0.3, channels=4), "stages[0].channels: unknown field"),
        (dict(reduction=0.3, train={"steps": 3, "warmup_steps": 4}), "stages[0].train: warmup_steps"),
    ],
)
def test_bad_configs_are_rejected_with_the_field_path(kw, message):
    with pytest.raises(CompressError) as err:
        _stage(**kw)
    assert message in str(err.value)


def test_automatic_split_is_never_worse_than_svd_and_scores_exactly():
    W = _outlier_matrix(2)
    budget = int(0.6 * W.numel())
    rank, channels, err = best_split(W, budget)
    assert rank * (40 + 60) + channels * 40 <= budget and channels > 0
    plain = lowrank_sparse_factorize(W, rank, channels, refine_iters=0)
    assert plain.error == pytest.approx(err, rel=1e-6)  # the closed-form score is the real error
    svd_only = lowrank_sparse_factorize(W, budget // 100, 0, refine_iters=0)
    assert err < svd_only.error


def test_automatic_split_in_a_stage(tiny_llama):
    result = apply_stage(tiny_llama, _stage(reduction=0.4, sparse_fraction="auto", scaling="activation"), CTX)
    layers = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, LowRankSparseLinear)}
    assert sum(m.stored_params for m in layers.values()) == result.summary["targeted_params_after"]
    assert result.summary["achieved_reduction"] >= 0.4
    for row in result.rows:
        assert (row["rank"], row["channels"]) == (layers[row["module"]].rank, layers[row["module"]].channels)
        assert row["rel_error"] <= row["svd_rel_error"] + 1e-6


def test_whitened_lost_picks_channels_by_output_error():
    from compress.lowrank_math import shrink

    gen = torch.Generator().manual_seed(5)
    W = torch.randn(30, 50, generator=gen) / 5
    X = torch.randn(400, 50, generator=gen) * torch.exp(1.5 * torch.randn(50, generator=gen))
    X = X + 0.5 * X.roll(1, 1)
    cov = X.T.double() @ X.double() / 400
    C = shrink(cov, cov, 0.05, ridge=1e-8)
    ours = lowrank_sparse_factorize(W, 5, 6, refine_iters=0, cov=C)
    for seed in range(3):
        rand = lowrank_sparse_factorize(W, 5, 6, refine_iters=0, cov=C, select="random", seed=seed)
        assert ours.error < rand.error
    refined = lowrank_sparse_factorize(W, 5, 6, refine_iters=3, cov=C)
    assert refined.error <= ours.error
    layer = LowRankSparseLinear.from_factors(refined.U, refined.V, refined.sc_values, refined.sc_channels)
    L = torch.linalg.cholesky(C).float()
    err = float(((W - layer.weight.detach()) @ L).norm() / (W @ L).norm())
    assert err == pytest.approx(refined.error, rel=1e-4)
    budget = 5 * 80 + 6 * 30
    rank, channels, split_err = best_split(W, budget, cov=C)
    assert rank * 80 + channels * 30 <= budget
    assert split_err <= lowrank_sparse_factorize(W, budget // 80, 0, cov=C).error + 1e-9  # c = 0 is a candidate


def test_whitened_auto_stage_runs(tiny_llama):
    result = apply_stage(tiny_llama, _stage(reduction=0.4, scaling="whiten", sparse_fraction="auto"), CTX)
    assert result.summary["replaced"] == 6 and result.summary["achieved_reduction"] >= 0.4
    assert all(r["rel_error"] <= r["svd_rel_error"] + 1e-6 for r in result.rows)
