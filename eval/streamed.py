"""Token-level perplexity of a checkpoint larger than memory: the held-out windows go through the model one
decoder layer at a time, each layer read from the shards and freed (compress.streaming).

The numbers are those of :func:`perplexity` on the loaded model: the same batches meet the same layers
with the same keyword arguments, and the model's own forward runs everything outside the layer stack
(embedding, masks, final norm, head, logit soft-capping), with the layers replaced by stubs that hand
back the hidden states computed layer by layer. Memory: the windows' hidden states (one tensor per
batch) plus one decoder layer, or plus the parts outside the stack (read before and after the walk).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..distributed import shard
from ..utils import progress_iter
from .perplexity import check_windows, summarise_nll, tail_nll_sum


def streamed_perplexity(
    folder: str | Path, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, dtype=torch.float32
) -> dict:
    """:func:`compress.eval.perplexity.perplexity` of the checkpoint in ``folder``, streamed layer by layer."""
    from ..activations import capture_layer0_inputs, layer_kinds, run_layer, stubbed_layers
    from ..streaming import StreamedModel

    check_windows(windows, batch_size)
    stream = StreamedModel(folder, dtype=dtype)
    model, layers = stream.model, stream.layers
    stream.materialise(skip_layers=True)
    kinds = layer_kinds(model, layers)
    mine = shard(windows).to(dtype=torch.long)
    with torch.inference_mode():
        hidden, kwargs = capture_layer0_inputs(model, layers, mine, batch_size)
        stream.release_outside()  # embedding and head are not needed during the walk: at 7B shapes 1.6 GB
        for i in progress_iter(range(len(layers)), "perplexity: layers", progress, total=len(layers)):
            prefix = f"{stream.layers_name}.{i}"
            stream.materialise(prefix)
            hidden = [run_layer(layers[i], x, kw) for x, kw in zip(hidden, kwargs[kinds[i]])]
            stream.release(prefix)
        total = 0.0
        stream.materialise(skip_layers=True)
        with stubbed_layers(layers) as stubs:  # the model's own tail (final norm, head, soft-capping)
            for b, ids in enumerate(mine.split(batch_size)):
                total += tail_nll_sum(model, stubs, hidden[b], ids.to(stream.device))
                hidden[b] = None
    return {**summarise_nll(total, windows), "path": "streamed"}
