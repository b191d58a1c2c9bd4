"""A failure late in `compress run` never throws away the work before it; an unexpected one is one line + a log.

Faults are injected by replacing a library function (the plotting, the evaluation, the compression) with
one that raises, the way a real bug there would.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from compress.cli import main
from compress.models import load_folder, save_folder
from tests.tiny import make_tiny_llama

RECIPE = {
    "name": "tiny-lowrank",
    "stages": [{"method": "lowrank", "targets": [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"], "reduction": 0.3}],
    "calibration": {"samples": 4, "seq_len": 32},
    "eval": {"tasks": [], "perplexity_windows": 1, "seq_len": 64},
}


@pytest.fixture
def setup(tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny-model"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    return ["run", str(recipe), str(folder), "--out", str(tmp_path / "run"), "--quiet"], tmp_path / "run"


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:") or "Traceback" in line]


def _broken(*args, **kwargs):
    raise TypeError("unsupported operand type(s) for /: 'NoneType' and 'int'")


@pytest.mark.parametrize(
    "target, step, measured",
    [
        ("compress.report.plot_figures", "writing the report", ("eval_compressed", "eval_dense")),
        ("compress.scoring.evaluate", "evaluating the compressed model", ()),
    ],
)
def test_a_late_failure_keeps_the_checkpoint_and_what_was_measured(setup, monkeypatch, capsys, target, step, measured):
    args, out = setup
    monkeypatch.setattr(target, _broken)
    assert main(args) == 3
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: {step} failed: TypeError") and str(out) in errors[0]
    assert str(out / "error.log") in errors[0] and "_broken" in (out / "error.log").read_text()

    report = json.loads((out / "report.json").read_text())
    assert report["error"] == {
        "step": step,
        "message": "TypeError: unsupported operand type(s) for /: 'NoneType' and 'int'",
        "log": "error.log",
    }
    assert report["size"]["params_after"] < report["size"]["params_before"]
    for key in ("eval_compressed", "eval_dense"):
        assert (report[key] is not None) == (key in measured)
    model, _, _ = load_folder(out / "model")  # the checkpoint is complete and verified against its manifest
    assert sum(p.numel() for p in model.parameters()) == report["size"]["params_after"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".run.")]


def test_an_unexpected_error_before_the_checkpoint_is_one_line_and_a_log(setup, monkeypatch, capsys):
    args, out = setup
    monkeypatch.setattr("compress.pipeline.compress_model", _broken)
    assert main(args) == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: TypeError: unsupported operand"), errors
    log = errors[0].split("traceback in ")[1].split(";")[0]
    assert "Traceback" in open(log).read()
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".run.")]

    assert main(["run", "--debug", *args[1:]]) == 1  # --debug prints the traceback instead
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_broken" in err


def test_sigterm_cleans_up_like_ctrl_c(setup, tmp_path):
    args, out = setup
    env = dict(os.environ, COMPRESS_CACHE=os.environ.get("COMPRESS_CACHE", ""))
    env = {k: v for k, v in env.items() if v != ""}
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", *args], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    # the run has started writing (a streamed run stages in .run.partial, others in .run.tmp-*)
    while not [p for p in tmp_path.iterdir() if p.name.startswith((".run.tmp-", ".run.partial"))]:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
