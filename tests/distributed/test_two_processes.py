"""Two processes (torchrun, gloo on CPU) give the same model as one: statistics are all-reduced, every process
derives the same factors, and only the main process writes the run folder."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from compress.models import save_folder
from tests.tiny import kill_after_layers, make_tiny_llama

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
# elastic healing backpropagates each budget on its own: the processes average the gradients once, after the last
ELASTIC_RECIPE = {
    **RECIPE,
    "name": "tiny-two-processes-elastic",
    "stages": [
        {**RECIPE["stages"][0], "reduction": 0.3, "elastic": {"min_reduction": 0.1, "max_reduction": 0.5}},
        {**RECIPE["stages"][1], "lr": 1e-2, "elastic": {"budgets": [0.2, 0.4], "rule": "sum"}},
    ],
}
# FactorLLM's split and router fit read every FFN input and output: each process gets all the windows' tokens
FACTORLLM_RECIPE = {
    **RECIPE,
    "name": "tiny-two-processes-factorllm",
    "stages": [
        {
            "method": "factorllm",
            "experts": 4,
            "top_k": 2,
            "cluster_tokens": 64,
            "router_fit": "least_squares",
            "router_fit_windows": 8,
            "calibration_batch_size": 2,
            "train": {"steps": 3, "lr": 1e-3, "batch_size": 2},
        }
    ],
}


def _run(command, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.integration
@pytest.mark.parametrize(
    "spec", [RECIPE, ELASTIC_RECIPE, FACTORLLM_RECIPE], ids=["lowrank-finetune", "elastic-healing", "factorllm"]
)
def test_two_processes_give_the_model_one_process_gives(tmp_path, smol_tokenizer, spec):
    folder = tmp_path / "tiny"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(spec))
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
    # the same ranks; FactorLLM's router fit scored on the same tokens (every window's, in every process)
    fitted = [
        [(r.get("rank"), r.get("agreement"), r.get("route_loss")) for r in run["stages"][0]["rows"]]
        for run in (single, double)
    ]
    assert fitted[0] == fitted[1]
    # one schedule step per optimiser step in every process (accelerate's prepared scheduler would take two)
    trained = (run["stages"][-1]["summary"] for run in (single, double))  # a finetune stage, or a train: block
    lr_one, lr_two = (summary.get("training", summary)["mean_lr"] for summary in trained)
    assert lr_two == pytest.approx(lr_one, rel=1e-9)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".one", ".two"))]  # one writer, no leftovers


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", *args]


@pytest.mark.integration
def test_two_processes_stream_the_model_one_process_streams_and_resume_its_killed_run(tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny"
    model = make_tiny_llama(vocab_size=len(smol_tokenizer), hidden=256, intermediate=768, layers=8)
    save_folder(model, smol_tokenizer, folder)
    recipe = tmp_path / "r.yaml"
    # one stage: streamed; 9 windows: one process has 3 batches of them, the other 2 (the saved streams gather
    # each batch index of every process)
    calibration = {**RECIPE["calibration"], "samples": 9}
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": RECIPE["stages"][:1], "calibration": calibration}))
    run = ["compress", "run", str(recipe), str(folder), "--quiet"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    _run([sys.executable, "-m", *run, "--out", str(one)], tmp_path)
    _run(_torchrun(*run, "--out", str(two)), tmp_path)

    # a one-process run killed between layers, resumed by two processes: the saved streams are re-shared
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = kill_after_layers([sys.executable, "-m", *run], resumed, 2, cwd=tmp_path, env=env)
    assert 2 <= done < 8
    _run(_torchrun(*run, "--out", str(resumed), "--resume"), tmp_path)

    single, double, continued = (json.loads((out / "report.json").read_text()) for out in (one, two, resumed))
    assert (single["path"], double["path"], continued["path"]) == ("streamed",) * 3
    assert (single["processes"], double["processes"], continued["processes"]) == (1, 2, 2)
    assert continued["stages"][0]["summary"]["calibration"]["layers"] == 8 - done
    for report in (double, continued):
        for key in ("eval_compressed", "eval_dense"):
            a, b = single[key]["perplexity"]["perplexity"], report[key]["perplexity"]["perplexity"]
            assert b == pytest.approx(a, rel=0.002), key
        assert [r["rank"] for r in report["stages"][0]["rows"]] == [r["rank"] for r in single["stages"][0]["rows"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # one writer, no leftovers
