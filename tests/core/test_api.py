"""The Python API: the README's example runs as it stands; every recipe form is accepted; saving is safe."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.recipes import Finetune, LowRank, Recipe, WeLore
from tests.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.integration
def test_the_readme_example_runs(tmp_path, smollm2_folder):
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    proc = subprocess.run(
        [sys.executable, "-c", _readme_example()], cwd=tmp_path, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores, reductions = proc.stdout.strip().splitlines()[-2:]
    token_ppl, word_ppl = (float(v) for v in scores.split())
    assert token_ppl > 1 and word_ppl > 1
    assert 0.28 < float(reductions.strip("[]")) < 0.32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "api-welore-30")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "LowRankLinear" in kinds


def _windows(n=4, length=16):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "recipe",
    [
        WeLore(reduction=0.3),
        [WeLore(reduction=0.3), Finetune(steps=1)],
        {"name": "d", "stages": [{"method": "welore", "reduction": 0.3}]},
        Recipe(name="r", stages=[WeLore(reduction=0.3)]),
        ROOT / "recipes" / "welore-30.yaml",
        str(ROOT / "recipes" / "welore-30.yaml"),
    ],
    ids=["stage", "stage-list", "dict", "Recipe", "path", "path-string"],
)
def test_every_recipe_form_is_accepted(recipe):
    model = compress.compress(make_tiny_llama(), recipe, calibration=_windows(), progress=False)
    assert model.compression.stages[0].method == "welore"
    assert model.config.quantization_config.modules  # marked as a compress checkpoint


def test_stage_configs_validate_like_yaml():
    with pytest.raises(ValueError, match="reduction"):
        LowRank(reduction=1.5)
    assert LowRank(reduction=0.2).targets == [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"]
    assert compress.recipes.LowRank is LowRank  # reachable from `import compress` alone


def test_calibrating_without_a_tokenizer_or_windows_is_a_clear_error():
    with pytest.raises(CompressError, match="tokenizer="):
        compress.compress(make_tiny_llama(), LowRank(reduction=0.3, backend="whiten"), progress=False)


def test_save_refuses_to_clobber_and_refreshes_the_compression_section(tmp_path):
    model = compress.compress(
        make_tiny_llama(),
        WeLore(targets=[r"re:.*\.mlp\.(gate|up|down)_proj$"], reduction=0.3),
        calibration=_windows(),
        progress=False,
    )
    compress.compress(
        model,
        [{"method": "lowrank", "targets": [r"re:.*\.0\.self_attn\.q_proj$"], "reduction": 0.5}],
        calibration=_windows(),
        progress=False,
    )
    assert "model.layers.0.self_attn.q_proj" in model.config.quantization_config.modules
    compress.save(model, tmp_path / "m")
    with pytest.raises(CompressError, match="already exists"):
        compress.save(model, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = _windows(2, 9)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_evaluate_names_a_bad_task():
    model = make_tiny_llama()
    with pytest.raises(CompressError, match="unknown eval task 'wikipedia_pll'"):
        compress.evaluate(model, tasks=["wikipedia_pll"], tokenizer=object())
