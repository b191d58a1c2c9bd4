"""Shared fixtures: tiny random Llama models and the real bundled SmolLM2 tokenizer."""
from __future__ import annotations

import pytest

from tests.tiny import make_tiny_llama


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
