"""Eval tasks beyond compress's own: any lm-eval task name is accepted, checked by name and by dataset
availability before anything heavy starts; per-task limits and few-shot counts reach lm-eval."""

import pytest
import yaml

from compress.cli import main
from compress.errors import CompressError
from compress.eval.lm_eval_runner import check_tasks, run_lm_eval
from compress.recipe import EvalConfig

RECIPE = {
    "name": "tiny",
    "stages": [{"method": "welore", "reduction": 0.3}],
    "eval": {"tasks": ["hellaswag"], "perplexity_windows": 1, "seq_len": 64, "limit": 1},
}


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_misspelt_lm_eval_task_is_named_with_a_suggestion(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "eval": {**RECIPE["eval"], "tasks": ["hellaswg"]}}))
    assert main(["validate", str(recipe)]) == 2
    (error,) = _errors(capsys.readouterr().err)
    assert "unknown eval task 'hellaswg' (did you mean 'hellaswag'?)" in error


def test_an_uncached_dataset_fails_before_the_model_loads(tmp_path, capsys, offline):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "smollm2-135m", "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    (error,) = _errors(captured.err)
    assert "eval task 'hellaswag': its dataset is not available" in error and "offline" in error
    assert "loading" not in captured.out and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_known_lm_eval_tasks_pass_the_name_check(offline):
    with pytest.raises(CompressError, match="'arc_easy': its dataset is not available"):  # the name is fine
        check_tasks(["wikipedia_ppl", "arc_easy"])
    check_tasks(["wikipedia_ppl", "wikipedia_lastword"])  # ours: nothing to fetch


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"tasks": ["wikipedia_ppl"], "num_fewshot": {"wikipedia_lastword": 1}},
            "num_fewshot for 'wikipedia_lastword', which is not in tasks",
        ),
        ({"tasks": ["wikipedia_ppl"], "num_fewshot": -1}, "num_fewshot must be >= 0"),
        ({"tasks": ["wikipedia_ppl"], "limit": {"wikipedia_ppl": 0}}, "limit must be >= 1"),
        ({"tasks": ["bad name"]}, "'bad name' is not a task name"),
    ],
)
def test_eval_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**settings)


def test_num_fewshot_reaches_lm_eval(smol_tokenizer):
    from tests.tiny import make_tiny_llama

    model = make_tiny_llama(vocab_size=len(smol_tokenizer))
    zero = run_lm_eval(model, smol_tokenizer, ["wikipedia_lastword"], limit=3, max_length=256)
    two = run_lm_eval(model, smol_tokenizer, ["wikipedia_lastword"], limit=3, max_length=256, num_fewshot=2)
    # with examples in front the target word is scored after a longer context: a different number
    assert zero["wikipedia_lastword"]["perplexity"] != two["wikipedia_lastword"]["perplexity"]
