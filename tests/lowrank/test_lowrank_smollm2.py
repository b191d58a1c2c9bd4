"""Integration: activation-aware low-rank on the real SmolLM2-135M (2 layers' MLPs, tiny calibration)."""

import math

import pytest

from compress.eval.corpora import load_documents
from compress.eval.perplexity import perplexity
from compress.eval.windows import token_windows
from compress.methods.base import StageContext
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe

pytestmark = pytest.mark.integration


def test_whitening_far_better_than_plain_svd_on_smollm2(smollm2_loaded):
    import copy

    loaded = smollm2_loaded
    tokenizer = loaded.tokenizer
    calib = token_windows(tokenizer, load_documents("wikipedia", "calibration"), 128, 4)
    held = token_windows(tokenizer, load_documents("wikipedia", "heldout"), 512, 2)
    dense_ppl = perplexity(loaded.model, held, progress=False)["perplexity"]
    ppl = {}
    for backend in ("svd", "whiten"):
        model = copy.deepcopy(loaded.model)  # the session's model stays dense for the other tests
        stage = parse_recipe(
            {
                "name": "t",
                "stages": [
                    {
                        "method": "lowrank",
                        "targets": [r"re:.*\.layers\.[01]\.mlp\.(gate|up|down)_proj$"],
                        "reduction": 0.6,
                        "backend": backend,
                    }
                ],
            }
        ).stages[0]
        result = apply_stage(model, stage, StageContext(tokenizer, lambda: calib, progress=False))
        assert abs(result.summary["achieved_reduction"] - 0.6) < 0.005
        ppl[backend] = perplexity(model, held, progress=False)["perplexity"]
    assert all(math.isfinite(p) for p in ppl.values())
    assert ppl["whiten"] < ppl["svd"]
    assert ppl["whiten"] - dense_ppl < 0.5 * (ppl["svd"] - dense_ppl), (dense_ppl, ppl)
    print(f"\nSmolLM2 layers 0-1 MLP at 60 %: dense {dense_ppl:.2f}, svd {ppl['svd']:.2f}, whiten {ppl['whiten']:.2f}")
