"""ofa_embedding through the pipeline on tiny random Llama/Gemma-3 models: the shared conformance checks."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  registers the checkpoint format
from compress.checkpoint import mark_compressed
from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.models import save_folder
from compress.modules import FactorizedEmbedding, TiedFactorizedLMHead
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe
from tests.tiny import make_tiny_llama


def make_tiny_gemma3(vocab_size=320, hidden=64, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    return Gemma3ForCausalLM(config).eval()


MODELS = {
    "llama-tied": lambda: make_tiny_llama(),
    "llama-untied": lambda: make_tiny_llama(tie=False),
    "gemma3-tied": lambda: make_tiny_gemma3(),
}

CASES = [  # (model, stage kwargs, expected head module)
    ("llama-tied", {"dim": 16}, TiedFactorizedLMHead),
    ("llama-tied", {"dim": 16, "untie": True}, torch.nn.Linear),
    ("llama-tied", {"reduction": 0.5, "weighting": "frequency"}, TiedFactorizedLMHead),
    ("llama-untied", {"dim": 8}, torch.nn.Linear),
    ("gemma3-tied", {"dim": 24, "weighting": "frequency"}, TiedFactorizedLMHead),
    ("gemma3-tied", {"dim": 24, "untie": True}, torch.nn.Linear),
    ("llama-tied", {"dim": 8, "keep_frequent": 20, "weighting": "frequency"}, TiedFactorizedLMHead),
    ("gemma3-tied", {"reduction": 0.6, "keep_frequent": 30}, TiedFactorizedLMHead),
    ("llama-untied", {"dim": 8, "keep_frequent": 10}, torch.nn.Linear),
    ("gemma3-tied", {"dim": 16, "keep_frequent": 30, "weighting": "frequency", "fit": "logits"}, TiedFactorizedLMHead),
]


def _windows(vocab, n=6, length=24):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def _run(model, stages, windows=None):
    recipe = parse_recipe({"name": "t", "stages": stages})
    ctx = StageContext(None, lambda: windows, progress=False)
    return recipe, [apply_stage(model, stage, ctx) for stage in recipe.stages]


@pytest.mark.parametrize("model_name, kwargs, head_type", CASES)
def test_conformance(tmp_path, model_name, kwargs, head_type):
    model = MODELS[model_name]()
    vocab, width = model.get_input_embeddings().weight.shape
    tied_source = model.config.tie_word_embeddings
    params_before = sum(p.numel() for p in model.parameters())
    windows = _windows(vocab)
    with torch.no_grad():
        dense_logits = model(windows[:2]).logits
    recipe, (result,) = _run(model, [{"method": "ofa_embedding", **kwargs}], windows)

    k = result.summary["dim"]
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding)
    assert type(model.get_output_embeddings()) is head_type
    if "reduction" in kwargs:
        assert result.summary["achieved_reduction"] >= kwargs["reduction"]
    # parameters drop exactly as promised (an untied dense head keeps its V x D)
    extra_head = vocab * width if kwargs.get("untie") and tied_source else 0
    full = kwargs.get("keep_frequent", 0)
    expected = params_before - vocab * width + full * width + k * (vocab - full + width) + extra_head
    assert sum(p.numel() for p in model.parameters()) == expected
    with torch.no_grad():
        logits = model(windows[:2]).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)
    if kwargs.get("untie") or not tied_source:  # the head still computes exactly the dense logits' last step
        hidden = model.model(windows[:2]).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), hidden @ model.lm_head.weight.T)

    mark_compressed(model, recipe.model_dump(mode="json"))
    save_folder(model, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded.get_output_embeddings()) is head_type
    with torch.no_grad():
        assert torch.equal(reloaded(windows[:2]).logits, logits)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_frequency_weighting_fits_frequent_tokens_better():
    windows = _windows(256) % 40 + 3  # only 40 distinct tokens occur
    plain, weighted = make_tiny_llama(), make_tiny_llama()
    _, (p,) = _run(plain, [{"method": "ofa_embedding", "dim": 8}], windows)
    _, (w,) = _run(weighted, [{"method": "ofa_embedding", "dim": 8, "weighting": "frequency"}], windows)
    assert w.summary["weighted_rel_error"] < p.summary["rel_error"]
    assert w.summary["rel_error"] > p.summary["rel_error"]
    ids = torch.arange(3, 43)[None]
    dense = make_tiny_llama().model.embed_tokens(ids)
    with torch.no_grad():
        err_plain = (plain.model.embed_tokens(ids) - dense).norm()
        err_weighted = (weighted.model.embed_tokens(ids) - dense).norm()
    assert err_weighted < err_plain


def test_keep_frequent_keeps_the_most_frequent_rows_exactly():
    windows = torch.cat([torch.full((2, 24), 7), torch.full((1, 24), 9), _windows(256, n=2)])
    model, reference = make_tiny_llama(), make_tiny_llama()
    _, (result,) = _run(model, [{"method": "ofa_embedding", "dim": 4, "keep_frequent": 2}], windows)
    embedding = model.get_input_embeddings()
    assert embedding.full_ids.tolist() == [7, 9]  # the two most frequent calibration tokens
    ids = torch.tensor([[7, 9, 7, 50]])
    dense = reference.model.embed_tokens(ids)
    h = torch.randn(1, 3, dense.shape[-1])
    with torch.no_grad():
        out = embedding(ids)
        torch.testing.assert_close(out[0, :3], dense[0, :3], rtol=0, atol=0)  # full rows: exact
        assert not torch.allclose(out[0, 3], dense[0, 3])  # tail: rank 4
        torch.testing.assert_close(embedding(ids), embedding.weight[ids])
        torch.testing.assert_close(model.lm_head(h), h @ embedding.weight.T, rtol=1e-5, atol=1e-5)
    assert result.summary["full_row_token_share"] > 0.5
    assert 0 < result.summary["rel_error"] < 1


def test_keep_frequent_beats_plain_frequency_weighting_at_equal_parameters():
    """A planted Zipf-like text: full rows for its frequent tokens lose less than spending the same
    parameters on a higher rank for everyone (the point of the adaptive-input layout)."""
    torch.manual_seed(0)
    windows = (torch.distributions.Geometric(0.08).sample((8, 64)).long() + 3).clamp_max(255)
    vocab, width = 256, 64
    hybrid, weighted = make_tiny_llama(), make_tiny_llama()
    _, (h,) = _run(
        hybrid, [{"method": "ofa_embedding", "dim": 4, "keep_frequent": 24, "weighting": "frequency"}], windows
    )
    budget = 24 * width + 4 * (vocab - 24 + width)
    k = budget // (vocab + width)
    _, (w,) = _run(weighted, [{"method": "ofa_embedding", "dim": k, "weighting": "frequency"}], windows)
    assert w.summary["targeted_params_after"] <= h.summary["targeted_params_after"]
    assert h.summary["weighted_rel_error"] < w.summary["weighted_rel_error"]


def test_logit_fit_lowers_the_logit_error_on_calibration_text():
    windows = _windows(256, n=8, length=32)
    dense = make_tiny_llama()
    with torch.no_grad():
        hidden = dense.model(windows).last_hidden_state
        reference = dense.lm_head(hidden)
    errors = {}
    for fit in ("embedding", "logits"):
        model = make_tiny_llama()
        _run(model, [{"method": "ofa_embedding", "dim": 6, "fit": fit, "fit_windows": 8}], windows)
        with torch.no_grad():
            errors[fit] = (model.lm_head(hidden) - reference).norm()
    assert errors["logits"] < errors["embedding"]


def test_logit_fit_needs_a_tied_head():
    with pytest.raises(CompressError, match="fit 'logits' needs a tied LM head"):
        _run(make_tiny_llama(tie=False), [{"method": "ofa_embedding", "dim": 4, "fit": "logits"}], _windows(256))


def test_finetune_trains_only_the_factors_and_the_tied_head_follows():
    model = make_tiny_llama()
    windows = _windows(256, n=8, length=32)
    _run(model, [{"method": "ofa_embedding", "dim": 16}], windows)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "embed_tokens" not in n}
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if "embed_tokens" in n}
    _, (train,) = _run(
        model,
        [
            {
                "method": "finetune",
                "targets": ["FactorizedEmbedding"],
                "steps": 6,
                "lr": 1e-2,
                "batch_size": 4,
                "eval_windows": 4,
                "schedule": "constant",
            }
        ],
        windows,
    )
    assert train.summary["calibration_loss_after"] < train.summary["calibration_loss_before"]
    assert train.summary["trainable_params"] == 16 * (256 + 64)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, factors[name]), name
    hidden = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), hidden @ model.model.embed_tokens.weight.T)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"method": "ofa_embedding", "dim": 60}, "out of range"),
        ({"method": "ofa_embedding", "reduction": 0.9999}, "out of range"),
        ({"method": "ofa_embedding", "dim": 8, "targets": ["re:.*q_proj"]}, "only the input embedding"),
    ],
)
def test_bad_settings_are_one_line_errors(stage, message):
    with pytest.raises(CompressError, match=message) as info:
        _run(make_tiny_llama(), [stage])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"method": "ofa_embedding", "dim": 8, "reduction": 0.5}, "exactly one of dim"),
        ({"method": "ofa_embedding"}, "exactly one of dim"),
        ({"method": "ofa_embedding", "dim": 0}, "dim"),
        ({"method": "ofa_embedding", "dim": 8, "fit": "logits", "untie": True}, "cannot be combined with untie"),
        ({"method": "ofa_embedding", "dim": 8, "keep_frequent": -1}, "keep_frequent"),
    ],
)
def test_bad_configs_fail_at_parse_time(stage, message):
    with pytest.raises(CompressError, match=message):
        parse_recipe({"name": "t", "stages": [stage]})


def test_factorising_twice_is_refused():
    model = make_tiny_llama()
    _run(model, [{"method": "ofa_embedding", "dim": 8}])
    with pytest.raises(CompressError, match="already factorised"):
        _run(model, [{"method": "ofa_embedding", "dim": 4}])
