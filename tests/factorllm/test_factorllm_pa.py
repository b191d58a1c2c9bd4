"""PA loss pieces against brute force, and routers that learn on a tiny model (held-out agreement)."""

import itertools

import pytest
import torch

from compress.methods.base import StageContext
from compress.methods.factorllm import measure_agreement
from compress.methods.factorllm.pa_loss import (
    agreement,
    balance_loss,
    best_subset_errors,
    pa_errors,
    pseudo_labels,
    route_loss,
)
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe
from tests.tiny import make_tiny_llama


def outputs(n=50, experts=4, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, experts, d, generator=gen), torch.randn(n, d, generator=gen)


def test_pa_labels_are_the_experts_closest_to_their_share_of_the_teacher():
    routed, target = outputs()
    labels = pseudo_labels(routed, target, 2, "pa")
    for n in range(routed.shape[0]):
        errors = [float(((routed[n, e] - target[n] * 2 / 4) ** 2).mean()) for e in range(4)]
        assert set(labels[n].nonzero().flatten().tolist()) == set(sorted(range(4), key=errors.__getitem__)[:2])
    assert torch.allclose(pa_errors(routed, target, 2)[3, 1], ((routed[3, 1] - target[3] / 2) ** 2).mean())


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_best_subset_labels_match_brute_force(scale):
    routed, target = outputs(n=30, experts=5)
    err, mask = best_subset_errors(routed, target, 2, scale)
    labels = pseudo_labels(routed, target, 2, "best_subset", scale)
    for n in range(30):
        brute = {
            combo: float(((target[n].double() - scale * routed[n, list(combo)].double().sum(0)) ** 2).sum())
            for combo in itertools.combinations(range(5), 2)
        }
        assert set(labels[n].nonzero().flatten().tolist()) == set(min(brute, key=brute.get))
        for row, combo in enumerate(itertools.combinations(range(5), 2)):
            assert float(err[n, row]) == pytest.approx(brute[combo], rel=1e-9, abs=1e-9)


def test_route_loss_is_zero_only_at_the_label_distribution():
    labels = torch.tensor([[True, False, True, False], [False, True, False, True]])
    assert float(route_loss(labels.float(), labels)) == pytest.approx(0.0, abs=1e-7)
    assert float(route_loss(labels.float() + 5.0, labels)) == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    assert float(route_loss(torch.zeros(2, 4), labels)) > 0.01
    assert agreement(labels.float(), labels, 2) == (1.0, 1.0)
    assert agreement((~labels).float(), labels, 2) == (0.0, 0.0)


def test_balance_loss_is_one_at_uniform_load_and_larger_when_skewed():
    uniform = torch.eye(4).repeat(8, 1)  # each expert the top-1 of a quarter of the tokens
    assert float(balance_loss(uniform, 1)) == pytest.approx(1.0, rel=1e-6)
    skewed = torch.zeros(32, 4)
    skewed[:, 0] = 3.0
    assert float(balance_loss(skewed, 1)) > 2.0


def tiny_run(stage: dict, windows: torch.Tensor):
    model = make_tiny_llama()
    recipe = parse_recipe({"name": "t", "stages": [{"method": "factorllm", **stage}]})
    result = apply_stage(model, recipe.stages[0], StageContext(None, lambda: windows, progress=False))
    return model, result


@pytest.fixture(scope="module")
def windows():
    fit = torch.randint(3, 256, (64, 64), generator=torch.Generator().manual_seed(0))
    held = torch.randint(3, 256, (12, 64), generator=torch.Generator().manual_seed(1))
    return fit, held


@pytest.mark.parametrize("labels", ["pa", "best_subset"])
def test_layerwise_router_fit_agrees_with_labels_on_held_out_tokens(windows, labels):
    fit, held = windows
    stage = {"experts": 4, "top_k": 1, "labels": labels, "router_fit_windows": 64}
    untrained, _ = tiny_run({**stage, "router_fit": "none"}, fit)
    fitted, result = tiny_run(stage, fit)
    before = measure_agreement(untrained, held, labels)
    after = measure_agreement(fitted, held, labels)
    assert after["chance"] == 0.25
    assert before["agreement"] < 0.35  # an untrained router is at chance
    assert after["agreement"] > 0.4 and after["agreement"] > before["agreement"] + 0.12
    assert result.summary["router_fit_agreement"] > after["agreement"] - 0.2  # fit and held-out roughly agree


def test_end_to_end_router_training_learns_the_pa_labels(windows):
    fit, held = windows
    model, result = tiny_run(
        {
            "experts": 4,
            "top_k": 1,
            "router_fit": "none",
            "trainable": "router",
            "train": {"steps": 30, "batch_size": 8, "schedule": "constant"},
            "router_lr": 3e-2,
        },
        fit,
    )
    after = measure_agreement(model, held)
    curve = result.series["agreement"]
    assert len(curve) == len(result.series["train_loss"]) == 30
    assert sum(curve[:3]) / 3 < 0.35  # starts at chance
    assert after["agreement"] > 0.38
    route = result.series["route"]
    assert sum(route[-5:]) / 5 < 0.8 * sum(route[:5]) / 5


def test_router_plus_experts_training_reduces_distillation_and_keeps_the_rest_frozen(windows):
    fit, _ = windows
    reference = make_tiny_llama().state_dict()
    model, result = tiny_run(
        {
            "experts": 4,
            "top_k": 1,
            "router_fit_windows": 16,
            "trainable": "router+experts",
            "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "schedule": "constant"},
        },
        fit,
    )
    distill = result.series["distill"]
    assert sum(distill[-4:]) / 4 < 0.9 * sum(distill[:4]) / 4
    state = model.state_dict()
    frozen = [k for k in reference if ".mlp." not in k]
    assert frozen and all(torch.equal(state[k], reference[k]) for k in frozen)
    assert result.summary["training"]["trainable_params"] == 2 * (160 * 64 * 3 + 4 * 64 + 4)
