"""dsformer: budget, IHT/ALS fit, STF training, config validation."""

import pytest
import torch

from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.methods.dsformer import dense_sparse_factorize, dsformer_shape
from compress.methods.dsformer.factorize import project_columns
from compress.methods.dsformer.stf import STFDenseSparseLinear
from compress.modules import DenseSparseLinear
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe

MLP = [r"re:.*\.(gate|up|down)_proj$"]


def _stage(**kw):
    return parse_recipe({"name": "t", "stages": [{"method": "dsformer", "targets": MLP, **kw}]}).stages[0]


def _windows(n=12, length=48, vocab=256):
    """Learnable token windows: a fixed periodic pattern with a random phase per window."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.arange(length) * 7 + torch.arange(length) // 3) % vocab
    return torch.stack([(base + int(torch.randint(0, 5, (1,), generator=gen))) % vocab for _ in range(n)])


CTX = StageContext(tokenizer=None, calibration_windows=_windows, progress=False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(reduction=0.3),
        dict(reduction=0.5, sparsity=0.5),
        dict(reduction=0.4, nnz_per_column=6),
        dict(reduction=0.5, pattern="2:4"),
    ],
)
def test_budget_is_met_and_counted(tiny_llama, kw):
    result = apply_stage(tiny_llama, _stage(iters=3, **kw), CTX)
    s = result.summary
    assert s["achieved_reduction"] >= kw["reduction"]
    assert s["achieved_reduction"] - kw["reduction"] < (0.06 if "pattern" in kw else 0.01)
    layers = [m for m in tiny_llama.modules() if isinstance(m, DenseSparseLinear)]
    assert len(layers) == len(result.rows) == 6 and s["replaced"] == 6
    assert sum(m.stored_params for m in layers) == s["targeted_params_after"]
    assert sum(m.index_bytes for m in layers) == s["index_bytes"] > 0
    for row, layer in zip(result.rows, layers):
        assert (row["k"], row["s"]) == (layer.k, layer.s)
        assert row["params_after"] < row["params_before"]
        assert (layer.sparse != 0).sum(0).le(layer.s).all()
    if "nnz_per_column" in kw:
        assert all(layer.s == 6 for layer in layers)


def test_shape_never_costs_more_than_dense():
    assert dsformer_shape(1, 100, 0.3, 0.75) is None  # even s = 1 does not fit the budget
    assert dsformer_shape(576, 1536, 0.05, 0.75) is None  # 5 % fewer values, but more bytes with the indices
    assert dsformer_shape(576, 1536, 0.05, 0.75, budget_unit="bytes") is not None
    shape = dsformer_shape(576, 1536, 0.3, 0.75)
    assert shape.params(576, 1536) <= 0.7 * 576 * 1536 and shape.k > 576 > shape.s
    by_bytes = dsformer_shape(576, 1536, 0.3, 0.75, budget_unit="bytes")
    assert by_bytes.k * 576 * 4 + by_bytes.s * 1536 * (4 + 2) <= 0.7 * 576 * 1536 * 4


def test_alternating_fit_beats_its_initialisation_and_svd():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=gen) @ torch.diag(torch.linspace(2, 0.2, 64)) / 8
    f = dense_sparse_factorize(W, 24, 6, iters=30)
    assert f.errors[0] == pytest.approx(float((W - f.D @ project_columns(f.D.T @ W, 6)).norm() / W.norm()), abs=1)
    assert f.final_error < 0.9 * f.initial_error
    assert f.final_error < f.svd_error
    assert f.final_error == pytest.approx(float((W - f.D @ f.S).norm() / W.norm()), rel=1e-4)
    assert (f.S != 0).sum(0).le(6).all()


def test_scaled_fit_keeps_column_supports():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(20, 30, generator=gen)
    scale = torch.rand(30, generator=gen) + 0.5
    f = dense_sparse_factorize(W, 10, 3, iters=5, scale=scale)
    assert (f.S != 0).sum(0).le(3).all()
    weighted = float(((W - f.D @ f.S) * scale).norm() / (W * scale).norm())
    assert weighted == pytest.approx(f.final_error, rel=1e-4)


def test_stf_forward_projects_and_backward_goes_straight_through():
    gen = torch.Generator().manual_seed(2)
    layer = DenseSparseLinear.from_dense_factors(torch.randn(6, 8, generator=gen), torch.randn(8, 10, generator=gen), 3)
    stf = STFDenseSparseLinear(layer)
    x = torch.randn(4, 10, generator=gen)
    assert torch.allclose(stf(x), layer(x), atol=1e-6)
    stf(x).square().sum().backward()
    off_support = layer.sparse == 0
    assert stf.latent.grad[off_support].abs().sum() > 0  # entries outside the support get gradient
    with torch.no_grad():
        stf.latent[off_support] += 100.0  # now they dominate: the compact form picks them
    compact = stf.to_compact()
    assert ((compact.sparse != 0) == off_support).sum(0).eq(3).all() or compact.s == 3


def test_stf_training_lowers_the_loss(tiny_llama):
    result = apply_stage(
        tiny_llama,
        _stage(reduction=0.4, iters=5, train={"steps": 12, "lr": 3e-3, "batch_size": 4, "eval_windows": 4}),
        CTX,
    )
    training = result.summary["training"]
    assert training["steps"] == 12 and training["tokens"] > 0
    assert training["calibration_loss_after"] < training["calibration_loss_before"] - 0.05
    assert len(result.series["train_loss"]) == 12
    layers = [m for m in tiny_llama.modules() if isinstance(m, DenseSparseLinear)]
    assert len(layers) == 6  # compact again after training
    assert all((m.sparse != 0).sum(0).le(m.s).all() for m in layers)
    assert not any(p.requires_grad for p in tiny_llama.parameters())


def test_activation_scaling_runs_layer_by_layer(tiny_llama):
    result = apply_stage(tiny_llama, _stage(reduction=0.3, iters=3, scaling="activation"), CTX)
    assert result.summary["calibration"]["layers"] == 2
    assert all(r["rel_error"] < 1 for r in result.rows)
    assert torch.isfinite(tiny_llama(_windows()[:2]).logits).all()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(reduction=1.5), "stages[0].reduction"),
        (dict(reduction=0.3, sparsity=0.5, nnz_per_column=4), "at most one of 'sparsity' or 'nnz_per_column'"),
        (dict(reduction=0.3, pattern="2:4", sparsity=0.7), "stages[0]: pattern '2:4'"),
        (dict(reduction=0.3, train={"steps": 5, "warmup_steps": 5}), "stages[0].train: warmup_steps"),
        (dict(reduction=0.3, steps=5), "stages[0].steps: unknown field"),
        (dict(reduction=0.3, rank=4), "stages[0].rank: unknown field"),
        (dict(reduction=0.3, scaling="pca"), "stages[0].scaling"),
        (dict(reduction=0.3, scaling="whiten", shrinkage=-1), "stages[0].shrinkage"),
        (dict(), "stages[0].reduction"),
    ],
)
def test_bad_configs_are_rejected_with_the_field_path(kw, message):
    with pytest.raises(CompressError) as err:
        _stage(**kw)
    assert message in str(err.value)


def test_non_linear_targets_are_rejected(tiny_llama):
    stage = parse_recipe(
        {"name": "t", "stages": [{"method": "dsformer", "targets": ["LlamaRMSNorm"], "reduction": 0.3}]}
    ).stages[0]
    with pytest.raises(CompressError, match="not a Linear"):
        apply_stage(tiny_llama, stage, CTX)


def _correlated_covariance(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(512, n, generator=gen) * torch.exp(torch.randn(n, generator=gen))
    X = X + 0.7 * X[:, torch.randperm(n, generator=gen)]
    return X.T.double() @ X.double() / 512


def test_whitened_fit_minimises_the_output_error():
    from compress.lowrank_math import shrink

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(24, 40, generator=gen)
    cov = _correlated_covariance(40)
    C = shrink(cov, cov, 0.05, ridge=1e-8)
    f = dense_sparse_factorize(W, 16, 4, iters=25, cov=C)
    assert (f.S != 0).sum(0).le(4).all()
    L = torch.linalg.cholesky(C).float()

    def out_err(D, S):
        return float(((W - D @ S) @ L).norm() / (W @ L).norm())

    assert out_err(f.D, f.S) == pytest.approx(f.final_error, rel=1e-3)
    assert f.final_error < 0.8 * f.initial_error
    diag = dense_sparse_factorize(W, 16, 4, iters=25, scale=C.diagonal().sqrt())
    assert f.final_error < out_err(diag.D, diag.S)  # the full covariance beats its diagonal


def test_whitened_stage_runs(tiny_llama):
    result = apply_stage(tiny_llama, _stage(reduction=0.4, iters=3, scaling="whiten"), CTX)
    assert result.summary["calibration"]["layers"] == 2 and result.summary["replaced"] == 6
    assert torch.isfinite(tiny_llama(_windows()[:2]).logits).all()
