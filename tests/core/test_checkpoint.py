import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  registers the checkpoint format
from compress.checkpoint import mark_compressed
from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.models import load_folder, save_folder
from compress.modules import LowRankLinear
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe
from tests.tiny import make_tiny_llama

RECIPE = {"name": "t", "stages": [{"method": "welore", "targets": [r"re:.*_proj$"], "reduction": 0.4}]}


@pytest.fixture
def saved(tmp_path, smol_tokenizer):
    model = make_tiny_llama(vocab_size=len(smol_tokenizer))
    dense_dir = tmp_path / "dense"
    save_folder(model, smol_tokenizer, dense_dir)
    recipe = parse_recipe(RECIPE)
    apply_stage(model, recipe.stages[0], StageContext(smol_tokenizer, lambda: None, progress=False))
    mark_compressed(model, recipe.model_dump(mode="json"))
    folder = tmp_path / "model"
    save_folder(model, smol_tokenizer, folder)
    return model, folder, dense_dir


def _weights(folder):
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_round_trip_gives_identical_logits(saved):
    model, folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compress"
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    reloaded = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers API
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded.eval()(ids).logits)
    ours, _, manifest = load_folder(folder)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)
    assert manifest["files"]


def test_bytes_on_disk_shrink_with_parameters(saved):
    model, folder, dense_dir = saved
    dense = make_tiny_llama(vocab_size=model.config.vocab_size)
    params_ratio = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in dense.parameters())
    bytes_ratio = _weights(folder) / _weights(dense_dir)
    assert bytes_ratio < 1 and abs(bytes_ratio - params_ratio) < 0.01


def test_truncated_checkpoint_is_a_clear_error(saved):
    _, folder, _ = saved
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CompressError, match="truncated"):
        load_folder(folder)


def test_flipped_byte_is_detected(saved):
    _, folder, _ = saved
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CompressError, match="sha256"):
        load_folder(folder)


def test_corrupt_header_without_manifest_is_a_clear_error(saved):
    _, folder, _ = saved
    (folder / "compress_manifest.json").unlink()
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CompressError, match="cannot load checkpoint"):
        load_folder(folder)


def test_unknown_module_type_is_rejected(saved):
    _, folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    name = next(iter(config["quantization_config"]["modules"]))
    config["quantization_config"]["modules"][name]["type"] = "hologram"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompressError, match="unknown type 'hologram'"):
        load_folder(folder)
