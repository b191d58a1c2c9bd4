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
def smollm2_loaded(smollm2_folder):
    """The real SmolLM2-135M, loaded once per session (tests take a copy: see ``smollm2``)."""
    from compress.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def smollm2(smollm2_loaded):
    """A fresh copy of the real SmolLM2-135M (model, tokenizer, source) that the test may change."""
    import copy

    from compress.models import LoadedModel

    return LoadedModel(
        copy.deepcopy(smollm2_loaded.model),
        smollm2_loaded.tokenizer,
        dict(smollm2_loaded.source),
        smollm2_loaded.folder,
    )


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)
