"""Hub fixtures: one real run folder (tiny model, ~1 min) shared by every hub test, and a fake hub."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.hub.fake_hub import FakeHub
from tests.tiny import make_tiny_llama

TOKEN = "hf_fake_write_token"
BASE_MODEL = "compress-tests/tiny-llama"  # recorded in the tiny model's manifest, so cards carry a base_model
RECIPE = {
    "name": "tiny-welore",
    "stages": [{"method": "welore", "targets": [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"], "reduction": 0.3}],
    "eval": {"tasks": ["wikipedia_ppl"], "perplexity_windows": 2, "limit": 1, "seq_len": 64},
}


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, smol_tokenizer) -> Path:
    from compress.models import save_folder

    folder = tmp_path_factory.mktemp("hub") / "tiny-model"
    save_folder(
        make_tiny_llama(vocab_size=len(smol_tokenizer)),
        smol_tokenizer,
        folder,
        extra={"base_model": BASE_MODEL, "license": "mit"},
    )
    return folder


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tiny_model_folder) -> Path:
    """A finished `compress run` folder (real pipeline, tiny model), built once for all hub tests."""
    import os

    from compress.cli import main

    root = tmp_path_factory.mktemp("hub-run")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    offline = os.environ.get("HF_HUB_OFFLINE")
    assert main(["run", str(recipe), str(tiny_model_folder), "--out", str(root / "run"), "--quiet"]) == 0
    # compress's lm-eval runner sets HF_HUB_OFFLINE=1 for the process; do not let it leak into other tests
    if offline is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = offline
    return root / "run"


def folder_digest(folder: Path) -> dict[str, tuple[int, str, float]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def intact_run(run_dir):
    """The run folder, checked byte for byte (and mtime) to be unchanged after the test."""
    before = folder_digest(run_dir)
    yield run_dir
    assert folder_digest(run_dir) == before, "the local run folder was modified"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Start fake hubs on 127.0.0.1 and point huggingface_hub (and compress) at the last one started.

    HF_ENDPOINT is what users set; huggingface_hub reads it once at import into
    constants.ENDPOINT, so that is patched too (compress reads HF_ENDPOINT at push time).
    Xet is disabled so huggingface_hub uses the LFS protocol this fake speaks, the HTTP client
    gets a 20 s timeout (huggingface_hub's default is none), and no saved login is visible.
    """
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hubs: list[FakeHub] = []

    def start(**options) -> FakeHub:
        hub = FakeHub(token=TOKEN, **options).start()
        hubs.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        return hub

    def client_factory():
        client = _http.default_client_factory()
        client.timeout = httpx2.Timeout(20.0)
        return client

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    huggingface_hub.set_client_factory(client_factory)  # also drops pooled connections to earlier fakes
    try:
        yield start
    finally:
        for hub in hubs:
            hub.stop()
        huggingface_hub.set_client_factory(_http.default_client_factory)
        for hub in hubs:
            assert not hub.overflow, "the fake hub's request budget was exhausted (request loop?)"
            assert not hub.errors, f"the fake hub saw problems: {hub.errors}"
            assert all(r.path.startswith("/") for r in hub.requests)
