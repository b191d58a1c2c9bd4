"""A finished `compress run` folder, read and sanity-checked: what the model card and the hub push need."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressError


@dataclass
class RunFolder:
    """What a card (and a push) needs from a finished `compress run` folder."""

    path: Path
    report: dict
    recipe_text: str
    manifest: dict
    config: dict

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CompressError(f"{path.parent} is not a finished compress run: {path.name} is missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path} is corrupt: {exc}") from None


def read_run(run_dir: str | Path) -> RunFolder:
    """Read and sanity-check a run folder (no hashing of the weights: see hub.check_run)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CompressError(f"run folder {str(path)!r} does not exist")
    report = _read_json(path / "report.json", "written by `compress run`")
    for key in ("recipe", "source", "size", "eval_compressed", "stages"):
        if key not in report:
            raise CompressError(f"{path / 'report.json'} has no {key!r} section; was it written by `compress run`?")
    recipe_path = path / "recipe.yaml"
    if not recipe_path.is_file():
        raise CompressError(f"{path} is not a finished compress run: recipe.yaml is missing")
    model_dir = path / "model"
    if not model_dir.is_dir():
        raise CompressError(f"{path} is not a finished compress run: the model/ folder is missing")
    from .models import MANIFEST

    manifest = _read_json(model_dir / MANIFEST, "the checkpoint manifest")
    config = _read_json(model_dir / "config.json", "the model config")
    return RunFolder(path, report, recipe_path.read_text(), manifest, config)
