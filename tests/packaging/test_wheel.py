"""The package as a user installs it: a wheel built from this tree, in a fresh venv with only the core
dependencies. `import compress` and `from_pretrained` of a compressed checkpoint work without the extras,
the bundled recipes ship inside the wheel and are found by name, and what needs an extra says which."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compress
from compress.recipes import WeLore
from tests.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = ("lm_eval", "matplotlib", "gguf", "datasets", "peft", "triton")


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(ROOT)])
    (wheel,) = (root / "dist").glob("compress_llm-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, f"torch=={torch.__version__.split('+')[0]}"], timeout=900)  # the CPU wheel on disk, as setup does
    _run([*pip, str(wheel)], timeout=900)
    return venv


@pytest.mark.integration
def test_core_install_loads_a_checkpoint_without_the_extras(fresh_venv, tmp_path):
    model = compress.compress(make_tiny_llama(), WeLore(reduction=0.3), progress=False)
    compress.save(model, tmp_path / "ckpt")
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    code = f"""
import sys, torch
import compress
from transformers import AutoModelForCausalLM
assert not [m for m in {OPTIONAL!r} if m in sys.modules], "import compress pulled in an extra"
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}).eval()
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
missing = [m for m in {OPTIONAL!r} if __import__("importlib").util.find_spec(m) is not None]
print("installed extras:", missing)
"""
    out = _run([str(fresh_venv / "bin" / "python"), "-c", code], cwd=tmp_path).stdout
    assert out.strip() == "installed extras: []"


@pytest.mark.integration
def test_bundled_recipes_ship_in_the_wheel_and_extras_are_named(fresh_venv, tmp_path):
    cli = str(fresh_venv / "bin" / "compress")
    listing = _run([cli, "ls"], cwd=tmp_path).stdout
    for recipe in sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml")):
        assert recipe in listing
    # found by name (an unknown name would say so); its lm-eval tasks need the [eval] extra, named in one line
    for command in (["validate", "lowrank-20"], ["run", "welore-30", "smollm2-135m", "--out", str(tmp_path / "o")]):
        proc = subprocess.run([cli, *command], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "pip install 'compress-llm[eval]'" in proc.stderr and not (tmp_path / "o").exists()
    unknown = subprocess.run([cli, "validate", "lowrank-21"], cwd=tmp_path, capture_output=True, text=True)
    assert unknown.returncode == 2 and "lowrank-21" in unknown.stderr and "compress-llm[eval]" not in unknown.stderr


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {
        "compress": ROOT / "compress",
        "compress.kernels": ROOT / "kernels",
        "compress.eval": ROOT / "eval",
        "compress.bundled_recipes": ROOT / "recipes",
    }
    found = set()
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                relative = init.parent.relative_to(folder).parts
                found.add(".".join((package, *relative)))
    assert found == listed, {"not listed": found - listed, "listed but missing": listed - found}
    assert {k: v for k, v in config["package-dir"].items()} == {k: str(v.relative_to(ROOT)) for k, v in folders.items()}
    assert json.dumps(config["package-data"]["compress.bundled_recipes"]) == '["*.yaml"]'
