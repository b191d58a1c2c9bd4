"""The dense model's size comes from its source's safetensors headers (or tensor sizes), never from a copy."""

import torch

from compress.models import LoadedModel, checkpoint_bytes, load_model, save_folder
from tests.tiny import make_tiny_llama


def _files(folder):
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_header_sizes_match_the_files_and_scale_with_the_dtype(tmp_path, smol_tokenizer):
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, tmp_path / "fp32")
    loaded = load_model(str(tmp_path / "fp32"))
    assert checkpoint_bytes(loaded, "float32") == _files(tmp_path / "fp32")
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)).to(torch.bfloat16), None, tmp_path / "bf16")
    bf16 = _files(tmp_path / "bf16")
    assert abs(checkpoint_bytes(loaded, "bfloat16") - bf16) < 0.01 * bf16  # the headers differ by a few bytes


def test_without_a_folder_the_tensors_are_counted_once(tmp_path):
    model = make_tiny_llama()  # tied embedding and head: one tensor
    save_folder(model, None, tmp_path / "copy")
    counted = checkpoint_bytes(LoadedModel(model, None, {}, None), "float32")
    assert 0 < _files(tmp_path / "copy") - counted < 20_000  # the copy adds only its JSON header
