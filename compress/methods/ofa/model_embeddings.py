"""The constant a model's embedding multiplies looked-up vectors by (Gemma: sqrt(D))."""

from __future__ import annotations

from torch import nn

from ...errors import CompressError


def embed_scale(embedding: nn.Module) -> float:
    """The constant some models multiply looked-up vectors by (Gemma: sqrt(D)); 1 for a plain nn.Embedding."""
    if type(embedding).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is None and getattr(embedding, "embed_scale", None) is not None:
        scale = float(embedding.embed_scale)
    if scale is None:
        raise CompressError(
            f"unsupported embedding class {type(embedding).__name__}: its forward is not a "
            "plain lookup (optionally scaled)"
        )
    return float(scale)
