import pytest

from compress.errors import CompressError
from compress.recipe import load_recipe, parse_recipe

GOOD = {"name": "w", "stages": [{"method": "welore", "targets": ["re:.*proj$"], "reduction": 0.3}]}


def _stage(**changes):
    stage = dict(GOOD["stages"][0], **changes)
    return {"name": "w", "stages": [stage]}


def test_good_recipe_is_frozen_with_defaults():
    recipe = parse_recipe(GOOD)
    assert recipe.stages[0].reduction == 0.3 and recipe.calibration.samples == 64
    with pytest.raises(ValueError, match="frozen"):  # pydantic's ValidationError
        recipe.stages[0].reduction = 0.5


@pytest.mark.parametrize(
    "data, expected",
    [
        (_stage(reduktion=0.3), r"stages\[0\]\.reduktion: unknown field"),
        (_stage(method="welorr"), r"stages\[0\]\.method: unknown method 'welorr' \(did you mean 'welore'\?\)"),
        (_stage(reduction=1.5), r"stages\[0\]\.reduction: .*less than 1"),
        (_stage(threshold=0.2), r"exactly one of 'reduction' or 'threshold'"),
        (_stage(targets=[]), r"stages\[0\]\.targets"),
        (_stage(targets=["re:("]), r"invalid regex"),
        ({**GOOD, "eval": {"tasks": ["wiki pl"]}}, r"eval: 'wiki pl' is not a task name"),
        ({**GOOD, "calibration": {"samples": 0}}, r"calibration\.samples"),
        ({**GOOD, "eval": {"budgets": [0.2, 1.5]}}, r"eval: budgets are reductions in \(0, 1\)"),
        ({**GOOD, "colour": "red"}, r"colour: unknown field"),
        ({"name": "w", "stages": []}, r"stages"),
    ],
)
def test_bad_recipes_name_the_field(data, expected):
    with pytest.raises(CompressError, match=expected) as info:
        parse_recipe(data, "r.yaml")
    assert "\n" not in str(info.value)


def test_finetune_warmup_contradiction():
    with pytest.raises(CompressError, match="warmup_steps"):
        parse_recipe({"name": "f", "stages": [{"method": "finetune", "steps": 5, "warmup_steps": 5}]})


def test_yaml_errors_and_missing_file(tmp_path):
    with pytest.raises(CompressError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n")
    with pytest.raises(CompressError, match="invalid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(CompressError, match="mapping"):
        load_recipe(listy)
