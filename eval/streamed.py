"""Token-level perplexity of a checkpoint larger than memory: the held-out windows go through the model one
decoder layer at a time, each layer read from the shards and freed (compress.streaming).

The numbers are those of :func:`perplexity` on the loaded model: the same batches meet the same layers
with the same keyword arguments, and the model's own forward runs everything outside the layer stack
(embedding, masks, final norm, head, logit soft-capping), with the layers replaced by stubs that hand
back the hidden states computed layer by layer. Memory: the windows' hidden states (one tensor per
batch) plus one decoder layer plus the parts outside the stack.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..distributed import shard
from ..utils import progress_iter
from .perplexity import check_windows, nll_sum, summarise_nll


class _Stub(nn.Module):
    """Stands in for a decoder layer: records what the model passes it, and returns ``replay`` (when set) or
    its input unchanged, without computing anything."""

    def __init__(self, kind, record: list | None, stop: bool):
        super().__init__()
        self.kind, self.record, self.stop, self.replay = kind, record, stop, None

    def forward(self, hidden_states, *args, **kwargs):
        if self.record is not None:
            self.record.append((hidden_states, kwargs))
        if self.stop:
            raise _Stop
        return hidden_states if self.replay is None else self.replay


class _Stop(Exception):
    pass


def streamed_perplexity(
    folder: str | Path, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, dtype=torch.float32
) -> dict:
    """:func:`compress.eval.perplexity.perplexity` of the checkpoint in ``folder``, streamed layer by layer."""
    from ..activations import layer_kinds
    from ..streaming import StreamedModel

    check_windows(windows, batch_size)
    stream = StreamedModel(folder, dtype=dtype)
    model, layers = stream.model, stream.layers
    stream.materialise(skip_layers=True)
    real = list(layers)
    kinds = layer_kinds(model, layers)
    batches = [b.to(dtype=torch.long) for b in shard(windows).split(batch_size)]
    device = stream.device
    try:
        with torch.inference_mode():
            # 1. what enters the layer stack: layer 0's hidden states, and each layer kind's keyword arguments
            first_of = {}
            for i, kind in enumerate(kinds):
                first_of.setdefault(kind, i)
            records = {kind: [] for kind in first_of}
            last = max(first_of.values())
            for i in range(len(layers)):
                record = records[kinds[i]] if first_of[kinds[i]] == i else None
                layers[i] = _Stub(kinds[i], record, stop=i == last)
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
            hidden = [h for h, _ in records[kinds[0]]]
            kwargs = {kind: [k for _, k in entries] for kind, entries in records.items()}
            # 2. the layers, one at a time
            for i in progress_iter(range(len(layers)), "perplexity: layers", progress, total=len(layers)):
                prefix = f"{stream.layers_name}.{i}"
                layers[i] = real[i]
                stream.materialise(prefix)
                for b, x in enumerate(hidden):
                    out = real[i](x, **kwargs[kinds[i]][b])
                    hidden[b] = out[0] if isinstance(out, tuple) else out
                stream.release(prefix)
                layers[i] = _Stub(kinds[i], None, stop=False)
            # 3. the model's own tail (final norm, head, soft-capping) on the last layer's outputs
            total = 0.0
            for b, ids in enumerate(batches):
                layers[0].replay = hidden[b]
                total += nll_sum(model(input_ids=ids.to(device), use_cache=False).logits, ids.to(device))
                hidden[b] = None
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
        stream.close()
    return {**summarise_nll(total, windows), "path": "streamed"}
