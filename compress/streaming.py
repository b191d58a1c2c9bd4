"""A model read from its safetensors folder one decoder layer at a time, never whole in memory.

:class:`StreamedModel` builds the model's skeleton with its parameters on the meta device (accelerate's
``init_empty_weights``: no memory; buffers such as rotary tables are computed for real), with a compressed
checkpoint's replacement modules swapped in from their specs, exactly as ``from_pretrained`` would. Tensors
are then read from the shards by name when a part is materialised and dropped back to meta when it is
released, so the peak is one decoder layer plus the parts outside the layer stack (embedding, final norm,
head). The shards may hold tensors in any order: the index maps every name to its file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .errors import CompressError


def tensor_files(folder: Path) -> dict[str, Path]:
    """{tensor name: shard file} of a safetensors folder (sharded with an index, or one file)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompressError(f"{folder} has no safetensors weights to stream")
    out = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            out.update(dict.fromkeys(handle.keys(), path))
    return out


class StreamedModel:
    """The model of ``folder`` with every parameter on the meta device until :meth:`materialise` reads it."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .checkpoint import install_replacements

        self.folder, self.device = Path(folder), torch.device(device)
        config = AutoConfig.from_pretrained(self.folder)
        section = getattr(config, "quantization_config", None)
        specs = (section.get("modules") if isinstance(section, dict) else getattr(section, "modules", None)) or {}
        if section is not None:  # from_config would otherwise look for a quantizer; the specs are applied below
            del config.quantization_config
        self.dtype = dtype or getattr(config, "dtype", None) or torch.float32
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
            install_replacements(self.model, specs, dtype=self.dtype)
        if section is not None:
            self.model.config.quantization_config = section
        self.files = tensor_files(self.folder)
        self.layers_name, self.layers = _layer_stack(self.model)
        self._outside_loaded = False  # whether materialise() read the tensors outside the layers

    def tensors(self, prefix: str) -> list[tuple[str, torch.Tensor]]:
        """(full name, tensor) of every parameter and persistent buffer under ``prefix`` ("" = the whole model)."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        dot = f"{prefix}." if prefix else ""
        return [(dot + name, tensor) for name, tensor in module.state_dict(keep_vars=True).items()]

    def materialise(self, prefix: str = "", skip_layers: bool = False) -> None:
        """Read every tensor under ``prefix`` from the shards (``skip_layers``: not those of the decoder layers)."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        inside = f"{self.layers_name}."
        wanted: dict[Path, list[str]] = {}
        for name, tensor in self.tensors(prefix):
            if tensor.device.type != "meta" or (skip_layers and name.startswith(inside)):
                continue
            if name not in self.files:
                if self._tied(name):
                    continue
                raise CompressError(f"cannot stream {self.folder}: tensor {name} is not in its shards")
            wanted.setdefault(self.files[name], []).append(name)
        # each shard opened only while it is read: a mapped file's touched pages count as this process's memory
        for path, names in wanted.items():
            with safe_open(path, framework="pt") as shard:
                for name in names:
                    value = shard.get_tensor(name)
                    dtype = self.dtype if value.is_floating_point() else None
                    set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=dtype)
        if not prefix or not prefix.startswith(inside):
            self._tie()
            self._outside_loaded = True

    def release_outside(self) -> None:
        """Drop the tensors outside the decoder layers (embedding, final norm, head) back to the meta device:
        the layer walk needs none of them once the calibration windows entered layer 0."""
        from accelerate.utils import set_module_tensor_to_device

        from .utils import trim_heap

        if not self._outside_loaded:  # already dropped: the walk calls this before every layer
            return
        self._outside_loaded = False
        inside = f"{self.layers_name}."
        for name, tensor in self.tensors(""):
            if not name.startswith(inside) and tensor.device.type != "meta":
                set_module_tensor_to_device(self.model, name, "meta")
        self._tie()  # moved one by one, a tied head got its own tensor: the model would count it twice
        trim_heap()

    def materialise_tail(self, head_dtype: torch.dtype) -> None:
        """Read what is outside the layers but the input embedding (final norm, head), the head (a plain Linear) in
        ``head_dtype`` from the shards (of a tied head: the embedding's tensor); call :meth:`release_outside`
        first. Under an autocast to ``head_dtype`` the head computes what it would in float32: autocast's copy of
        its weight is this cast."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        head_module = self.model.get_output_embeddings()
        if type(head_module) is not nn.Linear:  # a replaced head may run ops autocast does not cast
            head_dtype = self.dtype
        inside, head = f"{self.layers_name}.", self._name_of(head_module)
        embedding = self._name_of(self.model.get_input_embeddings())
        for name, tensor in self.tensors(""):
            if name.startswith((inside, f"{embedding}.")) or tensor.device.type != "meta":
                continue
            stored = f"{embedding}.weight" if self._tied(name) else name
            with safe_open(self.files[stored], framework="pt") as shard:
                value = shard.get_tensor(stored)
            in_head = name.startswith(f"{head}.")
            dtype = (head_dtype if in_head else self.dtype) if value.is_floating_point() else None
            set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=dtype)
        self._outside_loaded = True  # in part: release_outside drops it again

    def release(self, prefix: str) -> None:
        """Drop every tensor under ``prefix`` back to the meta device."""
        from accelerate.utils import set_module_tensor_to_device

        from .utils import trim_heap

        for name, tensor in self.tensors(prefix):
            if tensor.device.type != "meta":
                set_module_tensor_to_device(self.model, name, "meta")
        trim_heap()

    def _tied(self, name: str) -> bool:
        head = self.model.get_output_embeddings()
        return bool(getattr(self.model.config, "tie_word_embeddings", False)) and (
            head is not None and name == self._name_of(head) + ".weight"
        )

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, m in self.model.named_modules() if m is module)

    def _tie(self) -> None:
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is not None and self._tied(self._name_of(head) + ".weight") and hasattr(embedding, "weight"):
            head.weight = embedding.weight


def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the ModuleList of ``config.num_hidden_layers`` entries."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) == count:
            return name, module
    raise CompressError(f"cannot find the decoder layers of {type(model).__name__} to stream")


def decoder_stack(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers, or None when it has none that :func:`_layer_stack` recognises."""
    try:
        return _layer_stack(model)[1]
    except (CompressError, AttributeError):
        return None


class CheckpointWriter:
    """Writes a checkpoint's tensors as they become final (one shard per call, in the output dtype); the index
    at the end. Tensors shared by several names (tied embeddings) are written once, as save_pretrained does."""

    def __init__(self, folder: str | Path, dtype: torch.dtype):
        self.folder, self.dtype = Path(folder), dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        out, seen = {}, set()
        for name, tensor in tensors.items():
            key = (tensor.data_ptr(), tuple(tensor.shape))  # within one call: freed memory is reused later
            if name in self.weight_map or key in seen:
                continue
            seen.add(key)
            value = tensor.detach().to("cpu", self.dtype if tensor.is_floating_point() else tensor.dtype)
            out[name] = value.contiguous()
        if not out:
            return
        file = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(out, self.folder / file, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(out, file))
        self.total_size += sum(t.numel() * t.element_size() for t in out.values())

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def saved_key(state: Path) -> str:
    """The key a saved resume state was written for."""
    return torch.load(state, weights_only=True)["key"]


class StreamedLayers:
    """The layer store a streamed compression walks: layer i is read from the source before it is used and,
    once final, written to the output and dropped (the calibration engine calls :meth:`enter` / :meth:`leave`).

    With a ``state`` file, what a resumed run needs is saved after every layer (atomically): the layers done,
    the shards written, each replaced module's spec and report row, and the calibration streams entering the
    next layer (every window's, in window order: a run resumes with any number of processes). With ``resume``
    a saved state is continued (``layers_done`` > 0); one written for another recipe or source (``key``) is
    refused. Under a launch of several processes every process walks the layers on its share of the windows;
    only the main one has a ``writer`` (None elsewhere) and saves the state, the streams gathered into it.
    """

    def __init__(
        self,
        stream: StreamedModel,
        writer: CheckpointWriter | None,
        state: Path | None = None,
        key: str = "",
        resume: bool = False,
    ):
        self.stream, self.writer, self.state, self.key = stream, writer, state, key
        self.layers_done, self._saved_streams, self._spare_files = 0, None, []
        self.done: dict[str, dict] = {}  # module name -> {"spec", "info"} of the finished layers
        if resume and state is not None and state.is_file():
            saved = torch.load(state, weights_only=True, map_location="cpu")
            if saved["key"] != key:
                raise CompressError(
                    f"the unfinished run in {state.parent.parent} was started with another recipe or source; "
                    "run without --resume to start over"
                )
            self.layers_done, self._saved_streams, self.done = saved["layers_done"], saved["streams"], saved["done"]
            if writer is not None:
                writer.weight_map, writer.total_size = saved["weight_map"], saved["total_size"]

    def resumed_streams(self, captured, present: list[bool]) -> list:
        """The saved streams entering the first unfinished layer (the engine's current, dense and variant
        streams; ``present``: which it keeps), each an iterator over this process's share of the windows split
        into batches like ``captured`` (its freshly captured layer-0 inputs), reading one saved chunk at a time;
        None for a stream it does not keep."""
        saved = list(self._saved_streams)
        if len(saved) != len(present) or any(kept != (chunks is not None) for kept, chunks in zip(present, saved)):
            raise CompressError("the saved calibration streams do not match this run's")
        sizes = [len(batch) for batch in captured]
        like = captured[0]
        return [
            None if chunks is None else _share_in_batches(self.state.parent, chunks, sizes, like) for chunks in saved
        ]

    def enter(self, index: int) -> None:
        self.stream.release_outside()  # read again from the source by finish()
        self.stream.materialise(f"{self.stream.layers_name}.{index}")

    def record(self, name: str, module: nn.Module, info: dict) -> None:
        """A module of the current layer was replaced (its spec and report row go into the saved state)."""
        self.done[name] = {"spec": module.spec(), "info": dict(info)}

    def leave(self, index: int, streams=None) -> None:
        from .distributed import gather_shares, most

        prefix = f"{self.stream.layers_name}.{index}"
        if self.writer is not None:
            self.writer.write(dict(self.stream.tensors(prefix)))
        self.stream.release(prefix)
        self.layers_done = index + 1
        if self.state is None:
            return
        # every process takes part in the gathers; the main one saves each stream in chunks, one file per batch
        # index: the batch of every process, in window order (the memory of a batch, wherever the stream is held)
        if self.writer is not None:
            self.state.parent.mkdir(parents=True, exist_ok=True)
        saved_streams, files = [], set()
        for k, held in enumerate(streams or ()):
            chunks = None if held is None else []
            for b in range(0 if held is None else most(len(held))):
                part = held[b] if b < len(held) else held[0][:0]  # a process with fewer batches adds nothing
                chunk = gather_shares(part.cpu())
                if chunk is not None:
                    chunks.append(f"stream-{self.layers_done}-{k}-{b}.pt")
                    self._save_chunk(chunk, self.state.parent / chunks[-1])
                del part, chunk
            saved_streams.append(chunks)
            files.update(chunks or ())
        if self.writer is None:
            return
        saved = {
            "key": self.key,
            "layers_done": self.layers_done,
            "streams": saved_streams,
            "done": self.done,
            "weight_map": self.writer.weight_map,
            "total_size": self.writer.total_size,
        }
        tmp = self.state.with_suffix(".tmp")
        torch.save(saved, tmp)
        tmp.replace(self.state)
        # the previous layer's, once the state names the new: the next layer's chunks are written over them
        self._spare_files = [old for old in self.state.parent.glob("stream-*.pt") if old.name not in files]

    def _save_chunk(self, chunk: torch.Tensor, path: Path) -> None:
        """torch.save ``chunk`` at ``path``, written over a spare file (renamed) where there is one: overwriting a
        file's cached pages is about 10x faster than filling a new file's (SmolLM2's 30 layers: about 10 s)."""
        spare = self._spare_files.pop() if self._spare_files else None
        if spare is None:
            torch.save(chunk, path)
            return
        spare.rename(path)
        with open(path, "r+b") as file:
            torch.save(chunk, file)
            file.truncate()

    def reading(self) -> ReadLayers:
        """The same layers for a pass that reads them and changes nothing (a plan's pre-pass)."""
        return ReadLayers(self.stream)

    def finish(self) -> None:
        """Write what is outside the layers (embedding, final norm, head) and the index; drop the saved state."""
        inside = f"{self.stream.layers_name}."
        self.stream.materialise(skip_layers=True)
        self.writer.write({name: t for name, t in self.stream.tensors("") if not name.startswith(inside)})
        self.stream.release_outside()  # written: the evaluation that follows reads its own copy (1.6 GB at 7B)
        self.writer.finish()
        if self.state is not None:
            import shutil

            shutil.rmtree(self.state.parent, ignore_errors=True)


def _share_in_batches(folder: Path, chunks: list[str], sizes: list[int], like: torch.Tensor):
    """This process's share of a saved stream (its chunks hold consecutive windows, in window order), in batches
    of ``sizes`` windows like ``like`` (device, dtype): one chunk and at most a batch more in memory at a time."""
    from .distributed import rank, world_size

    size_of = iter(sizes)
    wanted, first_window, pending = next(size_of, None), 0, []
    for name in chunks:
        chunk = torch.load(folder / name, weights_only=True, map_location="cpu")
        pending.append(chunk[(rank() - first_window) % world_size() :: world_size()])  # windows rank, rank + W, ...
        first_window += len(chunk)
        del chunk
        while wanted is not None and sum(len(part) for part in pending) >= wanted:
            joined = torch.cat(pending)
            yield joined[:wanted].to(like.device, like.dtype)
            pending, wanted = [joined[wanted:]], next(size_of, None)


class ReadLayers:
    """A layer store for a read-only pass: layer i is read before use and freed after."""

    def __init__(self, stream: StreamedModel):
        self.stream = stream

    def enter(self, index: int) -> None:
        self.stream.materialise(f"{self.stream.layers_name}.{index}")

    def leave(self, index: int, streams=None) -> None:
        self.stream.release(f"{self.stream.layers_name}.{index}")

    @contextlib.contextmanager
    def without_outside(self):
        """While open, the parts outside the layers (embedding, head) are not held: read again at exit."""
        self.stream.release_outside()
        try:
            yield
        finally:
            self.stream.materialise(skip_layers=True)

    @contextlib.contextmanager
    def tail_only(self, dtype: torch.dtype | None):
        """While open, the parts outside the layers are held without the input embedding, the head in ``dtype``
        (the passes' autocast dtype; None: all as they are): a model's tail run on hidden states needs no
        embedding, and its head no float32 copy beside autocast's. Read again whole at exit."""
        if dtype is None:
            yield
            return
        self.stream.release_outside()
        self.stream.materialise_tail(dtype)
        try:
            yield
        finally:
            self.stream.release_outside()
            self.stream.materialise(skip_layers=True)
