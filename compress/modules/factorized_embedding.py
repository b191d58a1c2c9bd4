"""FactorizedEmbedding (OFA): the V x D table stored as coordinates (V x k) times primitives (k x D).

A token's vector is ``coords[token] @ P``: a k-dimensional lookup followed by one small
projection, so the table costs k(V + D) parameters instead of V*D. ``TiedFactorizedLMHead`` is
the matching output layer for tied models: logits = (h P^T) C^T, computed right to left so
the V x D matrix is never built, and holding no parameters of its own (it reads the embedding's).
"""
from __future__ import annotations

import torch
from torch import nn


class FactorizedEmbedding(nn.Module):
    """Replacement for an ``nn.Embedding`` (or Gemma's scaled one): E ~= coords.weight @ primitives.weight.T.

    ``coords`` is an nn.Embedding(V, k) and ``primitives`` an nn.Linear(k, D) without bias, so
    optimisers, peft and accelerate see two ordinary layers. ``embed_scale`` reproduces models that
    multiply the looked-up vector by a constant (Gemma: sqrt(D)); it is config, not a weight.
    """

    spec_type = "factorized_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, dim: int, padding_idx: int | None = None,
                 embed_scale: float = 1.0, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not 0 < dim <= min(num_embeddings, embedding_dim):
            raise ValueError(f"dim {dim} out of range for a {num_embeddings}x{embedding_dim} embedding")
        self.num_embeddings, self.embedding_dim, self.dim = num_embeddings, embedding_dim, dim
        self.padding_idx, self.embed_scale = padding_idx, float(embed_scale)
        factory = {"dtype": dtype, "device": device}
        self.coords = nn.Embedding(num_embeddings, dim, padding_idx=padding_idx, **factory)
        self.primitives = nn.Linear(dim, embedding_dim, bias=False, **factory)

    @classmethod
    def from_factors(cls, coords: torch.Tensor, primitives: torch.Tensor, padding_idx: int | None = None,
                     embed_scale: float = 1.0) -> "FactorizedEmbedding":
        """``coords`` is (V x k), ``primitives`` is (k x D): the embedding is coords @ primitives."""
        layer = cls(coords.shape[0], primitives.shape[1], coords.shape[1], padding_idx, embed_scale,
                    dtype=coords.dtype, device=coords.device)
        with torch.no_grad():
            layer.coords.weight.copy_(coords)
            layer.primitives.weight.copy_(primitives.T)
        return layer

    # -- checkpoint spec: enough to rebuild the empty module before weights load --
    def spec(self) -> dict:
        return {"type": self.spec_type, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "dim": self.dim, "padding_idx": self.padding_idx, "embed_scale": self.embed_scale}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> "FactorizedEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["dim"], spec.get("padding_idx"),
                   spec.get("embed_scale", 1.0), dtype=dtype, device=device)

    @property
    def weight(self) -> torch.Tensor:
        """The dense V x D equivalent (materialised on demand; for analysis, not the forward)."""
        return self.coords.weight @ self.primitives.weight.T

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.primitives(self.coords(input_ids))
        if self.embed_scale != 1.0:  # same rounding as Gemma: an fp32 scalar cast to the weights' dtype
            out = out * torch.tensor(self.embed_scale, dtype=torch.float32).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, dim={self.dim}"
                + (f", embed_scale={self.embed_scale:g}" if self.embed_scale != 1.0 else ""))


class TiedFactorizedLMHead(nn.Module):
    """Output layer sharing a FactorizedEmbedding's factors: logits = (h P^T) C^T.

    The embedding is referenced, not registered as a child, so the state dict (and the
    checkpoint) holds the factors once and every optimiser step moves both uses together.
    After loading a checkpoint, ``bind(model)`` reconnects it to ``tied_to`` (a module name).
    """

    spec_type = "tied_factorized_lm_head"

    def __init__(self, embedding: FactorizedEmbedding | None, tied_to: str):
        super().__init__()
        self.tied_to = tied_to
        self._embedding = (embedding,)  # a tuple: not a registered submodule

    @property
    def embedding(self) -> FactorizedEmbedding:
        embedding = self._embedding[0]
        if embedding is None:
            raise RuntimeError(f"TiedFactorizedLMHead is not bound to {self.tied_to!r}; call bind(model)")
        return embedding

    def bind(self, model: nn.Module) -> None:
        embedding = model.get_submodule(self.tied_to)
        if not isinstance(embedding, FactorizedEmbedding):
            raise ValueError(f"{self.tied_to} is a {type(embedding).__name__}, not a FactorizedEmbedding")
        self._embedding = (embedding,)

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def spec(self) -> dict:
        return {"type": self.spec_type, "tied_to": self.tied_to}

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> "TiedFactorizedLMHead":
        return cls(None, spec["tied_to"])

    @property
    def weight(self) -> torch.Tensor:
        """The dense V x D equivalent (for analysis only)."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding
        # primitives.weight is P^T (D x k): h @ P^T is F.linear(h, P); then the k -> V step against C.
        projected = nn.functional.linear(hidden, embedding.primitives.weight.T)
        return nn.functional.linear(projected, embedding.coords.weight)

    def extra_repr(self) -> str:
        return f"tied_to={self.tied_to!r}"
