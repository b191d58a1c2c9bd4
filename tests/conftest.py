"""Shared fixtures: tiny random Llama models and the real bundled SmolLM2 tokenizer."""
from __future__ import annotations

import os

# Before any test module is imported: @triton.jit kernels decide at import time whether they run
# under the CPU interpreter, and triton can be imported indirectly long before tests/kernels is
# collected (torch.utils.flop_counter, used by the FactorLLM tests, imports it).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from tests.tiny import make_tiny_llama  # noqa: E402


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_folder():
    """The real SmolLM2-135M, converted once from the bundled GGUF into the compress cache."""
    from compress.models import ensure_bundled

    return ensure_bundled("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)
