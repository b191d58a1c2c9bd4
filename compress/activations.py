"""Measurements on the calibration stream: per-module statistics one decoder layer at a time (the engine
that drives every layer method), and the few whole-model ones (output sensitivities, LM-head inputs).

The engine captures the inputs of decoder layer 0 (hidden states plus the keyword arguments the
model passes every layer: position embeddings, attention mask, ...), then walks the layers in
order. For layer i it runs the layer over the calibration windows with forward pre-hooks on the
layer's targeted Linears that accumulate

* ``cov``    = sum x x^T over tokens of the *current* input (float64),
* ``abs_mean`` = mean |x| per input channel, ``tokens`` = token count,
* ``cross``  = sum x_dense x_current^T (optional): the input the dense model gives the module,
  against the one the partly compressed model gives it (a parallel dense stream is kept),
* ``dense_cov`` = sum x_dense x_dense^T (optional),
* or, where the caller reads them only through the weight (``output_side``) and that is less work, their
  output-side forms: ``target_cross`` = W ``cross`` and, in the sensitivity pass, ``output_cov`` = W ``cov`` W^T
  with ``input_power`` = diag(``cov``) (:class:`InputStats`),

hands them to a callback that replaces the layer's modules, and re-runs the compressed layer to
produce layer i+1's inputs (``sequential=True``: layer i sees the compressed layers before it).
With ``sublayer=True`` the same holds inside a layer: its targeted modules are handled in groups
in call order (q/k/v, then o, then gate/up, then down), each group calibrated after the groups
before it were compressed, and the dense stream runs through an untouched copy of the layer; a block
whose modules are all final (the attention, once o_proj is replaced) is computed once more and handed back
on the later passes instead of being recomputed (:class:`_FinishedBlocks`).
Only hidden states ``[N, seq, hidden]`` (one per stream) are held, never every layer's
activations. Modules that receive the very same input tensor (q/k/v, gate/up) share one
accumulator, so each distinct covariance is computed once.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import shard, share_with_all, sum_, sum_number
from .errors import CompressError
from .offload import Activations
from .targets import layer_index
from .utils import trim_heap


@dataclass
class InputStats:
    """Running sums for one distinct Linear input (possibly shared by several modules).

    A module with fewer outputs than inputs, alone on its input (a Llama's down_proj: 576 outputs, 1,536 inputs),
    may have its second moments taken on the output side, where they are smaller and are all the low-rank
    maths reads of them: ``output_cov`` = sum y y^T (y = W x, bias removed) and the input's ``input_power``
    (sum x^2, the diagonal of ``cov``) instead of ``cov``; ``target_cross`` = sum y_dense x_current^T (y_dense =
    W x_dense, the dense module's own output) instead of ``cross``. (:func:`compress.lowrank_math.target_moment`
    gives W cross from either form; :func:`compress.lowrank_math.truncation_error_profile` takes either.)"""

    in_features: int
    want_cross: bool = False
    want_dense_cov: bool = False
    product_dtype: torch.dtype = torch.float64  # each batch's products (accumulated in float64)
    output_gram: bool = False  # output_cov and input_power instead of cov
    output_cross: bool = False  # target_cross instead of cross
    cov: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    dense_cov: torch.Tensor | None = None
    output_cov: torch.Tensor | None = None
    input_power: torch.Tensor | None = None
    target_cross: torch.Tensor | None = None
    tokens: int = 0

    def _zeros(self, *shape, device) -> torch.Tensor:
        return torch.zeros(*shape, dtype=torch.float64, device=device)

    def add_current(self, x: torch.Tensor, dense: torch.Tensor | None, dense_output: torch.Tensor | None = None):
        """One batch of the module's current input ``x`` (its Gram, or with ``output_gram`` its power only: the
        output's Gram comes from :meth:`add_output`), the dense stream's input ``dense`` (``cross``,
        ``dense_cov``) and, with ``output_cross``, the dense module's output ``dense_output`` (``target_cross``)."""
        x = x.detach().reshape(-1, self.in_features).to(self.product_dtype)
        gram = not self.output_gram
        if self.abs_sum is None:
            self.abs_sum = self._zeros(self.in_features, device=x.device)
        if gram:
            if self.cov is None:
                self.cov = self._zeros(self.in_features, self.in_features, device=x.device)
            _accumulate_gram(self.cov, x)
        else:
            if self.input_power is None:
                self.input_power = self._zeros(self.in_features, device=x.device)
        for rows in x.split(max(1, ACCUMULATE_BLOCK_ELEMENTS // self.in_features)):  # a block at a time
            self.abs_sum += rows.abs().sum(0)  # in the products' dtype (5x faster than cast to float64 on the way)
            if not gram:
                self.input_power += rows.square().sum(0)
        self.tokens += x.shape[0]
        if self.output_cross:
            y = dense_output.detach().reshape(-1, dense_output.shape[-1]).to(self.product_dtype)
            if self.target_cross is None:
                self.target_cross = self._zeros(y.shape[-1], self.in_features, device=x.device)
            _accumulate(self.target_cross, y, x)
        if dense is not None:
            d = dense.detach().reshape(-1, self.in_features).to(self.product_dtype)
            if self.want_cross and not self.output_cross:
                if self.cross is None:
                    self.cross = self._zeros(self.in_features, self.in_features, device=x.device)
                _accumulate(self.cross, d, x)
            if self.want_dense_cov:
                if self.dense_cov is None:
                    self.dense_cov = self._zeros(self.in_features, self.in_features, device=x.device)
                _accumulate_gram(self.dense_cov, d)

    def add_output(self, y: torch.Tensor) -> None:
        """One batch of the module's output (bias removed): its Gram, for an output-side module."""
        y = y.detach().reshape(-1, y.shape[-1]).to(self.product_dtype)
        if self.output_cov is None:
            self.output_cov = self._zeros(y.shape[-1], y.shape[-1], device=y.device)
        _accumulate_gram(self.output_cov, y)

    def as_dict(self) -> dict:
        """Normalised (per-token) statistics, the ``stats`` a method's ``apply`` receives (summed over every
        process first: each one saw its own share of the windows). The sums are divided in place (no second
        n x n matrix): call it once, when the accumulation is over."""
        if self.tokens < 0:
            raise RuntimeError("as_dict was already called on these statistics")
        for gram in (self.cov, self.dense_cov, self.output_cov):
            if gram is not None:
                _fill_lower(gram)
        sums = ("cov", "abs_sum", "cross", "dense_cov", "output_cov", "input_power", "target_cross")
        for key in sums:
            if getattr(self, key) is not None:
                sum_(getattr(self, key))
        tokens = int(sum_number(self.tokens))
        if tokens == 0:
            raise CompressError("activation statistics: a targeted module saw no tokens")
        self.tokens = -1
        n = float(tokens)
        out = {"abs_mean" if key == "abs_sum" else key: getattr(self, key) for key in sums}
        out = {key: None if value is None else value.div_(n) for key, value in out.items()}
        # each moment in the form it was measured in (the other form is absent, not None)
        for key in ("cov",) if self.output_gram else ("output_cov", "input_power"):
            del out[key]
        del out["cross" if self.output_cross else "target_cross"]
        out["tokens"] = tokens
        return out


# elements of a^T b computed at once when its dtype is not the total's: the product and its float64 cast are
# temporaries, 48 MiB at most in row blocks, where whole they cost 12 bytes per element (0.83 GiB at width 8640)
ACCUMULATE_BLOCK_ELEMENTS = 1 << 22


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total (float64) += a^T b, the product computed in a's dtype (in row blocks of total: the same sums)."""
    if a.dtype == total.dtype:
        total.addmm_(a.T, b)
        return
    rows = max(1, ACCUMULATE_BLOCK_ELEMENTS // total.shape[1])
    for start in range(0, total.shape[0], rows):
        total[start : start + rows] += a[:, start : start + rows].T @ b


# a Gram matrix's row panels: about an eighth of its rows each (at least 64), fewer where the block bound above is
# smaller; 35-40 % less time than the whole product at widths 1,536-11,008 (bench/results/statistics_memory.md)
GRAM_PANELS = 8
GRAM_MIN_PANEL_ROWS = 64


def _gram_panel_rows(n: int) -> int:
    return max(GRAM_MIN_PANEL_ROWS, -(-n // GRAM_PANELS))


def _accumulate_gram(total: torch.Tensor, a: torch.Tensor) -> None:
    """total (float64) += a^T a on and above the diagonal only (the sum is symmetric: :func:`_fill_lower` copies
    the rest once the accumulation is over), a row panel at a time: each panel is multiplied by the columns from
    its diagonal block on, about half the whole product's work. Products in a's dtype, as :func:`_accumulate`."""
    n = total.shape[0]
    rows = _gram_panel_rows(n)
    if a.dtype != total.dtype:
        rows = max(1, min(rows, ACCUMULATE_BLOCK_ELEMENTS // n))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        if a.dtype == total.dtype:
            total[start:stop, start:].addmm_(a[:, start:stop].T, a[:, start:])
        else:
            total[start:stop, start:] += a[:, start:stop].T @ a[:, start:]


def _fill_lower(total: torch.Tensor) -> None:
    """Make ``total`` symmetric from its upper triangle (diagonal included), in place, a row panel at a time."""
    n = total.shape[0]
    rows = _gram_panel_rows(n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = total[start:stop, start:stop]
        block.copy_(block.triu() + block.triu(1).T)
        total[stop:, start:stop] = total[start:stop, stop:].T


class _Collector:
    """Forward pre-hooks on one layer's targeted Linears (alias-aware)."""

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        want_cross: bool,
        want_dense_cov: bool,
        dense_modules: dict[str, nn.Module] | None = None,
        group: list[str] | None = None,
        product_dtype: torch.dtype = torch.float64,
        output_gram: Collection[str] = (),
        output_cross: Collection[str] = (),
    ):
        self.modules = modules
        self.product_dtype = product_dtype
        # modules whose moments are taken on their output side (:class:`InputStats`): their own outputs' Gram
        # (the pass must run them: no group stop) and the dense module's outputs against the current inputs
        if output_gram and group:
            raise ValueError("output-side Grams need the modules run: not with a group's early stop")
        self.output_gram, self.output_cross = set(output_gram), set(output_cross)
        self.dense_outputs: dict[str, torch.Tensor] = {}  # the dense pass's outputs of the output_cross modules
        self.dense_modules = dense_modules  # the dense copy's modules, when the dense stream has its own layer
        # sub-layer calibration: modules that share one input (q/k/v), in call order; the layer call stops at
        # the first one's input, which is all of theirs (the others' inputs are never computed)
        self.group = group or []
        self.kept: defaultdict | None = None  # when set: the group's input per call, by stream
        self.keep_stream: str | None = "current"  # the stream the current-mode calls belong to (None: not kept)
        self.want_cross, self.want_dense_cov = want_cross, want_dense_cov
        self.slots: list[dict[str, InputStats]] = [{}]  # one per stream whose statistics are kept apart
        self.slot = 0  # the slot the current pass adds to
        self.mode = "current"  # or "dense": stash the dense inputs for the next current pass
        self.dense_to_end = False  # dense passes run the whole layer (their output is the next dense stream)
        self.stash: dict[str, torch.Tensor] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs seen in this layer call (held alive)
        self._handles = []
        self.statistics_seconds = 0.0  # time inside the accumulations (the rest of a pass is the forward)

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
            if name in self.output_gram:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
        # dense passes run the same modules, or the dense copy's when the layer has one
        for name, module in (self.dense_modules or self.modules).items():
            self._handles.append(module.register_forward_pre_hook(self._dense_hook(name)))
            if name in self.output_cross:
                self._handles.append(module.register_forward_hook(self._dense_output_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        self.stash.clear()
        self.dense_outputs.clear()

    def new_call(self) -> None:
        self._seen.clear()

    def end_batch(self) -> None:
        """The batch's dense inputs and outputs, stashed for its current and variant passes, are done with."""
        self.stash.clear()
        self.dense_outputs.clear()

    def _keep(self, stream: str, name: str, x: torch.Tensor) -> None:
        if self.kept is not None and self.group and name == self.group[0]:
            self.kept[stream].append(x.detach())

    def _stop_here(self, name: str) -> None:
        if self.group and name == self.group[0]:
            raise _StopForward

    def _dense_hook(self, name: str):
        def hook(module, args):
            if self.mode == "dense":
                if name not in self.output_cross:  # (an output_cross module's input is not read)
                    self.stash[name] = args[0]
                if not self.dense_to_end:
                    self._keep("dense", name, args[0])
                    self._stop_here(name)

        return hook

    def _hook(self, name: str):
        def hook(module, args):
            if self.mode == "dense":
                return None
            x = args[0]
            owner = next((n for seen, n in self._seen if seen is x), None)
            self._seen.append((x, name))
            stats = self.slots[self.slot]
            if owner is not None:  # same tensor as an earlier module: share its accumulator
                if {name, owner} & (self.output_gram | self.output_cross):
                    raise RuntimeError(f"{name} shares its input with {owner}: its moments need the input side")
                stats[name] = stats[owner]
            else:
                if name not in stats:
                    stats[name] = InputStats(
                        x.shape[-1],
                        self.want_cross,
                        self.want_dense_cov,
                        self.product_dtype,
                        output_gram=name in self.output_gram,
                        output_cross=name in self.output_cross,
                    )
                dense = self.stash.get(name)
                if (self.want_cross or self.want_dense_cov) and dense is None and name not in self.output_cross:
                    dense = x  # no dense stream (non-sequential): the dense input is the current one
                start = _clock()
                with torch.autocast(x.device.type, enabled=False):  # products in statistics_dtype, not the pass's
                    stats[name].add_current(x, dense, self.dense_outputs.get(name))
                self.statistics_seconds += _clock() - start
            if self.group and name == self.group[0]:
                for other in self.group[1:]:
                    stats[other] = stats[name]
            if self.keep_stream is not None:
                self._keep(self.keep_stream, name, x)
            self._stop_here(name)
            return None

        return hook

    def _output_hook(self, name: str):
        def hook(module, args, output):
            if self.mode == "dense":
                return None
            start = _clock()
            with torch.autocast(output.device.type, enabled=False):
                self.slots[self.slot][name].add_output(_without_bias(module, output))
            self.statistics_seconds += _clock() - start
            return None

        return hook

    def _dense_output_hook(self, name: str):
        def hook(module, args, output):
            if self.mode == "dense":
                self.dense_outputs[name] = _without_bias(module, output)
            return None

        return hook


def _without_bias(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A Linear's output less its bias: W x, whose moments the output-side statistics are."""
    bias = getattr(module, "bias", None)
    return output.detach() if bias is None else output.detach() - bias.detach()


def output_side_modules(modules: dict[str, nn.Module], groups: list[list[str]]) -> set[str]:
    """The modules whose input moments are cheaper taken on their output side: alone on their input (a group
    of one) and with fewer outputs than inputs (a Llama's down_proj: W C W^T is 576 x 576 where C is
    1,536 x 1,536)."""
    chosen = set()
    for group in groups:
        if len(group) == 1:
            module = modules[group[0]]
            out_features, in_features = getattr(module, "out_features", None), getattr(module, "in_features", None)
            if out_features is not None and in_features is not None and out_features < in_features:
                chosen.add(group[0])
    return chosen


class _StopForward(Exception):
    pass


def _copied(output):
    """A copy of a block's output (a tensor, or a tuple of them and None): a recorded output must not change
    if the layer later works on it in place, nor when it is handed back."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(_copied(item) for item in output)
    return output


class _Replay(nn.Module):
    """Stands in for a block of a layer and returns (a copy of) the output it was recorded giving."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return _copied(self.output)


class _FinishedBlocks:
    """Sub-layer calibration runs a layer from its input once per group of modules. A block of the layer (a
    direct child holding targeted modules: ``self_attn``, ``mlp``) whose modules are all replaced gives the
    same output on every later pass, so the first pass that runs it whole records its output (per stream and
    batch) and later passes are handed that output instead of recomputing it: in a Llama layer the attention
    is computed once more after o_proj is replaced, not on the gate/up, down and final passes as well. The
    dense stream's copy of the layer never changes: its blocks are final from the start. A block whose output
    is its last module's (the attention's is o_proj's, the MLP's down_proj's) is not even run once more: the
    pass that calibrates that module keeps its inputs, and once it is replaced the block's outputs are the module
    applied to them (:meth:`ending_in`, :meth:`record_from_inputs`); the MLP's gate/up then run once per batch,
    not again in the final pass. Costs, while the layer is calibrated, one hidden-state tensor per stream and
    batch per block, and down_proj's inputs (2.7 times as wide in a Llama) for one stream, held where
    ``activations`` holds the streams; the results are the same bits."""

    def __init__(self, layer: nn.Module, local: str, probe: LayerProbe, activations: Activations):
        self.final_after: dict[str, int] = {}  # child -> the group after whose replacement it is final
        for child, _ in layer.named_children():
            inside = [
                g for g, group in enumerate(probe.groups) for name in group if name.startswith(f"{local}{child}.")
            ]
            if inside:
                self.final_after[child] = max(inside)
        self.terminal = {  # blocks that end in a module of the group they are final after
            child: (name, arity)
            for child, (name, arity) in probe.terminal.items()
            if child in self.final_after and name in probe.groups[self.final_after[child]]
        }
        self.local, self.activations = local, activations
        self.outputs: dict[tuple, object] = {}  # (block, stream, batch) -> its output, as activations holds it
        self.group = 0  # the pass being run: group index, len(groups) for the layer's final pass

    def ending_in(self, group: int) -> list[tuple[str, str, int]]:
        """(block, module, arity) of the blocks final once ``group`` is replaced whose output is its module's."""
        return [(c, name, arity) for c, (name, arity) in self.terminal.items() if self.final_after[c] == group]

    def record_from_inputs(self, child: str, stream, layer: nn.Module, module: str, arity: int, inputs: list):
        """``child``'s outputs on ``stream``'s batches: ``module`` of ``layer`` (as replaced) on its ``inputs``,
        which are dropped from the list as they are used (an input and its output are never both held for every
        batch)."""
        module = layer.get_submodule(module.removeprefix(self.local))
        for b, x in enumerate(inputs):
            inputs[b] = None
            y = module(x)
            del x
            self.outputs[(child, stream, b)] = self.activations.hold((y, *[None] * (arity - 1)) if arity else y)

    def _record(self, key: tuple, output) -> None:
        if key not in self.outputs:
            self.outputs[key] = self.activations.hold(_copied(output))

    @contextlib.contextmanager
    def running(self, layer: nn.Module, stream, batch: int, dense: bool = False, record: bool = True):
        """While open, ``layer`` (the layer, or the dense stream's copy: ``dense``) runs ``stream``'s ``batch``
        with its final blocks handed back when recorded, and recorded (``record``) when run whole."""
        handles, swapped = [], []
        for child, after in self.final_after.items():
            if not (dense or self.group > after):
                continue
            key = (child, stream, batch)
            module = getattr(layer, child)
            if key in self.outputs:
                setattr(layer, child, _Replay(self.activations.load(self.outputs[key])))
                swapped.append((child, module))
            elif record:
                handles.append(module.register_forward_hook(lambda m, a, out, key=key: self._record(key, out)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for child, module in swapped:
                setattr(layer, child, module)


def decoder_layers(model: nn.Module, module_names) -> tuple[str, nn.ModuleList]:
    """The ``...layers`` ModuleList that holds the targeted modules (by their dotted names)."""
    prefixes = set()
    for name in module_names:
        idx = layer_index(name)
        if idx is None:
            raise CompressError(f"activation-aware methods need targets inside decoder layers; {name!r} is not")
        head = name.split(f"layers.{idx}")[0]
        prefixes.add(head + "layers")
    if len(prefixes) != 1:
        raise CompressError(f"targets span several layer stacks: {sorted(prefixes)}")
    prefix = prefixes.pop()
    layers = model.get_submodule(prefix)
    if not isinstance(layers, nn.ModuleList):
        raise CompressError(f"{prefix} is a {type(layers).__name__}, not a ModuleList of decoder layers")
    return prefix, layers


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def layer_kinds(model: nn.Module, layers: nn.ModuleList) -> list:
    """Per layer, the key of the keyword arguments it receives (``config.layer_types``, e.g. Gemma-3's
    sliding vs full attention get different masks and rotary tables); ``None`` everywhere otherwise."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types is None or len(types) < len(layers):
        return [None] * len(layers)
    return list(types[: len(layers)])


class LayerStub(nn.Module):
    """Stands in for a decoder layer: records what the model passes it (into ``record``, when given) and
    returns ``replay`` (when set) or its input unchanged, computing nothing; ``stop`` ends the forward."""

    def __init__(self, record: list | None = None, stop: bool = False):
        super().__init__()
        self.record, self.stop, self.replay = record, stop, None

    def forward(self, hidden_states, *args, **kwargs):
        if self.record is not None:
            self.record.append((hidden_states, kwargs))
        if self.stop:
            raise _StopForward
        return hidden_states if self.replay is None else self.replay


@contextlib.contextmanager
def stubbed_layers(layers: nn.ModuleList):
    """Every layer replaced by a :class:`LayerStub` for the block (yielded); set ``stubs[0].replay`` to run
    the model's own tail (final norm, head) on hidden states computed elsewhere."""
    real = list(layers)
    stubs = [LayerStub() for _ in real]
    for i, stub in enumerate(stubs):
        layers[i] = stub
    try:
        yield stubs
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer


def capture_layer0_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    windows: torch.Tensor,
    batch_size: int,
    activations: Activations | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering ``layers[0]`` per batch, and the keyword arguments each layer kind is
    called with: ``{kind: [kwargs per batch]}`` (see :func:`layer_kinds`). The layers are replaced by
    stubs for the call, so no layer computes anything (their weights need not even be loaded) and the
    forward stops at the first layer of the last kind. The hidden states (in ``dtype``, when given) are a list
    of ``activations``, which takes each batch's as it is captured (default: a plain list)."""
    kinds = layer_kinds(model, layers)
    first_of = {}
    for i, kind in enumerate(kinds):
        first_of.setdefault(kind, i)
    records: dict = {kind: [] for kind in first_of}
    hidden = (activations or Activations("device")).new()
    device = _device(model)
    with stubbed_layers(layers) as stubs, torch.no_grad():
        for i, kind in enumerate(kinds):
            stubs[i].record = records[kind] if first_of[kind] == i else None
            stubs[i].stop = i == max(first_of.values())
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            if len(records[kinds[0]]) == len(hidden) + 1:  # handed over at once: the records keep the kwargs
                x = records[kinds[0]][-1][0]
                hidden.append(x.detach() if dtype is None else x.detach().to(dtype))
                for calls in records.values():
                    calls[-1] = (None, calls[-1][1])
                del x
    batches = len(windows.split(batch_size))
    if any(len(calls) != batches for calls in records.values()):
        raise CompressError("could not capture the inputs of decoder layer 0 (was it called?)")
    return hidden, {kind: [dict(kwargs) for _, kwargs in calls] for kind, calls in records.items()}


def run_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder layer's output hidden states on ``x``, in ``x``'s dtype (a stream held in bf16 between layers
    is computed in the layer's own dtype)."""
    compute = next((p.dtype for p in layer.parameters() if p.is_floating_point()), x.dtype)
    out = layer(x.to(compute), **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(x.dtype)


def _run_until_stop(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """``run_layer`` that tolerates a collector's early stop (then there is no output: ``None``)."""
    try:
        return run_layer(layer, x, kwargs)
    except _StopForward:
        return None


@dataclass
class LayerProbe:
    """What one probe call of a layer shows about its targeted modules."""

    # the modules in call order, grouped by shared input tensor (e.g. [[q, k, v], [o], [gate, up], [down]])
    groups: list[list[str]]
    # block (a direct child of the layer) -> (module, n): the targeted module whose output *is* the block's
    # output (n = 0), or the first item of an n-tuple whose other items are None (Llama's attention returns
    # (o_proj's output, None))
    terminal: dict[str, tuple[str, int]]

    def renamed(self, prefix: str, to: str) -> LayerProbe:
        """The same probe with each module name's ``prefix`` replaced by ``to`` (another layer of its kind)."""

        def name(n: str) -> str:
            return to + n.removeprefix(prefix)

        return LayerProbe(
            [[name(n) for n in group] for group in self.groups],
            {child: (name(n), arity) for child, (n, arity) in self.terminal.items()},
        )


def probe_layer(layer: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, kwargs: dict) -> LayerProbe:
    """One call of ``layer`` on ``x`` with hooks on ``modules`` (by full name) and on the layer's blocks."""
    order: list[tuple[torch.Tensor, str]] = []
    outputs: dict[str, object] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: order.append((a[0], name)))
        for name, module in modules.items()
    ]
    handles += [
        module.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out))
        for name, module in [*modules.items(), *layer.named_children()]
    ]
    try:
        run_layer(layer, x, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for tensor, name in order:
        group = next((names for t, names in groups if t is tensor), None)
        if group is None:
            groups.append((tensor, [name]))
        elif name not in group:
            group.append(name)
    terminal = {}
    for child, _ in layer.named_children():
        out = outputs.get(child)
        arity = len(out) if isinstance(out, tuple) and all(item is None for item in out[1:]) else 0
        result = out[0] if arity else out
        for name in modules:
            if name in outputs and outputs[name] is result:
                terminal[child] = (name, arity)
    return LayerProbe([names for _, names in groups], terminal)


def _probe(probes: dict, kind, layer: nn.Module, targeted: dict, local: str, x, kwargs: dict) -> LayerProbe:
    """``layer``'s probe, from ``probes`` (a cache): layers of one kind run alike, so one probe per kind and set
    of targeted modules serves them all (kept with local names, ``local`` the layer's prefix)."""
    key = (kind, tuple(sorted(name.removeprefix(local) for name in targeted)))
    if key not in probes:
        probes[key] = probe_layer(layer, targeted, x, kwargs).renamed(local, "")
    return probes[key].renamed("", local)


@dataclass
class EngineReport:
    layers_calibrated: int = 0
    tokens: int = 0
    passes: int = 0
    layer_seconds: list = field(default_factory=list)
    # where the layer time goes: read (a streamed layer from disk), forward (the layer's passes over the
    # windows), statistics (the hooks' accumulations), factorise (the method's on_layer), train, write
    phase_seconds: dict = field(default_factory=dict)
    # where the process's peak RSS was reached: the phase (as above; "passes" = forward and statistics) and layer
    peak_rss_phase: str | None = None
    peak_rss_layer: int | None = None
    layer: int | None = None  # the layer being calibrated
    _peak_seen: int = 0

    @contextlib.contextmanager
    def timed(self, phase: str):
        start = _clock()
        try:
            yield
        finally:
            self.add_time(phase, _clock() - start)
            self.note_peak(phase)

    def note_peak(self, phase: str) -> None:
        """After ``phase``: if the process's peak RSS grew during it, the peak is (so far) this phase's."""
        from .utils import peak_rss_bytes

        peak = peak_rss_bytes()
        if peak > self._peak_seen:
            self._peak_seen, self.peak_rss_phase, self.peak_rss_layer = peak, phase, self.layer

    def add_time(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds


def _clock() -> float:
    """Wall time after the device's queued work (CUDA kernels run asynchronously)."""
    import time

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class _IOCollector:
    """Forward hooks that keep each targeted module's input and output tokens ([N, d] each). Several processes:
    each sees its share of the windows, and every process gets all of them, in window order (the fits that read
    them then see what one process would)."""

    mode = "current"

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.seen: dict[str, tuple[list, list]] = {name: ([], []) for name in modules}
        self._handles = []

    def end_batch(self) -> None:
        pass

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def keep(module, args, output):  # [windows, tokens, features]
            x = args[0]
            self.seen[name][0].append(x.detach().reshape(x.shape[0], -1, x.shape[-1]))
            self.seen[name][1].append(output.detach().reshape(output.shape[0], -1, output.shape[-1]))

        return keep

    def new_call(self) -> None:
        pass

    def results(self) -> dict[str, dict]:
        results = {}
        for name, (xs, ys) in self.seen.items():
            if xs:
                inputs, outputs = (share_with_all(torch.cat(t)).flatten(0, 1) for t in (xs, ys))
                results[name] = {"inputs": inputs, "outputs": outputs, "tokens": inputs.shape[0]}
        return results


LayerTrainer = Callable[[int, nn.Module, list, list, dict], None]


def calibrate_sequentially(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: torch.Tensor,
    on_layer: Callable[[int, dict[str, nn.Module], dict[str, dict]], None],
    *,
    statistics: str = "cov",
    sequential: bool = True,
    sublayer: bool = False,
    cross: bool = False,
    dense_cov: bool = False,
    batch_size: int = 4,
    train_layer: LayerTrainer | None = None,
    progress: bool = False,
    description: str = "layers",
    store=None,
    stream_dtype: torch.dtype | None = None,
    statistics_dtype: torch.dtype = torch.float64,
    variants: list[Callable[[], contextlib.AbstractContextManager]] = (),
    pool_variants: bool = True,
    activations: Activations | None = None,
    output_side: bool = False,
) -> EngineReport:
    """Walk decoder layers in order; call ``on_layer(index, {name: module}, {name: stats})`` per layer
    (per group of modules sharing an input, in call order, with ``sublayer``).

    ``statistics``: ``cov`` (input covariance etc., see :class:`InputStats`), ``io`` (each module's input
    and output tokens) or ``none`` (``stats[name]`` is None: the stream is run only to carry it on).
    ``on_layer`` replaces (some of) the modules, e.g. with ``replace_module``, and owns the ``stats`` it
    gets (it may drop entries as it goes: the engine reads them no more). With
    ``sequential=True`` the layer is then re-run (compressed) to make the next layer's inputs,
    so statistics of layer i reflect the already-compressed layers < i; with ``False`` every
    layer sees dense inputs. ``sublayer=True`` (needs ``sequential``) extends this inside the
    layer: o_proj's statistics then see the compressed q/k/v, down_proj's the compressed gate/up.
    ``cross``/``dense_cov`` keep a parallel dense stream (needed for the dense-target
    objective); without ``sequential`` the two streams coincide.
    ``train_layer(index, layer, inputs, targets, kwargs)`` (optional) runs once a layer's modules are
    replaced, with the layer's inputs per batch and the dense layer's outputs on them as targets.
    ``store`` (a streamed model, :class:`compress.streaming.StreamedLayers`): every layer is walked, read by
    ``store.enter(i)`` before it is used and handed to ``store.leave(i, streams)`` once final, with the streams
    entering the next layer; a resumed store (``store.layers_done``, ``store.resumed_streams``) starts after its
    finished layers, from the streams it saved. ``stream_dtype``: the streams' dtype between layers (e.g. bf16:
    half the memory; every layer still computes in its own dtype). ``statistics_dtype``: the dtype of each
    batch's products (float32: faster, rounded; the sums over batches are float64 either way).
    ``variants``: each a context manager factory that makes the model run as another variant of itself (e.g.
    an elastic model at another budget); each variant keeps its own stream through the already-compressed
    layers, and its passes add to the same statistics as the main stream's, or with ``pool_variants=False``
    to statistics of its own: ``stats[name]["variants"][j]`` (variant j's, same keys; every variant shares the
    dense stream's inputs). ``activations``: where the streams and the other per-batch hidden states are held
    (:class:`compress.offload.Activations`; default: on the device, plain lists). ``output_side``: the caller
    reads ``cross`` only as ``W cross``: a module alone in the last group of a sub-layer walk with fewer outputs
    than inputs (a Llama's down_proj) gets ``target_cross`` = W cross instead, measured on the dense module's
    outputs (:class:`InputStats`), 2.7x less work than ``cross`` at a Llama's shapes.
    """
    import copy
    import time

    from .utils import progress_iter

    if windows is None or not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise CompressError("activation-aware methods need calibration windows (a [N, seq_len] token tensor)")
    if sublayer and not sequential:
        raise CompressError("sub-layer calibration needs sequential calibration")
    if variants and not sequential:
        raise CompressError("calibrating on several variants of the model needs sequential calibration")
    windows = shard(windows)  # this process's share; the statistics are summed over processes
    prefix, layers = decoder_layers(model, modules)
    by_layer: dict[int, dict[str, nn.Module]] = {}
    for name, module in modules.items():
        by_layer.setdefault(layer_index(name), {})[name] = module
    last_targeted = max(by_layer)
    last = last_targeted if store is None else len(layers) - 1  # a streamed model is written whole
    was_training = model.training
    model.eval()
    report = EngineReport(tokens=int(sum_number(windows.numel())))  # every process's share
    report.note_peak("before the layers")  # loading, planning
    two_streams = sequential and (cross or dense_cov)
    held = activations or Activations("device")
    with torch.no_grad():
        current, kwargs_by_kind = capture_layer0_inputs(model, layers, windows, batch_size, held, stream_dtype)
        kinds = layer_kinds(model, layers)
        dense = held.new(current) if two_streams else None
        others = [held.new(current) for _ in variants]  # one stream per variant (nothing compressed yet: equal)
        probes: dict[tuple, LayerProbe] = {}
        first = getattr(store, "layers_done", 0)
        if first:  # a resumed run: the streams as they entered its first unfinished layer
            saved = store.resumed_streams(current, [True, dense is not None, *[True] * len(others)])
            current, dense, *others = [None if stream is None else held.new(stream) for stream in saved]
            del saved

        def run_all(layer, stream, kwargs_list):  # the stream's batches through the whole layer
            return held.new(run_layer(layer, h, kw) for h, kw in zip(stream, kwargs_list))

        def advance(layer, kwargs_list, blocks=None):  # every variant's stream through the (compressed) layer
            for j, (variant, stream) in enumerate(zip(variants, others)):
                with variant():
                    stream[:] = _run_final(layer, stream, kwargs_list, blocks, ("variant", j), held)

        for i in progress_iter(range(first, last + 1), description, progress, total=last + 1 - first):
            start = time.perf_counter()
            report.layer = i
            if store is not None:
                with report.timed("read"):
                    store.enter(i)
            layer = layers[i]
            kwargs_list = kwargs_by_kind[kinds[i]]
            targeted = by_layer.get(i)
            if targeted is None:  # nothing to compress here: just carry the stream(s) forward
                if i < last_targeted:
                    with report.timed("forward"):
                        current = run_all(layer, current, kwargs_list)
                        if dense is not None:
                            dense = run_all(layer, dense, kwargs_list)
                        advance(layer, kwargs_list)
                if store is not None:
                    with report.timed("write"):
                        store.leave(i, (current, dense, *others))
                continue
            targets = None
            if sublayer:
                if train_layer is not None:  # the dense layer's outputs, before any group is replaced
                    with report.timed("forward"):
                        targets = run_all(layer, current, kwargs_list)
                local = f"{prefix}.{i}."
                probe = _probe(probes, kinds[i], layer, targeted, local, current[0], kwargs_list[0])
                groups = probe.groups
                # the dense stream needs the layer as it was, while its groups are being replaced
                dense_layer = copy.deepcopy(layer) if dense is not None else None
                blocks = _FinishedBlocks(layer, local, probe, held)
                for g, group in enumerate(groups):
                    blocks.group = g
                    last_group = g == len(groups) - 1  # its dense pass runs the layer whole: the next dense stream
                    dense_modules = (
                        None
                        if dense_layer is None
                        else {name: dense_layer.get_submodule(name.removeprefix(local)) for name in group}
                    )
                    kept = defaultdict(held.new) if blocks.ending_in(g) else None  # the group's inputs, by stream
                    # the last group's dense pass runs its modules: their outputs give W cross where that is smaller
                    on_output_side = output_side and cross and not dense_cov and dense is not None and last_group
                    group_modules = {name: targeted[name] for name in group}
                    stats, _, dense_outputs = _collect(
                        i,
                        layer,
                        group_modules,
                        current,
                        dense,
                        kwargs_list,
                        statistics,
                        cross,
                        dense_cov,
                        report,
                        dense_layer=dense_layer,
                        dense_modules=dense_modules,
                        group=group,
                        variants=list(zip(variants, others)),
                        pool_variants=pool_variants,
                        statistics_dtype=statistics_dtype,
                        blocks=blocks,
                        dense_to_end=last_group,
                        keep=kept,
                        activations=held,
                        output_cross=output_side_modules(group_modules, [group]) if on_output_side else (),
                    )
                    with report.timed("factorise"):
                        on_layer(i, group_modules, stats)
                    with report.timed("forward"):  # a block ending in a replaced module: its outputs, at once
                        for child, name, arity in blocks.ending_in(g):
                            for stream, model_of in (("current", layer), ("dense", dense_layer)):
                                if len(kept.get(stream, ())) == len(kwargs_list):
                                    blocks.record_from_inputs(child, stream, model_of, name, arity, kept[stream])
                    del kept
                if train_layer is not None:
                    with torch.enable_grad(), report.timed("train"):
                        train_layer(i, layer, current, targets, kwargs_list[0])
                blocks.group = len(groups)
                final = None if train_layer is not None else blocks  # trained blocks give other outputs now
                with report.timed("forward"):
                    current = _run_final(layer, current, kwargs_list, final, "current", held)
                    if dense is not None:
                        dense = dense_outputs
                    advance(layer, kwargs_list, final)
                del dense_layer, blocks
            else:
                stats, outputs, next_dense = _collect(
                    i,
                    layer,
                    targeted,
                    current,
                    dense,
                    kwargs_list,
                    statistics,
                    cross,
                    dense_cov,
                    report,
                    variants=list(zip(variants, others)),
                    pool_variants=pool_variants,
                    statistics_dtype=statistics_dtype,
                    # the dense layer's outputs serve as training targets or as the next inputs; a sequential
                    # walk without training recomputes them compressed, so they are not kept (a stream's size)
                    keep_outputs=train_layer is not None or not sequential,
                    activations=held,
                )
                with report.timed("factorise"):
                    on_layer(i, targeted, stats)
                del stats
                if train_layer is not None:
                    with torch.enable_grad(), report.timed("train"):
                        train_layer(i, layer, current, outputs, kwargs_list[0])
                if sequential:
                    with report.timed("forward"):
                        current = run_all(layer, current, kwargs_list)
                        advance(layer, kwargs_list)
                    if dense is not None:
                        dense = next_dense
                else:
                    current = outputs  # the dense outputs (computed before compression)
            if store is not None:
                with report.timed("write"):
                    store.leave(i, (current, dense, *others))
            report.layers_calibrated += 1
            report.layer_seconds.append(time.perf_counter() - start)
    model.train(was_training)
    return report


def _run_final(layer, stream, kwargs_list: list, blocks: _FinishedBlocks | None, name, held: Activations):
    """The stream's batches through the whole layer (its recorded final blocks handed back, when given)."""
    outputs = held.new()
    for b, (h, kw) in enumerate(zip(stream, kwargs_list)):
        with contextlib.nullcontext() if blocks is None else blocks.running(layer, name, b, record=False):
            outputs.append(run_layer(layer, h, kw))
    return outputs


def _collect(
    index,
    layer,
    targeted,
    current,
    dense,
    kwargs_list,
    statistics,
    cross,
    dense_cov,
    report,
    *,
    dense_layer=None,
    dense_modules=None,
    group=None,
    variants=(),
    pool_variants=True,
    statistics_dtype: torch.dtype = torch.float64,
    blocks: _FinishedBlocks | None = None,
    dense_to_end: bool = False,
    keep: defaultdict | None = None,
    keep_outputs: bool = True,
    activations: Activations | None = None,
    output_cross: Collection[str] = (),
):
    """One pass of the layer over every batch with hooks on ``targeted``: their normalised input
    statistics, and (without ``group``: the modules sharing one input, where the pass stops) the layer's
    outputs on both streams (with ``dense_to_end``, the dense stream's outputs whatever ``group``).
    ``blocks``: the layer's final blocks, handed back. ``keep`` (a defaultdict of lists): filled with the group's
    input per batch, by stream (``current``, and ``dense`` when its pass stops). Without ``keep_outputs`` the
    current stream's outputs are None (not held while the layer is factorised). The outputs are held in
    ``activations``. ``output_cross``: modules whose cross moment is taken as the dense module's outputs against
    the current inputs (``target_cross``; the dense pass must run them)."""
    held = activations or Activations("device")

    def running(model, stream, b, dense=False):
        if blocks is None:
            return contextlib.nullcontext()
        return blocks.running(model, stream, b, dense=dense, record=not (dense and dense_to_end))

    if statistics == "none":
        with report.timed("forward"):
            outputs = held.new(_run_until_stop(layer, h, kw) for h, kw in zip(current, kwargs_list))
        report.passes += len(kwargs_list)
        return {name: None for name in targeted}, outputs, []
    if statistics == "io":
        collector = _IOCollector(targeted)
    else:
        collector = _Collector(
            targeted,
            want_cross=cross,
            want_dense_cov=dense_cov,
            dense_modules=dense_modules,
            group=group,
            product_dtype=statistics_dtype,
            output_cross=output_cross,
        )
        if not pool_variants:
            collector.slots += [{} for _ in variants]
        collector.dense_to_end = dense_to_end
        collector.kept = keep
    outputs, next_dense = held.new(), held.new()
    start = _clock()
    with collector:
        for b, kw in enumerate(kwargs_list):
            if dense is not None:
                collector.mode = "dense"
                collector.new_call()
                dense_model = layer if dense_layer is None else dense_layer
                with running(dense_model, "dense", b, dense=dense_layer is not None):
                    next_dense.append(_run_until_stop(dense_model, dense[b], kw))
            collector.mode = "current"
            collector.new_call()
            with running(layer, "current", b):
                output = _run_until_stop(layer, current[b], kw)
                outputs.append(output if keep_outputs else None)
                del output
            for j, (variant, stream) in enumerate(variants):  # the same dense inputs, on each variant's stream
                with variant(), running(layer, ("variant", j), b):
                    collector.new_call()
                    collector.slot = 0 if pool_variants else j + 1
                    collector.keep_stream = None
                    _run_until_stop(layer, stream[b], kw)
            collector.slot = 0
            collector.keep_stream = "current"
            collector.end_batch()
            report.passes += 1
    statistics_seconds = getattr(collector, "statistics_seconds", 0.0)
    report.add_time("statistics", statistics_seconds)
    report.add_time("forward", _clock() - start - statistics_seconds)
    report.note_peak("passes")
    stats = collector.results() if statistics == "io" else _normalised(collector, targeted, index)
    trim_heap()  # the passes' float64 copies of every batch, freed but still resident
    return stats, outputs, next_dense


def _normalised(collector: _Collector, targeted: dict, index: int) -> dict[str, dict]:
    """The collector's statistics per targeted module, normalised (:meth:`InputStats.as_dict`); with several
    slots, each module's entry lists the other slots' under ``variants``."""
    normalised: dict[int, dict] = {}  # an accumulator shared by q/k/v (gate/up) is summed and normalised once
    slots = []
    for slot in collector.slots:
        slots.append({})
        for name, accumulator in slot.items():
            if id(accumulator) not in normalised:
                normalised[id(accumulator)] = accumulator.as_dict()
            slots[-1][name] = normalised[id(accumulator)]
    stats = {name: slots[0][name] for name in targeted if name in slots[0]}
    for name, entry in stats.items():  # shared by the modules of one input: set once per input
        if len(slots) > 1 and "variants" not in entry:
            entry["variants"] = [slot[name] for slot in slots[1:]]
    missing = [name for name in targeted if name not in stats]
    if missing:
        raise CompressError(f"activation statistics: {missing} were never called in layer {index}")
    return stats


# ---------------------------------------------------------------- whole-model measurements


def output_fisher(
    model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor, batch_size: int = 2
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the summed token loss w.r.t. each module's output, per channel."""
    sums = {name: None for name in modules}
    counts = {name: 0 for name in modules}
    handles = [module.register_forward_hook(_fisher_hook(name, sums, counts)) for name, module in modules.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        embed = model.get_input_embeddings()
        for batch in shard(windows).split(batch_size):
            batch = batch.to(device)
            with torch.enable_grad():
                embeds = embed(batch).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                torch.autograd.grad(loss, embeds)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [n for n, s in sums.items() if s is None]
    if missing:
        raise CompressError(f"sensitivity: no gradient reached {missing[:3]}")
    return {name: sum_(sums[name]) / sum_number(counts[name]) for name in modules}


class _HeadInputCaptured(Exception):
    """Raised by the capture hook: the logits themselves are not needed, so the forward stops there."""


def head_input_covariance(model: nn.Module, head: nn.Module, windows: torch.Tensor, batch_size: int = 4):
    """Sigma = mean h h^T (D x D, float64) of the hidden states entering the LM head on ``windows``."""
    total, count = None, 0

    def capture(module, args):
        raise _HeadInputCaptured(args[0])

    handle = head.register_forward_pre_hook(capture)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in shard(windows).split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _HeadInputCaptured as captured:
                    h = captured.args[0].reshape(-1, captured.args[0].shape[-1]).to(torch.float64)
                    total = h.T @ h if total is None else total + h.T @ h
                    count += h.shape[0]
    finally:
        handle.remove()
    if total is None:
        raise CompressError("the model's forward never reached its LM head")
    return sum_(total) / sum_number(count)


def token_counts(windows: torch.Tensor, vocab: int) -> torch.Tensor:
    """How often each token id occurs in the calibration windows (float64, length V)."""
    ids = shard(windows).reshape(-1).to(torch.long)
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise CompressError(f"calibration tokens fall outside the embedding's {vocab} rows")
    return sum_(torch.bincount(ids, minlength=vocab).to(torch.float64))


class ResidentLayers:
    """The layer store of a model held whole: nothing to read or free."""

    def enter(self, index: int) -> None:
        pass

    def leave(self, index: int, streams=None) -> None:
        pass

    def without_outside(self):
        return contextlib.nullcontext()

    def tail_only(self, dtype):
        return contextlib.nullcontext()


def sensitivity_walk(
    model: nn.Module,
    modules: dict[str, nn.Module],
    windows: torch.Tensor,
    store,
    on_layer: Callable[[int, dict[str, nn.Module], dict[str, dict] | None, dict[str, torch.Tensor]], None],
    batch_size: int = 2,
    statistics: bool = False,
    statistics_dtype: torch.dtype = torch.float64,
    progress: bool = False,
    output_side: bool = False,
) -> None:
    """The output sensitivities of :func:`output_fisher`, one decoder layer at a time: ``on_layer(index,
    {name: module}, stats, {name: fisher})`` for each layer from the top, with (``statistics``) the modules'
    dense input statistics (as :func:`calibrate_sequentially` gives them, non-sequential; each batch's products
    in ``statistics_dtype``) measured on the same pass. ``store`` (enter / leave) reads and frees a streamed
    model's layers (:class:`ResidentLayers`: a model held whole). A forward pass keeps each layer's inputs (on disk,
    so memory stays one layer's), the model's tail gives the loss gradient at the last layer's output, and a
    backward pass walks the layers from the top, recomputing each from its inputs with hooks on the targeted modules
    (their inputs' statistics, their outputs' squared gradients). ``progress``: a bar over the layers per pass.
    ``output_side``: the caller reads a module's ``cov`` only as ``W cov W^T`` and its diagonal: a module alone on
    its input with fewer outputs than inputs gets ``output_cov`` and ``input_power`` instead (:class:`InputStats`;
    7x less work for a Llama's down_proj)."""
    from .offload import Activations
    from .utils import progress_iter

    prefix, layers = decoder_layers(model, modules)
    kinds = layer_kinds(model, layers)
    windows = shard(windows)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden, kwargs = capture_layer0_inputs(model, layers, windows, batch_size)
    lowest = min(layer_index(name) for name in modules)  # no gradient is needed below it
    # each layer's inputs from the lowest on, a file per batch: the backward walk reads one batch at a time
    with Activations("disk", hidden[0].device) as spill:
        inputs_of = {}
        with torch.no_grad():
            probes, output_gram = {}, {}  # by layer: the modules whose moments are taken on the output side
            for i in progress_iter(range(len(layers)), "sensitivity: forward", progress, total=len(layers)):
                store.enter(i)
                if i >= lowest:
                    inputs_of[i] = spill.new(hidden)
                local = f"{prefix}.{i}."
                targeted = {n: m for n, m in modules.items() if n.startswith(local)}
                if output_side and statistics and targeted:
                    probe = _probe(probes, kinds[i], layers[i], targeted, local, hidden[0], kwargs[kinds[i]][0])
                    output_gram[i] = output_side_modules(targeted, probe.groups)
                hidden = [run_layer(layers[i], h, kw) for h, kw in zip(hidden, kwargs[kinds[i]])]
                store.leave(i)
                trim_heap()
        # the tail: d loss / d last layer's output, in the passes' dtype; the head's weight (vocabulary x hidden)
        # cast once, not for every chunk of tokens (2x faster on SmolLM2): a streamed model reads its tail without
        # the embedding, the head in that dtype; a model held whole keeps autocast's copies while the tail runs
        device_type = hidden[0].device.type
        cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        grads = []
        with store.tail_only(cast), stubbed_layers(layers) as stubs, _casting_weights_once(device_type):
            for batch in windows.split(batch_size):
                h = hidden.pop(0)  # not needed after: the backward walk reads the layers' inputs from disk
                grads.append(tail_loss_gradient(model, stubs, h, batch.to(h.device), TAIL_CHUNK_TOKENS))
                del h
        walk = reversed(range(lowest, len(layers)))
        # the tail's gradient is taken: the embedding and head wait on disk (a streamed model) until the walk ends
        with store.without_outside():
            for i in progress_iter(walk, "sensitivity: backward", progress, total=len(layers) - lowest):
                local = {n: m for n, m in modules.items() if n.startswith(f"{prefix}.{i}.")}
                store.enter(i)
                inputs = inputs_of.pop(i)
                sums, counts = {name: None for name in local}, {name: 0 for name in local}
                handles = [m.register_forward_hook(_fisher_hook(n, sums, counts)) for n, m in local.items()]
                collector = None
                if statistics and local:
                    collector = _Collector(
                        local,
                        want_cross=False,
                        want_dense_cov=False,
                        product_dtype=statistics_dtype,
                        output_gram=output_gram.get(i, ()),
                    )
                try:
                    with collector or contextlib.nullcontext(), torch.enable_grad():
                        for b, x in enumerate(inputs):
                            if collector is not None:
                                collector.new_call()
                            x = x.detach().requires_grad_(True)
                            out = run_layer(layers[i], x, kwargs[kinds[i]][b])
                            grads[b] = torch.autograd.grad(out, x, grad_outputs=grads[b])[0]
                            # the batch's graph: the next batch reuses its memory (the heap is trimmed per layer)
                            del out
                finally:
                    for handle in handles:
                        handle.remove()
                if local:  # while the layer is read: on_layer may use its weights
                    missing = [n for n, s in sums.items() if s is None]
                    if missing:
                        raise CompressError(f"sensitivity: no gradient reached {missing[:3]}")
                    fisher = {name: sum_(sums[name]) / sum_number(counts[name]) for name in local}
                    stats = None if collector is None else _normalised(collector, local, i)
                    on_layer(i, local, stats, fisher)
                    del stats
                store.leave(i)
                trim_heap()  # the layer's graphs, statistics and (streamed) weights, freed
    model.train(was_training)


@contextlib.contextmanager
def _casting_weights_once(device_type: str):
    """The enclosing autocast (if any) with its cache of cast weights on: each weight is cast once while open
    (one bf16 copy of the head: 57 MB on SmolLM2), and the copies are dropped at exit."""
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    try:
        with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


# the tail's tokens per step: its logits, their log-softmax and gradients are a few chunk x vocabulary floats each
# (64 x 49,152: 12.6 MB); 128 tokens set the peak of lowrank-20's sensitivity pass on SmolLM2 (the same gradients)
TAIL_CHUNK_TOKENS = 64


def tail_loss_gradient(model: nn.Module, stubs, hidden: torch.Tensor, ids: torch.Tensor, chunk: int):
    """The gradient of the batch's summed next-token loss w.r.t. the last decoder layer's output ``hidden``
    (batch x tokens x D), through the model's own tail (final norm, head, soft-capping; its layers are
    ``stubs``). The tail works token by token, so it runs on ``chunk`` tokens at a time: a whole batch's logits
    (2 x 512 x 49,152 floats: 200 MB, several times that with their softmax and gradients) are never held."""
    grad = torch.zeros_like(hidden)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # the last token predicts nothing: its gradient is 0
    targets = ids[:, 1:].reshape(-1)
    parts = []
    for start in range(0, targets.numel(), chunk):
        with torch.enable_grad():
            x = states[start : start + chunk].detach()[None].requires_grad_(True)
            stubs[0].replay = x
            target = targets[start : start + chunk]
            # the embedding is not read: the stubs replay x whatever enters them
            logits = model(inputs_embeds=x.detach(), use_cache=False).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            parts.append(torch.autograd.grad(loss, x)[0][0])
    stubs[0].replay = None
    grad[:, :-1] = torch.cat(parts).view(hidden.shape[0], hidden.shape[1] - 1, -1)
    return grad


def _fisher_hook(name: str, sums: dict, counts: dict):
    def forward_hook(module, args, output):
        if output.requires_grad:

            def grad_hook(g):
                # one batch's squares summed in float32 (cascaded: relative error ~1e-7; 8x faster than casting
                # the batch to float64), the batches' sums in float64
                g = g.detach().reshape(-1, g.shape[-1])
                batch = g.float().square().sum(0).double()
                sums[name] = batch if sums[name] is None else sums[name] + batch
                counts[name] += g.shape[0]

            output.register_hook(grad_hook)

    return forward_hook
