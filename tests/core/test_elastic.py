"""Elastic rank: one compression serves every budget of its range, switched in place or cut to size, without data."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import compress
from compress.cli import main
from compress.elastic import budget_range, elastic_modules, ranks_for, reduction_at, selections
from compress.errors import CompressError
from compress.models import save_folder
from tests.tiny import cli_eval_one_window, make_tiny_llama

ELASTIC = {
    "method": "lowrank",
    "reduction": 0.3,
    "backend": "whiten",
    "allocation": "sensitivity",
    "sensitivity_windows": 4,
    "elastic": {"min_reduction": 0.1, "max_reduction": 0.6},
}


def _windows(n=8, length=24, seed=0):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def elastic_model():
    return compress.compress(make_tiny_llama(), [ELASTIC], calibration=_windows(), progress=False)


def _ranks(model):
    return selections(model)


def test_the_stage_stores_the_range_and_starts_at_its_reduction(elastic_model):
    modules = elastic_modules(elastic_model)
    assert len(modules) == 14  # every projection of both layers
    assert abs(reduction_at(modules, _ranks(elastic_model)) - 0.3) <= 0.005 + 1e-9
    low, high = budget_range(elastic_model)
    assert low == pytest.approx(0.1, abs=0.01) and high == 0.6
    summary = elastic_model.compression.stages[0].summary
    assert summary["targeted_params_stored"] > summary["targeted_params_after"]


def test_the_starting_budget_is_served_as_a_single_budget_compression_serves_it(elastic_model):
    plain = {key: value for key, value in ELASTIC.items() if key != "elastic"}
    fresh = compress.compress(make_tiny_llama(), [plain], calibration=_windows(), progress=False)
    fresh_ranks = {
        name: module.rank if hasattr(module, "rank") else None
        for name, module in fresh.named_modules()
        if name in elastic_modules(elastic_model)
    }
    assert _ranks(elastic_model) == fresh_ranks and None in fresh_ranks.values()  # dense where fresh keeps dense
    ids = _windows(2, 17, seed=5)
    assert torch.allclose(_logits(elastic_model, ids), _logits(fresh, ids), atol=1e-4)


def test_the_curves_are_stored_at_every_rank_and_reallocate_the_starting_budget():
    # stored ranks up to 287, more than the 257 points curves were once thinned to
    wide = make_tiny_llama(hidden=576, intermediate=640, heads=4, kv_heads=2)
    model = compress.compress(wide, [ELASTIC], calibration=_windows(), progress=False)
    for module in elastic_modules(model).values():
        assert torch.equal(module.curve_ranks, torch.arange(module.rank + 1))
    assert ranks_for(model, 0.3) == _ranks(model)  # a resize to the starting budget: the compression's own ranks


def test_matrices_a_small_budget_keeps_dense_store_their_weight_and_factorise_at_larger_ones(elastic_model):
    modules = elastic_modules(elastic_model)
    stored_dense = {name for name, m in modules.items() if m.dense_weight is not None}
    assert stored_dense and stored_dense != set(modules)
    served_dense = lambda: {name for name, rank in _ranks(elastic_model).items() if rank is None}  # noqa: E731
    compress.set_budget(elastic_model, 0.1)
    at_tenth = served_dense()
    compress.set_budget(elastic_model, 0.6)
    assert at_tenth <= stored_dense and served_dense() < at_tenth
    compress.set_budget(elastic_model, 0.3)


def test_switching_budgets_uses_views_and_comes_back_bit_identical(elastic_model):
    ids = _windows(2, 17, seed=5)
    stored = {name: m.A.data_ptr() for name, m in elastic_modules(elastic_model).items()}
    compress.set_budget(elastic_model, 0.5)
    at_half = _logits(elastic_model, ids)
    assert abs(reduction_at(elastic_modules(elastic_model), _ranks(elastic_model)) - 0.5) <= 0.005 + 1e-9
    compress.set_budget(elastic_model, 0.2)
    at_fifth = _logits(elastic_model, ids)
    compress.set_budget(elastic_model, 0.5)
    assert torch.equal(_logits(elastic_model, ids), at_half) and not torch.equal(at_fifth, at_half)
    assert {name: m.A.data_ptr() for name, m in elastic_modules(elastic_model).items()} == stored  # nothing copied
    compress.set_budget(elastic_model, 0.3)


def test_resize_cuts_the_factors_and_matches_the_switched_model(elastic_model, tmp_path):
    ids = _windows(2, 17, seed=5)
    compress.set_budget(elastic_model, 0.45)
    expected = _logits(elastic_model, ids)
    small = compress.resize(elastic_model, 0.45)
    compress.set_budget(elastic_model, 0.3)
    assert torch.allclose(_logits(small, ids), expected, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in elastic_model.parameters())
    compress.save(small, tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    saved, loaded = small.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert selections(reloaded) == selections(small)
    # same weights, same ranks; the logits agree to rounding only: transformers 5.25 loads tensors at addresses
    # that are not 64-byte aligned, and a rank-1 product then takes another SIMD path (measured: 9e-8 apart)
    assert torch.allclose(_logits(reloaded, ids), _logits(small, ids), rtol=0, atol=1e-6)
    assert budget_range(reloaded)[0] == pytest.approx(0.45, abs=0.006)  # still elastic below its new size
    assert compress.set_budget(reloaded, 0.45) == selections(small)  # and serves its own budget
    with pytest.raises(CompressError, match="outside the range"):
        compress.set_budget(reloaded, 0.2)


def test_a_fixed_resize_is_the_plain_model_of_that_budget(elastic_model):
    ids = _windows(2, 17, seed=5)
    compress.set_budget(elastic_model, 0.2)
    expected, ranks = _logits(elastic_model, ids), _ranks(elastic_model)
    fixed = compress.resize(elastic_model, 0.2, elastic=False)
    compress.set_budget(elastic_model, 0.3)
    assert torch.equal(_logits(fixed, ids), expected) and not elastic_modules(fixed)
    for name, rank in ranks.items():
        module = fixed.get_submodule(name)
        assert (type(module) is torch.nn.Linear) if rank is None else (module.rank == rank)
    targeted = sum(m.out_features * m.in_features for m in elastic_modules(elastic_model).values())
    kept = sum(p.numel() for n, p in fixed.named_parameters() if any(n.startswith(t) for t in ranks))
    assert kept / targeted == pytest.approx(1 - reduction_at(elastic_modules(elastic_model), ranks))


def test_a_reloaded_checkpoint_keeps_its_budget_and_curves(elastic_model, tmp_path):
    compress.save(elastic_model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert _ranks(reloaded) == _ranks(elastic_model)
    assert compress.set_budget(reloaded, 0.4) == compress.set_budget(elastic_model, 0.4)
    compress.set_budget(elastic_model, 0.3)


def test_a_bfloat16_model_keeps_float32_curves_and_resizes_alike(elastic_model):
    import copy

    half = copy.deepcopy(elastic_model).to(torch.bfloat16)
    for name, module in elastic_modules(half).items():
        original = elastic_modules(elastic_model)[name]
        assert module.A.dtype == torch.bfloat16 and module.curve_loss.dtype == torch.float32
        assert torch.equal(module.curve_loss, original.curve_loss)
    assert compress.set_budget(half, 0.45) == compress.set_budget(elastic_model, 0.45)
    compress.set_budget(elastic_model, 0.3)


def test_a_finetune_stage_in_the_stored_recipe_does_not_hide_the_range(elastic_model):
    import copy

    model = copy.deepcopy(elastic_model)
    stored = model.config.quantization_config
    recipe = stored["recipe"] if isinstance(stored, dict) else stored.recipe
    recipe["stages"].insert(0, {"method": "finetune", "elastic": {"budgets": [0.2, 0.4], "rule": "sum"}})
    assert budget_range(model) == budget_range(elastic_model)


@pytest.mark.parametrize("rule", ["sum", "sample"])
def test_elastic_healing_trains_every_budget(rule):
    model = compress.compress(make_tiny_llama(), [ELASTIC], calibration=_windows(16, 32), progress=False)
    before = _ranks(model)
    heal = {
        "method": "finetune",
        "steps": 12,
        "lr": 3e-3,
        "batch_size": 4,
        "elastic": {"budgets": [0.2, 0.4, 0.55], "rule": rule},
    }
    dense = {n: m.dense_weight.clone() for n, m in elastic_modules(model).items() if m.dense_weight is not None}
    model = compress.compress(model, [heal], calibration=_windows(16, 32), progress=False)
    assert dense and all(torch.equal(elastic_modules(model)[n].dense_weight, w) for n, w in dense.items())
    summary = model.compression.stages[0].summary
    assert summary["calibration_loss_after"] < summary["calibration_loss_before"]
    assert summary["elastic"] == f"{rule} over [0.2, 0.4, 0.55]" and _ranks(model) == before


def test_run_reports_budgets_and_resize_writes_a_smaller_checkpoint(tmp_path, smol_tokenizer, capsys):
    folder = tmp_path / "tiny"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-elastic",
                "stages": [ELASTIC],
                "calibration": {"samples": 8, "seq_len": 32},
                "eval": {"tasks": [], "perplexity_windows": 1, "seq_len": 64, "budgets": [0.1, 0.3, 0.5]},
            }
        )
    )
    assert main(["run", str(recipe), str(folder), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    budgets = report["eval_compressed"]["budgets"]
    assert [b["requested_reduction"] for b in budgets] == [0.1, 0.3, 0.5]
    assert "## Budgets this elastic checkpoint serves" in (tmp_path / "run" / "report.md").read_text()
    assert main(["resize", str(tmp_path / "run"), "--reduction", "0.5", "--out", str(tmp_path / "r50")]) == 0
    assert "resized to 5" in capsys.readouterr().out
    size = lambda f: sum(p.stat().st_size for p in f.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "r50") < size(tmp_path / "run" / "model")
    scores = cli_eval_one_window(tmp_path / "r50", tmp_path / "e.json")
    ppl = scores["perplexity"]["perplexity"]
    assert ppl == pytest.approx(budgets[2]["perplexity"], rel=1e-4)  # the resized model scores as its budget did
    fixed = ["resize", str(tmp_path / "run"), "--reduction", "0.1", "--fixed", "--out", str(tmp_path / "f10")]
    assert main(fixed) == 0 and "this budget only" in capsys.readouterr().out
    assert main([*fixed[:4], "--out", str(tmp_path / "r10")]) == 0
    assert size(tmp_path / "f10") < size(tmp_path / "r10")  # no factors beside the matrices served dense
    scores = cli_eval_one_window(tmp_path / "f10", tmp_path / "f.json")
    assert scores["perplexity"]["perplexity"] == pytest.approx(budgets[0]["perplexity"], rel=1e-4)
    assert main(["resize", str(tmp_path / "run"), "--reduction", "0.9", "--out", str(tmp_path / "r90")]) == 2
    assert "outside the range" in capsys.readouterr().err and not (tmp_path / "r90").exists()


def test_calibrating_on_another_budget_pools_its_stream_from_layer_1_on(elastic_model):
    pooled_stage = {**ELASTIC, "sequential": True, "elastic": {**ELASTIC["elastic"], "calibrate_on": [0.6]}}
    plain_stage = {**ELASTIC, "sequential": True}
    pooled, plain = (
        compress.compress(make_tiny_llama(), [stage], calibration=_windows(), progress=False)
        for stage in (pooled_stage, plain_stage)
    )
    assert pooled.compression.stages[0].summary["calibrated_on"] == [0.3, 0.6]
    assert selections(pooled) == selections(plain)  # the ranks come from the curves, not from the streams
    for name, module in elastic_modules(plain).items():
        other = pooled.get_submodule(name)
        # layer 0's inputs are the same on every stream: equal up to the rounding of a threaded sum
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in ((module.A, other.A), (module.B, other.B)))
        assert same == (".layers.0." in name), name

    with pytest.raises(CompressError, match="calibrate_on budgets must lie in the elastic range"):
        bad = {**ELASTIC, "elastic": {**ELASTIC["elastic"], "calibrate_on": [0.7]}}
        compress.compress(make_tiny_llama(), [bad], calibration=_windows(), progress=False)


def test_nested_segments_fit_the_smallest_rank_first_and_extend_the_last_range_to_the_stored_rank():
    from compress.methods.lowrank.apply import nested_segments

    assert nested_segments([40, 15], 60) == ((15, 1), (60, 0))  # main stream at rank 40, variant 1 at 15
    assert nested_segments([40, None], 60) == ((60, 0),)  # dense on the variant's budget: one range
    assert nested_segments([None, 15], 60) == ((60, 1),)  # factorised only on the variant's budget
    assert nested_segments([None, None], 60) == ((60, 0),)
    assert nested_segments([20, 20, 8], 30) == ((8, 2), (30, 0))  # equal ranks: the first stream's range


def test_nested_fit_serves_a_calibrated_budget_as_a_run_started_at_that_budget():
    # the leading ranges fit the 60 % stream, which runs through the leading ranges of the layers before: at
    # 60 % the nested model is the model an elastic run started at 60 % serves (same streams, same objective)
    stage = {**ELASTIC, "backend": "whiten_dense_target", "shrinkage": 0.1}
    nested_stage = {**stage, "elastic": {**ELASTIC["elastic"], "calibrate_on": [0.6], "fit": "nested"}}
    nested = compress.compress(make_tiny_llama(), [nested_stage], calibration=_windows(), progress=False)
    at_60 = compress.compress(make_tiny_llama(), [{**stage, "reduction": 0.6}], calibration=_windows(), progress=False)
    plain = compress.compress(make_tiny_llama(), [stage], calibration=_windows(), progress=False)
    assert nested.compression.stages[0].summary["calibration_fit"] == "nested"
    compress.set_budget(nested, 0.6)
    assert selections(nested) == selections(at_60)
    ids = _windows(2, 17, seed=5)
    assert torch.allclose(_logits(nested, ids), _logits(at_60, ids), atol=1e-4)
    compress.set_budget(plain, 0.6)  # calibrated on the 30 % stream only: another model at 60 %
    assert not torch.allclose(_logits(plain, ids), _logits(at_60, ids), atol=1e-3)
    compress.set_budget(nested, 0.3)
    compress.set_budget(plain, 0.3)
    assert selections(nested) == selections(plain)
    with pytest.raises(CompressError, match="nested needs a whitening backend"):
        bad = {**nested_stage, "backend": "asvd"}
        compress.compress(make_tiny_llama(), [bad], calibration=_windows(), progress=False)


ANCHORED = {
    **ELASTIC,
    "backend": "whiten_dense_target",
    "shrinkage": 0.1,
    "elastic": {**ELASTIC["elastic"], "calibrate_on": [0.6], "fit": "anchored"},
}


@pytest.fixture(scope="module")
def anchored_model():
    return compress.compress(make_tiny_llama(), [ANCHORED], calibration=_windows(), progress=False)


def test_an_anchor_serves_its_budget_as_a_run_started_there_and_the_main_factors_the_budgets_below(anchored_model):
    # the 60 % anchor is fit on the 60 % stream, which runs the layers before through that anchor's factors:
    # at 60 % the model is the one an elastic run started at 60 % serves; below 60 %, the single-stream model
    stage = {key: value for key, value in ANCHORED.items() if key != "elastic"}
    stage["elastic"] = ELASTIC["elastic"]
    at_60 = compress.compress(make_tiny_llama(), [{**stage, "reduction": 0.6}], calibration=_windows(), progress=False)
    plain = compress.compress(make_tiny_llama(), [stage], calibration=_windows(), progress=False)
    ids = _windows(2, 17, seed=5)
    assert anchored_model.compression.stages[0].summary["calibration_fit"] == "anchored"
    assert torch.equal(_logits(anchored_model, ids), _logits(plain, ids))
    for budget in (0.45, 0.1):
        compress.set_budget(anchored_model, budget)
        compress.set_budget(plain, budget)
        assert selections(anchored_model) == selections(plain)
        assert torch.equal(_logits(anchored_model, ids), _logits(plain, ids))
    compress.set_budget(anchored_model, 0.6)
    compress.set_budget(at_60, 0.6)
    served = selections(anchored_model)
    assert {r for r in served.values() if r is not None} and all(r is None or r[0] == 1 for r in served.values())
    assert {n: r and r[1] for n, r in served.items()} == selections(at_60)
    assert torch.equal(_logits(anchored_model, ids), _logits(at_60, ids))
    compress.set_budget(plain, 0.6)  # without the anchor: the 30 % stream's factors, another model at 60 %
    assert not torch.allclose(_logits(plain, ids), _logits(at_60, ids), atol=1e-3)
    compress.set_budget(anchored_model, 0.3)


def test_an_anchored_checkpoint_counts_its_anchors_and_resizes_and_reloads(anchored_model, tmp_path):
    summary = anchored_model.compression.stages[0].summary
    stored = sum(
        m.A.numel()
        + m.B.numel()
        + sum(a.numel() + b.numel() for a, b in zip(m.anchor_A, m.anchor_B))
        + (m.dense_weight.numel() if m.dense_weight is not None else 0)
        for m in elastic_modules(anchored_model).values()
    )
    assert summary["targeted_params_stored"] == stored
    ids = _windows(2, 17, seed=5)
    for budget in (0.45, 0.6):  # served by the main factors, then by the anchor (promoted to the main factors)
        compress.set_budget(anchored_model, budget)
        expected = _logits(anchored_model, ids)
        small = compress.resize(anchored_model, budget)
        assert torch.equal(_logits(small, ids), expected)
        # the 60 % anchor stays while a larger budget needs it; served by it, it becomes the main factors (of the
        # modules served dense too, beside their dense weight)
        assert {tuple(m.anchor_budgets) for m in elastic_modules(small).values()} == {(0.6,) if budget < 0.6 else ()}
        compress.save(small, tmp_path / str(budget))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(budget)).eval()
        saved, loaded = small.state_dict(), reloaded.state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert selections(reloaded) == selections(small)
        assert torch.allclose(_logits(reloaded, ids), _logits(small, ids), rtol=0, atol=1e-6)
        fixed = compress.resize(anchored_model, budget, elastic=False)
        assert torch.equal(_logits(fixed, ids), expected) and not elastic_modules(fixed)
    compress.set_budget(anchored_model, 0.3)


def test_an_anchored_fit_needs_budgets_above_the_starting_one():
    for calibrate_on in ([], [0.2], [0.6, 0.3]):
        bad = {**ANCHORED, "elastic": {**ANCHORED["elastic"], "calibrate_on": calibrate_on}}
        with pytest.raises(CompressError, match="anchored needs calibrate_on budgets, all above reduction"):
            compress.compress(make_tiny_llama(), [bad], calibration=_windows(), progress=False)


def test_an_anchored_run_serves_its_anchor_from_the_streamed_checkpoint(tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, folder)
    recipe = tmp_path / "r.yaml"
    plan = {
        "name": "tiny-anchored",
        "stages": [{**ANCHORED, "sequential": True}],
        "calibration": {"samples": 8, "seq_len": 32},
        "eval": {"tasks": [], "perplexity_windows": 1, "seq_len": 64, "budgets": [0.3, 0.6]},
    }
    recipe.write_text(yaml.safe_dump(plan))
    assert main(["run", str(recipe), str(folder), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    budgets = json.loads((tmp_path / "run" / "report.json").read_text())["eval_compressed"]["budgets"]
    assert main(["resize", str(tmp_path / "run"), "--reduction", "0.6", "--out", str(tmp_path / "r60")]) == 0
    resized = AutoModelForCausalLM.from_pretrained(tmp_path / "r60")
    assert not any(m.anchor_budgets for m in elastic_modules(resized).values() if m.selection is not None)
    scores = cli_eval_one_window(tmp_path / "r60", tmp_path / "e.json")
    assert scores["perplexity"]["perplexity"] == pytest.approx(budgets[1]["perplexity"], rel=1e-4)


def test_elastic_healing_trains_each_budget_of_an_anchored_checkpoint_through_its_own_factors(anchored_model):
    import copy

    from compress.training import mean_loss

    model, windows = copy.deepcopy(anchored_model), _windows(16, 32)

    def loss_at(budget):
        compress.set_budget(model, budget)
        return mean_loss(model, windows, 8)

    before_loss = {budget: loss_at(budget) for budget in (0.2, 0.6)}
    compress.set_budget(model, 0.3)
    before = {name: (m.A.clone(), m.anchor_A[0].clone()) for name, m in elastic_modules(model).items()}
    heal = {"method": "finetune", "steps": 12, "lr": 3e-3, "batch_size": 4}
    heal["elastic"] = {"budgets": [0.2, 0.6], "rule": "sum"}
    model = compress.compress(model, [heal], calibration=windows, progress=False)
    assert all(loss_at(budget) < loss for budget, loss in before_loss.items())
    at_20, at_60 = ranks_for(model, 0.2), ranks_for(model, 0.6)
    for name, m in elastic_modules(model).items():
        main, anchor = before[name]
        assert torch.equal(m.A, main) == (at_20[name] is None), name  # the 20 % budget trains the main factors
        assert torch.equal(m.anchor_A[0], anchor) == (at_60[name] is None), name  # the 60 % budget its anchor's
    compress.set_budget(model, 0.3)


def test_several_anchors_each_serve_their_budget_up_to_the_next():
    stage = {**ANCHORED, "elastic": {**ANCHORED["elastic"], "calibrate_on": [0.6, 0.45]}}
    model = compress.compress(make_tiny_llama(), [stage], calibration=_windows(), progress=False)
    plain = {key: value for key, value in ANCHORED.items() if key != "elastic"}
    at_45 = compress.compress(
        make_tiny_llama(),
        [{**plain, "elastic": ELASTIC["elastic"], "reduction": 0.45}],
        calibration=_windows(),
        progress=False,
    )
    assert model.compression.stages[0].summary["calibrated_on"] == [0.3, 0.45, 0.6]
    ids = _windows(2, 17, seed=5)
    for budget, anchor in ((0.4, 0), (0.45, 1), (0.55, 1), (0.6, 2)):
        served = {r for r in compress.set_budget(model, budget).values() if r is not None}
        assert {r[0] if isinstance(r, tuple) else 0 for r in served} == {anchor}, budget
    compress.set_budget(model, 0.45)
    compress.set_budget(at_45, 0.45)
    assert torch.equal(_logits(model, ids), _logits(at_45, ids))
    resized = compress.resize(model, 0.5)  # the 45 % anchor's factors become the main ones; the 60 % anchor stays
    for budget in (0.5, 0.6):
        compress.set_budget(resized, budget)
        compress.set_budget(model, budget)
        assert torch.equal(_logits(resized, ids), _logits(model, ids)), budget
