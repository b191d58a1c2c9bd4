"""`compress push` and `output.push_to_hub` against a fake hub on 127.0.0.1 (tests/hub/fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from compress.cli import main
from compress.model_card import render_card
from tests.hub.conftest import RECIPE, TOKEN, folder_digest
from tests.hub.fake_hub import Failure

REPO = "tester/tiny-welore"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_files(run_dir, repo=REPO, revision=None) -> dict[str, str]:
    """path in repo -> sha256 of what must arrive: model/* flattened, run files, plots, the card."""
    files = {p.name: _sha(p.read_bytes()) for p in (run_dir / "model").iterdir() if p.is_file()}
    for name in ("recipe.yaml", "report.json", "report.md", "ranks_stage0.png", "spectra_stage0.png"):
        files[name] = _sha((run_dir / name).read_bytes())
    files["README.md"] = _sha(render_card(run_dir, repo, revision).encode())
    return files


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _assert_failed(code, captured, *needles, exit_code=2):
    assert code == exit_code
    errors = _errors(captured.err)
    assert len(errors) == 1, captured.err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "pushed" not in captured.out  # nothing claims success
    return errors[0]


def test_push_uploads_every_file_intact_in_one_commit(fake_hub, intact_run, capsys, tmp_path):
    hub = fake_hub()
    assert main(["push", str(intact_run), REPO, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"pushed {len(expected_files(intact_run))} files to {hub.url}/{REPO}" in out

    received = hub.files(REPO)
    assert {k: _sha(v) for k, v in received.items()} == expected_files(intact_run)
    repo = hub.repos[REPO]
    assert repo.private is True and len(repo.commits) == 1 and "tiny-welore" in repo.commits[0]["summary"]
    # the weights went through multipart LFS, the tokenizer (> 1 MB) through a basic LFS PUT, small files inline
    assert hub.hits("PUT", r"/lfs-upload/[0-9a-f]+/part/\d+$") == 4 and hub.hits("POST", r"/complete$") == 1
    assert hub.hits("PUT", r"/lfs-upload/[0-9a-f]+$") == 3  # tokenizer.json + 2 plots
    assert hub.hits("POST", r"/lfs-verify/") == 4
    assert hub.hits("POST", "/api/validate-yaml") == 1 and not hub.unexpected
    assert all(r.authorized for r in hub.requests if r.path.startswith(("/api/repos", "/api/models", "/tester")))

    # the card's own loading code works on exactly what the hub received
    folder = tmp_path / "from-hub"
    folder.mkdir()
    for name, data in received.items():
        (folder / name).write_bytes(data)
    code = re.search(r"```python\n(.*?)```", received["README.md"].decode(), re.S).group(1)
    code = code.replace(f'"{REPO}"', repr(str(folder))).replace("max_new_tokens=20", "max_new_tokens=2")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert type(namespace["model"].model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"

    # pushing again to a branch: the repo exists (kept private), known LFS objects are not re-sent
    assert main(["push", str(intact_run), REPO, "--public", "--revision", "exp", "--quiet"]) == 0
    assert repo.private is True and len(repo.commits) == 2 and repo.commits[1]["branch"] == "exp"
    assert {k: _sha(v) for k, v in hub.files(REPO, "exp").items()} == expected_files(intact_run, revision="exp")
    assert hub.hits("PUT", r"/lfs-upload/") == 4 + 3


def test_dry_run_lists_files_sizes_and_card_without_network(fake_hub, intact_run, capsys, monkeypatch):
    hub = fake_hub()
    monkeypatch.delenv("HF_TOKEN")  # no token needed either
    assert main(["push", str(intact_run), REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not hub.requests
    assert "dry run: would push" in out and "nothing was uploaded" in out and "pushed" not in out
    for name in expected_files(intact_run):
        assert re.search(rf"^  {re.escape(name)} +\d", out, re.M), name
    assert "12.8 MB" in out  # model.safetensors' size
    assert render_card(intact_run, REPO).rstrip("\n") in out


def test_no_token_is_a_clear_error_and_nothing_is_sent(fake_hub, intact_run, capsys, monkeypatch):
    hub = fake_hub()
    monkeypatch.delenv("HF_TOKEN")
    _assert_failed(main(["push", str(intact_run), REPO]), capsys.readouterr(), "no Hugging Face token", "HF_TOKEN")
    assert not hub.requests


@pytest.mark.parametrize("status, needle", [(401, "refused the token with 401"), (403, "403 Forbidden")])
def test_refused_token_is_one_line_and_nothing_is_committed(fake_hub, intact_run, capsys, status, needle):
    hub = fake_hub(refuse=status)
    _assert_failed(main(["push", str(intact_run), REPO]), capsys.readouterr(), needle, "nothing was committed")
    assert not hub.repos and len(hub.requests) <= 2  # create_repo (+ its repo_info fallback), no retries


def test_server_error_mid_upload_fails_clearly_after_bounded_retries(fake_hub, intact_run, capsys):
    hub = fake_hub(failures=[Failure("PUT", r"/part/2$", 503)])  # storage keeps failing on one part
    start = time.monotonic()
    _assert_failed(
        main(["push", str(intact_run), REPO, "--quiet"]),
        capsys.readouterr(),
        "HTTP 503 while uploading",
        "nothing was committed",
    )
    assert time.monotonic() - start < 30
    assert hub.failures[0].hits == 6  # huggingface_hub's backoff: 1 try + 5 retries
    assert not hub.repos[REPO].commits and not hub.files(REPO)


def test_server_error_on_commit_is_not_reported_as_success(fake_hub, intact_run, capsys):
    hub = fake_hub(failures=[Failure("POST", r"/commit/main$", 500)])
    _assert_failed(
        main(["push", str(intact_run), REPO, "--quiet"]),
        capsys.readouterr(),
        "HTTP 500 while committing",
        "not confirmed",
    )
    assert hub.failures[0].hits == 1 and not hub.repos[REPO].commits


def test_transient_storage_error_is_retried(fake_hub, intact_run, capsys):
    hub = fake_hub(failures=[Failure("PUT", r"/part/3$", 503, times=1)])
    assert main(["push", str(intact_run), REPO, "--quiet"]) == 0
    assert {k: _sha(v) for k, v in hub.files(REPO).items()} == expected_files(intact_run)
    assert hub.failures[0].hits == 1 and "pushed" in capsys.readouterr().out


def test_cli_subprocess_reads_hf_endpoint_and_exits_2_on_refusal(fake_hub, intact_run):
    hub = fake_hub(refuse=401)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT=hub.url, HF_TOKEN="hf_expired", HF_HUB_DISABLE_XET="1", HF_HOME=str(intact_run.parent / "hf")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "compress.cli", "push", str(intact_run), REPO],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: push to tester/tiny-welore failed")
    assert "401" in proc.stderr and "pushed" not in proc.stdout
    assert hub.requests and not hub.repos  # it talked to the fake (HF_ENDPOINT), and was refused


def test_recipe_push_to_hub_pushes_after_the_run_and_keeps_it_on_failure(
    fake_hub, tiny_model_folder, tmp_path, capsys, monkeypatch
):
    recipe = dict(
        RECIPE,
        eval={"tasks": [], "compare_dense": False, "perplexity_windows": 1, "seq_len": 64},
        output={"push_to_hub": {"repo_id": REPO, "private": False}},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    # no token: refused before any work
    monkeypatch.delenv("HF_TOKEN")
    _assert_failed(
        main(["run", str(path), str(tiny_model_folder), "--out", str(tmp_path / "r0"), "--quiet"]),
        capsys.readouterr(),
        "output.push_to_hub",
        "no Hugging Face token",
    )
    assert not (tmp_path / "r0").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    hub = fake_hub()
    assert main(["run", str(path), str(tiny_model_folder), "--out", str(tmp_path / "r1"), "--quiet"]) == 0
    assert "pushed" in capsys.readouterr().out and hub.repos[REPO].private is False
    assert {k: _sha(v) for k, v in hub.files(REPO).items()} == expected_files_light(tmp_path / "r1")

    # the hub refuses: exit 3 (a step after the checkpoint failed), one line, the finished run stays complete
    refusing = fake_hub(refuse=403)
    code = main(["run", str(path), str(tiny_model_folder), "--out", str(tmp_path / "r2"), "--quiet"])
    _assert_failed(
        code, capsys.readouterr(), "403", "intact in", f"compress push {tmp_path / 'r2'} {REPO} --public", exit_code=3
    )
    assert not refusing.repos
    assert set(folder_digest(tmp_path / "r2")) == set(folder_digest(tmp_path / "r1"))


def expected_files_light(run_dir) -> dict[str, str]:
    files = {p.name: _sha(p.read_bytes()) for p in (run_dir / "model").iterdir() if p.is_file()}
    for name in (
        "recipe.yaml",
        "report.json",
        "report.md",
        *json.loads((run_dir / "report.json").read_text())["figures"],
    ):
        files[name] = _sha((run_dir / name).read_bytes())
    files["README.md"] = _sha(render_card(run_dir, REPO).encode())
    return files
