"""Checkpoint round trip for DenseSparseLinear (dsformer) and LowRankSparseLinear (lost)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import compress  # also registers the checkpoint format
from compress.checkpoint import mark_compressed
from compress.job import safetensors_bytes
from compress.methods.base import StageContext
from compress.models import load_folder, save_folder
from compress.modules import DenseSparseLinear, LowRankSparseLinear
from compress.pipeline import compress_model
from compress.recipe import parse_recipe
from tests.tiny import make_tiny_llama

RECIPE = {
    "name": "t",
    "stages": [
        {"method": "dsformer", "targets": [r"re:.*layers\.0\.mlp\..*_proj$"], "reduction": 0.4, "iters": 3},
        {
            "method": "dsformer",
            "targets": [r"re:.*layers\.1\.self_attn\.[qo]_proj$"],
            "reduction": 0.5,
            "pattern": "2:4",
            "iters": 2,
        },
        {"method": "lost", "targets": [r"re:.*layers\.1\.mlp\..*_proj$"], "reduction": 0.4, "sparse_fraction": 0.2},
    ],
}


@pytest.fixture
def saved(tmp_path, smol_tokenizer):
    model = make_tiny_llama(vocab_size=len(smol_tokenizer))
    dense_dir = tmp_path / "dense"
    save_folder(model, smol_tokenizer, dense_dir)
    recipe = parse_recipe(RECIPE)
    results = compress_model(model, recipe, StageContext(smol_tokenizer, lambda: None, progress=False))
    mark_compressed(model, recipe.model_dump(mode="json"))
    folder = tmp_path / "model"
    save_folder(model, smol_tokenizer, folder)
    return model, folder, dense_dir, results


def test_round_trip_gives_identical_logits_and_exact_indices(saved):
    model, folder, _, _ = saved
    specs = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    assert specs["model.layers.0.mlp.up_proj"]["type"] == "dense_sparse"
    assert specs["model.layers.1.self_attn.q_proj"]["pattern"] == "2:4"
    assert specs["model.layers.1.mlp.down_proj"]["type"] == "lowrank_sparse"
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.indices").dtype == torch.int16
        assert f.get_tensor("model.layers.1.mlp.up_proj.sc_channels").dtype == torch.int32
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        expected = model(ids).logits
    ours, _, _ = load_folder(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers API
    for reloaded in (ours, plain):
        for name, module in model.named_modules():
            if isinstance(module, (DenseSparseLinear, LowRankSparseLinear)):
                twin = reloaded.get_submodule(name)
                assert type(twin) is type(module)
                for key, buffer in module.named_buffers():
                    assert torch.equal(dict(twin.named_buffers())[key], buffer)
                    assert dict(twin.named_buffers())[key].dtype == buffer.dtype
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, expected)


def test_bytes_on_disk_count_values_and_indices(saved):
    model, folder, dense_dir, results = saved
    value_bytes = sum(4 * (r.summary["targeted_params_after"] - r.summary["targeted_params_before"]) for r in results)
    index_bytes = sum(r.summary["index_bytes"] for r in results)
    delta = safetensors_bytes(folder) - safetensors_bytes(dense_dir)
    header_slack = 8192  # safetensors JSON header grows with the number of tensors
    assert abs(delta - (value_bytes + index_bytes)) < header_slack
    assert delta < 0


def test_a_bytes_budget_holds_in_the_dtype_the_checkpoint_is_saved_in(tmp_path):
    reduction = 0.3
    recipe = {
        "name": "bytes-bf16",
        "stages": [
            {
                "method": "dsformer",
                "targets": [r"re:.*mlp\..*_proj$"],
                "reduction": reduction,
                "budget_unit": "bytes",
                "iters": 2,
            }
        ],
        "output": {"dtype": "bfloat16"},
    }
    model = make_tiny_llama()
    dense_bytes = sum(
        m.weight.numel() * 2 for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))
    )
    compress.save(compress.compress(model, recipe, progress=False), tmp_path / "m")
    stored = 0
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".mlp." in key:
                tensor = f.get_tensor(key)
                stored += tensor.numel() * tensor.element_size()
    assert stored <= (1 - reduction) * dense_bytes
    assert stored >= (1 - reduction - 0.1) * dense_bytes  # and the budget is spent, not wasted
