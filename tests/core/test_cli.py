import json
import subprocess
import sys

import pytest
import yaml

from compress.cli import main
from compress.models import save_folder
from tests.tiny import cli_eval_one_window, make_tiny_llama

RECIPE = {
    "name": "tiny-welore",
    "stages": [{"method": "welore", "targets": [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"], "reduction": 0.3}],
    "eval": {"tasks": ["wikipedia_ppl"], "perplexity_windows": 2, "limit": 1, "seq_len": 64},
}


@pytest.fixture
def tiny_folder(tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny-model"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, folder)
    return folder


def _write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_writes_checkpoint_eval_and_report(tmp_path, tiny_folder, capsys):
    recipe, out = _write(tmp_path, RECIPE), tmp_path / "run"
    assert main(["run", str(recipe), str(tiny_folder), "--out", str(out), "--quiet"]) == 0
    for name in (
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "recipe.yaml",
        "report.json",
        "report.md",
        "ranks_stage0.png",
        "spectra_stage0.png",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    size = report["size"]
    assert abs(size["compression_ratio"] - 0.3) < 0.005
    assert size["params_after"] < size["params_before"] and size["bytes_after"] < size["bytes_before"]
    dense, compressed = report["eval_dense"], report["eval_compressed"]
    assert dense["perplexity"]["windows"] == 2 and compressed["perplexity"]["perplexity"] > 0
    assert "word_perplexity" in compressed["lm_eval"]["wikipedia_ppl"]
    rows = report["stages"][0]["rows"]
    assert {"module", "shape", "rank", "kind", "params_before", "params_after"} <= set(rows[0])
    assert "| parameters (whole model) |" in (out / "report.md").read_text()

    # the compressed checkpoint scores through `compress eval`, and re-running refuses to clobber it
    scores = cli_eval_one_window(out / "model", tmp_path / "e.json")
    assert scores["perplexity"]["windows"] == 1
    assert main(["run", str(recipe), str(tiny_folder), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_failed_run_leaves_nothing_behind(tmp_path, tiny_folder, capsys):
    bad = dict(RECIPE, stages=[{"method": "welore", "targets": [r"re:.*\.nope_proj$"], "reduction": 0.3}])
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, bad)), str(tiny_folder), "--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "matched no module" in errors[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "RECIPE", "no/such-model-here"], "hub could not provide it"),
        (["run", "RECIPE", "./missing.gguf"], "does not exist"),
        (["eval", "./not-a-folder"], "does not exist"),
    ],
)
def test_bad_models_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [str(_write(tmp_path, RECIPE)) if a == "RECIPE" else a for a in args]
    assert main(args + (["--out", str(tmp_path / "o")] if args[0] == "run" else [])) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert not (tmp_path / "o").exists()


def test_validate_subprocess_exit_code_and_single_line(tmp_path):
    bad = _write(tmp_path, dict(RECIPE, stages=[{"method": "welorre", "targets": ["Linear"], "reduction": 0.3}]))
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "did you mean 'welore'" in proc.stderr
    good = _write(tmp_path, RECIPE, "good.yaml")
    proc = subprocess.run([sys.executable, "-m", "compress.cli", "validate", str(good)], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok:" in proc.stdout


def test_ls_lists_methods_models_and_recipes(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "welore" in out and "smollm2-135m" in out and "welore-30-finetune" in out


def test_import_is_light():
    code = (
        "import sys, compress; bad = [m for m in ('triton', 'lm_eval') if m in sys.modules]; "
        "import torch; assert not torch.cuda.is_initialized(); print(bad)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
