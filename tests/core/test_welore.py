import pytest
import torch
from torch import nn

from compress.errors import CompressError
from compress.lowrank_math import breakeven_rank, normalised_spectrum, truncated_svd_factors
from compress.methods.base import StageContext
from compress.methods.welore.apply import MatrixSpectrum, find_tau, total_params
from compress.modules import LowRankLinear
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe

TARGETS = [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"]
CTX = StageContext(tokenizer=None, calibration_windows=lambda: None, progress=False)


def _stage(**kw):
    return parse_recipe({"name": "t", "stages": [{"method": "welore", "targets": TARGETS, **kw}]}).stages[0]


def test_normalised_spectrum_definition():
    torch.manual_seed(0)
    W = torch.randn(20, 30)
    s = torch.linalg.svdvals(W.double())
    expected = (s - s.min()) / (s.max() - s.min())
    assert torch.allclose(normalised_spectrum(W), expected)
    assert normalised_spectrum(W)[0] == 1 and normalised_spectrum(W)[-1] == 0


def test_lowrank_linear_is_exactly_the_truncated_svd():
    torch.manual_seed(0)
    linear = nn.Linear(48, 32, bias=True)
    A, B = truncated_svd_factors(linear.weight, 7)
    layer = LowRankLinear.from_factors(A, B, linear.bias)
    U, S, Vh = torch.linalg.svd(linear.weight.double(), full_matrices=False)
    W7 = (U[:, :7] * S[:7]) @ Vh[:7]
    assert torch.allclose(layer.weight.double(), W7, atol=1e-5)
    x = torch.randn(5, 48)
    assert torch.allclose(layer(x), x @ W7.float().T + linear.bias, atol=1e-5)
    # WeLore's balanced split: A = U sqrt(S), B = sqrt(S) V^T have equal column/row norms
    assert torch.allclose(A.norm(dim=0), B.norm(dim=1), rtol=1e-4)


def test_ranks_follow_the_threshold_rule():
    torch.manual_seed(0)
    W = torch.randn(64, 64) @ torch.diag(torch.logspace(0, -3, 64))
    spectrum = MatrixSpectrum(64, 64, normalised_spectrum(W))
    for tau in (0.01, 0.1, 0.5):
        removed = int((spectrum.spectrum < tau).sum())
        rank = spectrum.decision(tau, 0.0)
        assert rank is None or rank == 64 - removed
        # never factorise when k (m + n) >= m n
        assert rank is None or rank * 128 < 64 * 64
    assert spectrum.decision(1e-9, 0.0) is None  # nothing removed: stays dense
    assert spectrum.decision(0.5, min_ratio=0.99) is None  # N-LRC under min_ratio


@pytest.mark.parametrize("reduction", [0.1, 0.3, 0.5])
def test_bisection_meets_the_parameter_budget(tiny_llama, reduction):
    result = apply_stage(tiny_llama, _stage(reduction=reduction), CTX)
    achieved = result.summary["achieved_reduction"]
    assert abs(achieved - reduction) <= 0.005, achieved
    after = sum(p.numel() for n, p in tiny_llama.named_parameters() if "_proj" in n)
    assert after == result.summary["targeted_params_after"]
    for row in result.rows:
        if row["kind"] == "LRC":
            assert row["rank"] <= breakeven_rank(*map(int, row["shape"].split("x")))


def test_one_global_threshold_gives_non_uniform_ranks(tiny_llama):
    with torch.no_grad():  # plant a heavy-tailed spectrum in one matrix
        q = tiny_llama.model.layers[0].self_attn.q_proj.weight
        U, S, Vh = torch.linalg.svd(q, full_matrices=False)
        q.copy_((U * (S * torch.logspace(0, -4, S.numel()))) @ Vh)
    result = apply_stage(tiny_llama, _stage(reduction=0.2), CTX)
    ranks = {row["module"]: row["rank"] for row in result.rows}
    assert ranks["model.layers.0.self_attn.q_proj"] < min(v for k, v in ranks.items() if "q_proj" not in k)


def test_threshold_mode_and_unreachable_budget(tiny_llama):
    result = apply_stage(tiny_llama, _stage(threshold=0.3), CTX)
    assert result.summary["tau"] == 0.3
    spectra = {"a": MatrixSpectrum(4, 4, torch.tensor([1.0, 0.9, 0.8, 0.0]))}
    with pytest.raises(CompressError, match="out of reach"):
        find_tau(spectra, 0.9, 0.0)
    assert total_params(spectra, 0.5, 0.0) == 16  # rank 3 of 4x4 would not save parameters


def test_welore_rejects_non_linear_targets(tiny_llama):
    with pytest.raises(CompressError, match="not a Linear"):
        apply_stage(
            tiny_llama,
            parse_recipe(
                {"name": "t", "stages": [{"method": "welore", "targets": ["LlamaRMSNorm"], "reduction": 0.2}]}
            ).stages[0],
            CTX,
        )
