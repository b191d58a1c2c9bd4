"""Two processes (torchrun, gloo on CPU) give the same model as one: statistics are all-reduced, every process
derives the same factors, and only the main process writes the run folder."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from compress.models import save_folder
from tests.tiny import make_tiny_llama

RECIPE = {
    "name": "tiny-two-processes",
    "stages": [
        {
            "method": "lowrank",
            "reduction": 0.4,
            "backend": "whiten",
            "allocation": "sensitivity",
            "sensitivity_windows": 8,
            "calibration_batch_size": 2,
        },
        {"method": "finetune", "steps": 3, "lr": 1e-3, "batch_size": 2},
    ],
    "calibration": {"corpus": "wikipedia", "samples": 8, "seq_len": 64},
    "eval": {"tasks": [], "perplexity_windows": 6, "seq_len": 64},
}


def _run(command, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.integration
def test_two_processes_give_the_model_one_process_gives(tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "compress", "run", str(recipe), str(folder), "--out", str(one), "--quiet"], tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "compress",
            "run",
            str(recipe),
            str(folder),
            "--out",
            str(two),
            "--quiet",
        ],
        tmp_path,
    )

    single, double = (json.loads((out / "report.json").read_text()) for out in (one, two))
    assert (single["processes"], double["processes"]) == (1, 2)
    for key in ("eval_compressed", "eval_dense"):
        a, b = single[key]["perplexity"]["perplexity"], double[key]["perplexity"]["perplexity"]
        assert b == pytest.approx(a, rel=0.002), key
    assert [r["rank"] for r in single["stages"][0]["rows"]] == [r["rank"] for r in double["stages"][0]["rows"]]
    # one schedule step per optimiser step in every process (accelerate's prepared scheduler would take two)
    lr_one, lr_two = (run["stages"][1]["summary"]["mean_lr"] for run in (single, double))
    assert lr_two == pytest.approx(lr_one, rel=1e-9)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".one", ".two"))]  # one writer, no leftovers
