"""Where compress keeps prepared data (corpora, rendered lm-eval tasks, tokenizers)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["compress_cache_dir", "atomic_write_text"]


def compress_cache_dir() -> Path:
    """Root of compress's cache: ``$COMPRESS_CACHE`` if set, else ``~/.cache/compress``.

    The directory is created on first use.
    """
    env = os.environ.get("COMPRESS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "compress"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers never see a half-written file, and concurrent writers of the same content are safe.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
