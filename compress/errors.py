"""The exceptions users see, and the exit code each one gives (documented in the README)."""

from __future__ import annotations

from pathlib import Path

EXIT_INTERNAL = 1  # an unexpected exception: one `error:` line, the traceback in a log file
EXIT_USER = 2  # a CompressError: bad recipe, unknown model, corrupt checkpoint ... nothing written
EXIT_INCOMPLETE = 3  # a step after the checkpoint was saved failed: the run folder keeps what was done
EXIT_INTERRUPTED = 130


class CompressError(Exception):
    """A user-facing error (bad recipe, unknown model, corrupt checkpoint...).

    The message must name the problem on its own, without a traceback.
    """


class RunIncomplete(Exception):
    """A step of `compress run` failed after the compressed checkpoint was saved.

    The run folder was kept with the checkpoint and everything done before ``step``; the message
    names the step, the cause and the folder (and the log file with the traceback, if there is one).
    """

    def __init__(self, step: str, message: str, interrupted: bool = False):
        self.step, self.interrupted = step, interrupted
        super().__init__(message)


def describe_exception(exc: BaseException) -> str:
    """One line: a CompressError's own message, else ``TypeError: <first line of the message>``."""
    text = str(exc).strip().splitlines()
    if isinstance(exc, CompressError):
        return text[0] if text else "error"
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def write_traceback(exc: BaseException, path: Path | None = None) -> Path:
    """Write ``exc``'s traceback to ``path`` (default: a new file under the compress cache's logs/)."""
    import datetime
    import os
    import traceback

    if path is None:
        from .eval.cache import compress_cache_dir

        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = compress_cache_dir() / "logs" / f"compress-{stamp}-{os.getpid()}.log"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path
