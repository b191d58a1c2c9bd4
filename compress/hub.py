"""`compress push`: upload a finished run folder to the Hugging Face Hub as ONE commit.

What goes up (flat, so ``from_pretrained(repo_id)`` finds the checkpoint at the root):
every file of ``<run>/model/`` (safetensors, config.json with the compression section,
tokenizer files, compress_manifest.json), ``recipe.yaml``, ``report.json``, ``report.md``,
the report's plots, and the generated model card ``README.md`` (compress.model_card).

How: ``HfApi.create_repo(exist_ok=True)`` (+ ``create_branch(exist_ok=True)`` for a
revision other than main), then ``HfApi.preupload_lfs_files`` + ``HfApi.create_commit``
with one ``CommitOperationAdd`` per file: huggingface_hub asks ``/preupload`` which files
are LFS and uploads those (through Xet when ``hf_xet`` is installed and not disabled,
otherwise the LFS batch API: basic PUT or multipart, retried on 429/5xx); create_commit
then checks README.md's metadata (``/api/validate-yaml``) and posts the one commit,
skipping the already uploaded content. Uploading first (split out of create_commit, which
would do the same internally) tells an upload failure, after which no commit exists,
from a failed commit call. Files are streamed from disk, never read into memory.

The local run folder is only read. Every failure becomes one ``CompressError`` line that
says what failed and that nothing was committed; success is announced only after the
commit call returned.

The endpoint is ``$HF_ENDPOINT`` read when pushing (huggingface_hub itself reads it once,
at import, into ``constants.ENDPOINT``), so tests and mirrors can point it elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CompressError
from .model_card import CARD_NAME, human_bytes, render_card
from .run_folder import RunFolder, read_run

RUN_FILES = ("recipe.yaml", "report.json", "report.md")


@dataclass(frozen=True)
class UploadItem:
    path_in_repo: str
    size: int
    local: Path | None = None  # a file of the run folder, streamed from disk
    data: bytes | None = None  # generated content (the model card)


@dataclass
class PushPlan:
    run: RunFolder
    repo_id: str
    private: bool
    revision: str | None
    card: str
    items: list[UploadItem] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.items)


def _check_target(repo_id: str, private: bool, revision: str | None) -> None:
    from pydantic import ValidationError

    from .recipe import PushConfig

    try:
        PushConfig(repo_id=repo_id, private=private, revision=revision)
    except ValidationError:
        raise CompressError(
            f"invalid repo id {repo_id!r}: expected owner/name (letters, digits, '_', '-', '.')"
        ) from None


def plan_push(run_dir: str | Path, repo_id: str, private: bool = True, revision: str | None = None) -> PushPlan:
    """Check the run folder (weights against their sha256 manifest) and list what would be uploaded."""
    from .checkpoint import QUANT_METHOD
    from .models import verify_folder

    _check_target(repo_id, private, revision)
    run = read_run(run_dir)
    quant = run.config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise CompressError(
            f"{run.model_dir / 'config.json'} has no compress quantization_config; is {run.path} a compress run?"
        )
    verify_folder(run.model_dir)  # a truncated/corrupt weight file fails here, before any upload
    items: list[UploadItem] = []
    for path in sorted(run.model_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name != CARD_NAME:
            items.append(UploadItem(path.name, path.stat().st_size, local=path))
    for name in [*RUN_FILES, *run.report.get("figures", [])]:
        path = run.path / name
        if not path.is_file():
            raise CompressError(f"{run.path} is incomplete: {name} is missing")
        items.append(UploadItem(name, path.stat().st_size, local=path))
    card = render_card(run, repo_id, revision)
    items.append(UploadItem(CARD_NAME, len(card.encode()), data=card.encode()))
    seen: set[str] = set()
    for item in items:
        if item.path_in_repo in seen:
            raise CompressError(f"{run.path}: two files would be uploaded as {item.path_in_repo!r}")
        seen.add(item.path_in_repo)
    return PushPlan(run, repo_id, private, revision, card, items)


def describe_plan(plan: PushPlan, endpoint: str | None = None) -> str:
    """What `compress push --dry-run` prints: files, sizes and the card."""
    width = max(len(item.path_in_repo) for item in plan.items)
    lines = [
        f"dry run: would push {len(plan.items)} files ({human_bytes(plan.total_bytes)}) in one commit to "
        f"{plan.repo_id} ({'private' if plan.private else 'public'} if created, revision "
        f"{plan.revision or 'main'}) at {endpoint or hub_endpoint()}; nothing was uploaded",
        "",
    ]
    for item in plan.items:
        source = str(item.local) if item.local else "generated model card"
        lines.append(f"  {item.path_in_repo:<{width}}  {human_bytes(item.size):>9}  {source}")
    lines += ["", f"----- {CARD_NAME} -----", plan.card.rstrip("\n"), f"----- end of {CARD_NAME} -----"]
    return "\n".join(lines)


# ---------------------------------------------------------------- the push


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None) -> str:
    """The token to push with: explicit, else HF_TOKEN / the saved login. None is an error."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise CompressError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` "
            "(a token with write access); nothing was uploaded"
        )
    return token


def _first_line(text: str, limit: int = 200) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _explain(exc: BaseException, stage: str, repo_id: str, endpoint: str) -> str:
    """One line for any failure during a push."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    chain, seen = [], set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    committed = (
        "the commit was not confirmed (check the repo before retrying)"
        if stage == "committing"
        else "nothing was committed"
    )
    http = next((c for c in chain if isinstance(c, HfHubHTTPError) and c.response is not None), None)
    if http is not None:
        code = http.response.status_code
        server = _first_line(http.server_message or "")
        said = f" (the hub said: {server})" if server else ""
        if code == 401:
            return (
                f"the hub at {endpoint} refused the token with 401 Unauthorized while {stage}{said}: it is invalid "
                f"or expired; log in again (`hf auth login`) or set HF_TOKEN; {committed}"
            )
        if code == 403:
            return (
                f"the token may not write to {repo_id}: 403 Forbidden while {stage}{said}; use a token with "
                f"write access to that namespace; {committed}"
            )
        if code == 404:
            return f"{repo_id} was not found or is not accessible with this token: 404 while {stage}{said}; {committed}"
        if code == 429 or code >= 500:
            retried = ", after huggingface_hub's retries" if stage == "uploading" else ""
            return (
                f"the hub at {endpoint} failed with HTTP {code} while {stage}{said}{retried}; {committed}; "
                f"the local run folder is unchanged, retry later"
            )
        return f"the hub at {endpoint} rejected the push with HTTP {code} while {stage}{said}; {committed}"
    offline = next((c for c in chain if isinstance(c, OfflineModeIsEnabled)), None)
    if offline is not None:
        return f"HF_HUB_OFFLINE is set, pushing needs the network; {committed}"
    transport = next((c for c in chain if isinstance(c, httpx2.TransportError)), None)
    if transport is not None:
        return (
            f"cannot reach the hub at {endpoint} while {stage}: {type(transport).__name__}: "
            f"{_first_line(transport) or 'no details'}; {committed}"
        )
    if isinstance(exc, ValueError) and "metadata" in str(exc):
        return (
            f"the hub rejected the model card while {stage}: {_first_line(str(exc).replace(chr(10), ' '))}; {committed}"
        )
    return f"push failed while {stage}: {type(exc).__name__}: {_first_line(exc) or 'no details'}; {committed}"


def push_run(
    run_dir: str | Path,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    echo=print,
):
    """Push a finished run folder in one commit; returns huggingface_hub's CommitInfo."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from . import __version__

    plan = plan_push(run_dir, repo_id, private, revision)  # offline checks first
    token = resolve_token(token)
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    if constants.is_offline_mode():
        raise CompressError("HF_HUB_OFFLINE is set, pushing needs the network; nothing was uploaded")
    api = HfApi(endpoint=endpoint, token=token, library_name="compress", library_version=__version__)
    operations = [
        CommitOperationAdd(item.path_in_repo, item.data if item.data is not None else str(item.local))
        for item in plan.items
    ]
    size = plan.run.report["size"]
    title = (
        f"compress: {plan.run.report['recipe']['name']} "
        f"({size['compression_ratio']:.1%} of the targeted parameters removed)"
    )
    echo(f"pushing {len(plan.items)} files ({human_bytes(plan.total_bytes)}) to {repo_id} at {endpoint} ...")
    stage = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            stage = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        stage = "uploading"  # which files are LFS (preupload), then their content (LFS batch / Xet)
        api.preupload_lfs_files(repo_id, additions=operations, repo_type="model", revision=revision, free_memory=False)
        stage = "committing"  # README.md metadata check, then the commit itself (uploaded files are skipped)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=title,
            repo_type="model",
            revision=revision,
            commit_description=f"Run folder: {plan.run.path.name}. Made with compress {__version__}.",
        )
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # huggingface_hub / httpx raise many types; all become one line
        raise CompressError(f"push to {repo_id} failed: {_explain(exc, stage, repo_id, endpoint)}") from None
    where = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    echo(f"pushed {len(plan.items)} files to {where} (commit {str(info.oid)[:12]})")
    return info
