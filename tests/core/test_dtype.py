"""output.dtype: auto keeps the source checkpoint's dtype; the work runs in float32 either way."""

import json

import torch

import compress
from compress.models import declared_dtype, save_folder
from tests.tiny import make_tiny_llama


def test_auto_keeps_the_dtype_the_source_declares(tmp_path, smol_tokenizer):
    folder = tmp_path / "bf16-model"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)).to(torch.bfloat16), smol_tokenizer, folder)
    assert declared_dtype(folder) == "bfloat16"
    windows = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    stage = {"method": "lowrank", "reduction": 0.3, "backend": "whiten"}
    model = compress.compress(str(folder), [stage], calibration=windows, progress=False)
    assert model.compression.dtype == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    compress.save(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_explicit_dtype_wins_and_an_in_memory_model_keeps_its_own():
    windows = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    half = make_tiny_llama().to(torch.float16)
    model = compress.compress(half, [{"method": "welore", "reduction": 0.3}], calibration=windows, progress=False)
    assert model.compression.dtype == "float16" and next(model.parameters()).dtype == torch.float16
    recipe = {"name": "t", "stages": [{"method": "welore", "reduction": 0.3}], "output": {"dtype": "float32"}}
    model = compress.compress(make_tiny_llama().to(torch.float16), recipe, calibration=windows, progress=False)
    assert next(model.parameters()).dtype == torch.float32
