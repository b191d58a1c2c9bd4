"""ofa_embedding: replace the input embedding by OFA's coordinates x primitives factorisation.

A model-level method: it receives the embedding and the LM head (``ModelParts``) and returns their
replacements. A tied head becomes a ``TiedFactorizedLMHead`` over the same factors; with ``untie`` the
head keeps the original dense matrix as its own parameter. Training the factors afterwards is the
``finetune`` method with ``targets: [FactorizedEmbedding]``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ...errors import CompressError
from ...modules import FactorizedEmbedding, TiedFactorizedLMHead
from ...registry import register_method
from ..base import Method, ModelNeeds, PartsUpdate, StageResult
from .config import OfaEmbeddingConfig
from .factorize import (
    check_dim,
    dim_for_reduction,
    factorize_embedding,
    factorized_params,
    frequency_weights,
    relative_error,
)
from .model_embeddings import embed_scale


@register_method
class OfaEmbedding(Method):
    name = "ofa_embedding"
    config_class = OfaEmbeddingConfig
    summary = "OFA: factorise the token embedding into coordinates x primitives (SVD, optional frequency weights)"
    level = "model"

    def model_needs(self, config: OfaEmbeddingConfig) -> ModelNeeds:
        return ModelNeeds(
            token_counts=config.weighting == "frequency" or config.keep_frequent > 0,
            head_input_cov_windows=config.fit_windows if config.fit == "logits" else None,
        )

    def apply_model(self, parts, config: OfaEmbeddingConfig, stats) -> tuple[PartsUpdate, StageResult]:
        start = time.perf_counter()
        name, embedding = parts.embedding_name, parts.embedding
        if isinstance(embedding, FactorizedEmbedding):
            raise CompressError(f"ofa_embedding: {name} is already factorised")
        if not isinstance(embedding, nn.Embedding):
            raise CompressError(f"ofa_embedding: {name} is a {type(embedding).__name__}, not an nn.Embedding")
        scale = embed_scale(embedding)
        vocab, width = embedding.weight.shape
        full = config.keep_frequent
        if full >= vocab:
            raise CompressError(f"ofa_embedding: keep_frequent={full} must be below the vocabulary size {vocab}")
        dim = config.dim if config.dim is not None else dim_for_reduction(vocab, width, config.reduction, full)
        check_dim(vocab, width, dim, full=full)
        tied, head = parts.tied, parts.head
        if tied and not config.untie and getattr(head, "bias", None) is not None:
            raise CompressError("ofa_embedding: the tied LM head has a bias; use untie: true")
        if config.fit == "logits" and not tied:
            raise CompressError("ofa_embedding: fit 'logits' needs a tied LM head (this model's head is untied)")

        counts = stats.token_counts
        weights = frequency_weights(counts) if config.weighting == "frequency" else None
        weight = embedding.weight
        full_ids = tail = None
        if full:  # stable sort: among equal counts the lower id wins, so the choice is deterministic
            full_ids = torch.sort(counts, descending=True, stable=True).indices[:full]
            is_tail = torch.ones(vocab, dtype=torch.bool)
            is_tail[full_ids] = False
            tail = is_tail.nonzero().squeeze(1)
            coords, primitives = factorize_embedding(
                weight[tail.to(weight.device)], dim, None if weights is None else weights[tail], stats.head_input_cov
            )
        else:
            coords, primitives = factorize_embedding(weight, dim, weights, stats.head_input_cov)
        new = FactorizedEmbedding.from_factors(
            coords.to(weight.dtype),
            primitives.to(weight.dtype),
            embedding.padding_idx,
            scale,
            full_ids,
            None if full_ids is None else weight.detach()[full_ids.to(weight.device)].clone(),
        )
        update = PartsUpdate(embedding=new, untie=tied)
        if tied:
            if config.untie:  # the head's Linear still holds the original Parameter: now it is its alone
                head_kind = "dense (untied)"
            else:
                update.head = TiedFactorizedLMHead(new, name)
                head_kind = "tied to the factors"
        else:
            head_kind = "untied in the source (unchanged)"

        before, after = vocab * width, factorized_params(vocab, width, dim, full)
        result = StageResult(self.name)
        result.rows = [
            {
                "module": name,
                "shape": f"{vocab}x{width}",
                "dim": dim,
                "full_rows": full,
                "params_before": before,
                "params_after": after,
            }
        ]
        result.summary = {
            "dim": dim,
            "weighting": config.weighting,
            "keep_frequent": full,
            "fit": config.fit,
            "head": head_kind,
            "requested_reduction": config.reduction,
            "achieved_reduction": 1 - after / before,
            "targeted_params_before": before,
            "targeted_params_after": after,
            "rel_error": relative_error(weight, coords, primitives, rows=tail),
            "wall_time_s": time.perf_counter() - start,
        }
        if counts is not None:
            result.summary["calibration_tokens"] = int(counts.sum())
            result.summary["tokens_seen"] = int((counts > 0).sum())
            if full:  # the share of calibration tokens that now look up a full row
                result.summary["full_row_token_share"] = float(counts[full_ids].sum() / counts.sum().clamp_min(1))
            result.summary["weighted_rel_error"] = relative_error(
                weight, coords, primitives, frequency_weights(counts), rows=tail
            )
        return update, result
