"""The shipped low-rank recipes validate and run end to end on a tiny model (tiny calibration windows)."""

from pathlib import Path

import pytest
import torch

from compress.methods.base import StageContext
from compress.pipeline import compress_model
from compress.recipe import load_recipe
from tests.tiny import make_tiny_llama

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", ["lowrank-20", "lowrank-40", "attention-50"])
def test_recipe_runs_on_tiny_model(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    model = make_tiny_llama()
    windows = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    results = compress_model(model, recipe, StageContext(None, lambda: windows, progress=False))
    first = results[0]
    assert abs(first.summary["achieved_reduction"] - first.summary["requested_reduction"]) <= 0.005 + 1e-9
    with torch.no_grad():
        assert torch.isfinite(model(windows).logits).all()


def test_the_anchored_elastic_recipe_is_the_elastic_one_with_the_measured_anchor():
    # bench/elastic.py measures the anchored fit as lowrank-elastic with these two fields set: the shipped recipe
    # must be that same stage, calibration and evaluation
    import yaml

    elastic, anchored = (
        yaml.safe_load((RECIPES / f"{n}.yaml").read_text()) for n in ("lowrank-elastic", "lowrank-elastic-anchored")
    )
    stage = elastic["stages"][0]
    assert anchored["stages"] == [{**stage, "elastic": {**stage["elastic"], "calibrate_on": [0.5], "fit": "anchored"}}]
    assert {k: v for k, v in anchored.items() if k not in ("name", "description", "stages")} == {
        k: v for k, v in elastic.items() if k not in ("name", "description", "stages")
    }
