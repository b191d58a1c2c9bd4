"""FactorizedEmbedding (OFA): the V x D table stored as coordinates (V x k) times primitives (k x D).

A token's vector is ``coords[token] @ P``: a k-dimensional lookup followed by one small
projection, so the table costs k(V + D) parameters instead of V*D. ``TiedFactorizedLMHead`` is
the matching output layer for tied models: logits = (h P^T) C^T, computed right to left so
the V x D matrix is never built, and holding no parameters of its own (it reads the embedding's).

Frequency-aware layout (as adaptive input embeddings / adaptive softmax): ``full_ids`` names
tokens that keep a full D-dimensional row (``full_rows``); only the remaining "tail" tokens
are coordinates x primitives. A few thousand frequent tokens carry most of the text, while
the tail of a 262k vocabulary is where low rank costs little.
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
    adapter_parameters = ("coords.weight", "primitives.weight")

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dim: int,
        padding_idx: int | None = None,
        embed_scale: float = 1.0,
        full: int = 0,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if not 0 < dim <= min(num_embeddings, embedding_dim):
            raise ValueError(f"dim {dim} out of range for a {num_embeddings}x{embedding_dim} embedding")
        if not 0 <= full < num_embeddings:
            raise ValueError(f"{full} full rows out of range for {num_embeddings} tokens")
        self.num_embeddings, self.embedding_dim, self.dim = num_embeddings, embedding_dim, dim
        self.padding_idx, self.embed_scale, self.full = padding_idx, float(embed_scale), full
        factory = {"dtype": dtype, "device": device}
        # with full rows, coords rows are the tail tokens in id order; nn.Embedding's padding_idx
        # would then name the wrong row, so it is kept only as an attribute
        self.coords = nn.Embedding(num_embeddings - full, dim, padding_idx=None if full else padding_idx, **factory)
        self.primitives = nn.Linear(dim, embedding_dim, bias=False, **factory)
        self.full_rows = nn.Embedding(full, embedding_dim, **factory) if full else None
        if full:  # position[token] indexes cat([full rows, tail rows]); saved with the weights
            self.register_buffer("position", torch.arange(num_embeddings, device=device))

    @classmethod
    def from_factors(
        cls,
        coords: torch.Tensor,
        primitives: torch.Tensor,
        padding_idx: int | None = None,
        embed_scale: float = 1.0,
        full_ids: torch.Tensor | None = None,
        full_rows: torch.Tensor | None = None,
    ) -> FactorizedEmbedding:
        """``coords`` is (V x k) and ``primitives`` (k x D): the embedding is coords @ primitives. With
        ``full_ids`` (N distinct token ids) and ``full_rows`` (N x D), those tokens keep their rows and
        ``coords`` holds only the V - N others, in id order."""
        full = 0 if full_ids is None else int(full_ids.numel())
        vocab = coords.shape[0] + full
        layer = cls(
            vocab,
            primitives.shape[1],
            coords.shape[1],
            padding_idx,
            embed_scale,
            full,
            dtype=coords.dtype,
            device=coords.device,
        )
        with torch.no_grad():
            layer.coords.weight.copy_(coords)
            layer.primitives.weight.copy_(primitives.T)
            if full:
                ids = full_ids.to(device=coords.device, dtype=torch.long)
                if ids.unique().numel() != full or int(ids.min()) < 0 or int(ids.max()) >= vocab:
                    raise ValueError(f"full_ids must be {full} distinct ids in [0, {vocab})")
                ids, order = ids.sort()
                layer.full_rows.weight.copy_(full_rows[order])
                is_full = torch.zeros(vocab, dtype=torch.bool, device=coords.device)
                is_full[ids] = True
                layer.position[ids] = torch.arange(full, device=coords.device)
                layer.position[~is_full] = full + torch.arange(vocab - full, device=coords.device)
        return layer

    # -- checkpoint spec: enough to rebuild the empty module before weights load --
    def spec(self) -> dict:
        return {
            "type": self.spec_type,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "dim": self.dim,
            "padding_idx": self.padding_idx,
            "embed_scale": self.embed_scale,
            "full": self.full,
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> FactorizedEmbedding:
        return cls(
            spec["num_embeddings"],
            spec["embedding_dim"],
            spec["dim"],
            spec.get("padding_idx"),
            spec.get("embed_scale", 1.0),
            spec.get("full", 0),
            dtype=dtype,
            device=device,
        )

    @property
    def full_ids(self) -> torch.Tensor:
        """The token ids with full rows, ascending (row i of ``full_rows`` belongs to ``full_ids[i]``)."""
        if not self.full:
            return torch.empty(0, dtype=torch.long, device=self.coords.weight.device)
        return (self.position < self.full).nonzero().squeeze(1)

    @property
    def weight(self) -> torch.Tensor:
        """The dense V x D equivalent (materialised on demand; for analysis, not the forward)."""
        tail = self.coords.weight @ self.primitives.weight.T
        if not self.full:
            return tail
        return torch.cat([self.full_rows.weight, tail]).index_select(0, self.position)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.full:
            position = self.position[input_ids]
            is_full = position < self.full
            tail = self.primitives(self.coords((position - self.full).clamp_min(0)))
            out = torch.where(is_full.unsqueeze(-1), self.full_rows(position.clamp_max(self.full - 1)), tail)
        else:
            out = self.primitives(self.coords(input_ids))
        if self.embed_scale != 1.0:  # same rounding as Gemma: an fp32 scalar cast to the weights' dtype
            out = out * torch.tensor(self.embed_scale, dtype=torch.float32).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, dim={self.dim}"
            + (f", full={self.full}" if self.full else "")
            + (f", embed_scale={self.embed_scale:g}" if self.embed_scale != 1.0 else "")
        )


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
    def from_spec(cls, spec: dict, dtype: torch.dtype | None = None, device=None) -> TiedFactorizedLMHead:
        return cls(None, spec["tied_to"])

    @property
    def weight(self) -> torch.Tensor:
        """The dense V x D equivalent (for analysis only)."""
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding
        # primitives.weight is P^T (D x k): h @ P^T is F.linear(h, P); then the k -> V step against C.
        projected = nn.functional.linear(hidden, embedding.primitives.weight.T)
        logits = nn.functional.linear(projected, embedding.coords.weight)
        if not embedding.full:
            return logits
        full = nn.functional.linear(hidden, embedding.full_rows.weight)
        return torch.cat([full, logits], dim=-1).index_select(-1, embedding.position)

    def extra_repr(self) -> str:
        return f"tied_to={self.tied_to!r}"
