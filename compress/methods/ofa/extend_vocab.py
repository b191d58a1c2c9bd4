"""extend_vocab: move a model to a new tokenizer with OFA's initialisation rules.

A model-level method: it receives the embedding, the LM head and the tokenizer, and returns new ones.
Rows are "coordinates" for a FactorizedEmbedding (the primitives are shared by every token, so
only the V x k part changes) and plain embedding rows for a dense one. An untied LM head gets
the same treatment for its own rows; a tied dense head shares the new embedding's weight; a
TiedFactorizedLMHead follows the embedding by itself. Later stages and the saved checkpoint use the
new tokenizer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...errors import CompressError
from ...modules import FactorizedEmbedding
from ...registry import register_method
from ..base import Method, PartsUpdate, StageResult
from .config import ExtendVocabConfig
from .word_vectors import read_vec, subword_vectors

COPIED, NEIGHBOURS, RANDOM = 0, 1, 2


def ofa_rows(
    source_rows: torch.Tensor,
    source_vocab: dict[str, int],
    target_vocab: dict[str, int],
    source_vectors: dict[int, torch.Tensor],
    target_vectors: dict[int, torch.Tensor],
    target_size: int,
    neighbours: int = 10,
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows target_size x r in float64, kind per row: COPIED / NEIGHBOURS / RANDOM).

    Shared token strings copy their source row; a new token with a vector gets
    sum_j softmax(cos(v, u_j) / temperature) * row_j over its ``neighbours`` most similar source
    tokens j; the rest are drawn from N(mean, std) of the source rows, column by column.
    """
    source = source_rows.detach().to(torch.float64)
    n_source = source.shape[0]
    mean, std = source.mean(0), source.std(0) if n_source > 1 else torch.zeros(source.shape[1], dtype=torch.float64)
    noise = torch.randn(target_size, source.shape[1], generator=generator, dtype=torch.float64)
    rows = mean + std * noise
    kinds = torch.full((target_size,), RANDOM, dtype=torch.long)
    pairs = [
        (t, source_vocab[token])
        for token, t in target_vocab.items()
        if token in source_vocab and source_vocab[token] < n_source and t < target_size
    ]
    if pairs:
        targets, sources = torch.tensor(pairs).T
        rows[targets] = source[sources]
        kinds[targets] = COPIED
    new_ids = [t for t in sorted(target_vectors) if t < target_size and kinds[t] != COPIED]
    candidates = [s for s in sorted(source_vectors) if s < n_source]
    if new_ids and candidates:

        def unit(vectors):
            stacked = torch.stack([v.to(torch.float64) for v in vectors])
            return stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)

        keys = unit([source_vectors[s] for s in candidates])
        candidate_rows = source[torch.tensor(candidates)]
        top = min(neighbours, len(candidates))
        for start in range(0, len(new_ids), chunk):
            ids = new_ids[start : start + chunk]
            similarity = unit([target_vectors[t] for t in ids]) @ keys.T
            best = similarity.topk(top, dim=1)
            weights = torch.softmax(best.values / temperature, dim=1)
            rows[torch.tensor(ids)] = torch.einsum("nj,njr->nr", weights, candidate_rows[best.indices])
            kinds[torch.tensor(ids)] = NEIGHBOURS
    return rows, kinds


def _map_token_id(value, source_tokenizer, target_vocab):
    """A config token id (or list of ids) in the old vocabulary -> the same token's id in the new one."""
    if isinstance(value, (list, tuple)):
        mapped = [_map_token_id(v, source_tokenizer, target_vocab) for v in value]
        return [v for v in mapped if v is not None] or None
    if not isinstance(value, int):
        return None
    token = source_tokenizer.convert_ids_to_tokens(value)
    return target_vocab.get(token) if isinstance(token, str) else None


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"extend_vocab: cannot load the tokenizer in {path}: {first}") from None


def _resized(module: nn.Module, rows: torch.Tensor, size: int) -> nn.Module:
    """A copy of a dense embedding / head module (same class: Gemma's scaled embedding stays scaled) whose
    weight is ``rows`` ([size, D])."""
    new = copy.deepcopy(module)
    new.weight = nn.Parameter(rows.to(module.weight.dtype).to(module.weight.device), requires_grad=False)
    if isinstance(new, nn.Embedding):
        new.num_embeddings = size
    else:
        new.out_features = size
    return new


@register_method
class ExtendVocab(Method):
    name = "extend_vocab"
    config_class = ExtendVocabConfig
    summary = "OFA: move the embedding (and head) to a new tokenizer; new rows from aligned word vectors"
    level = "model"

    def apply_model(self, parts, config: ExtendVocabConfig, stats) -> tuple[PartsUpdate, StageResult]:
        name, embedding, head = parts.embedding_name, parts.embedding, parts.head
        source_tokenizer = parts.tokenizer
        if source_tokenizer is None:
            raise CompressError("extend_vocab needs the model's current tokenizer")
        target_tokenizer = _load_tokenizer(config.tokenizer)
        words, vectors = read_vec(config.vectors, config.max_words)
        source_vectors = subword_vectors(source_tokenizer, words, vectors)
        target_vectors = subword_vectors(target_tokenizer, words, vectors)
        source_vocab, target_vocab = source_tokenizer.get_vocab(), target_tokenizer.get_vocab()
        size = max(len(target_tokenizer), max(target_vocab.values()) + 1)
        generator = torch.Generator().manual_seed(config.seed)

        def extend(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return ofa_rows(
                rows,
                source_vocab,
                target_vocab,
                source_vectors,
                target_vectors,
                size,
                config.neighbours,
                config.temperature,
                generator,
            )

        padding = embedding.padding_idx if isinstance(embedding, (nn.Embedding, FactorizedEmbedding)) else None
        new_padding = _map_token_id(padding, source_tokenizer, target_vocab) if padding is not None else None
        if isinstance(embedding, FactorizedEmbedding) and embedding.full:
            raise CompressError(
                "extend_vocab: an embedding with keep_frequent full rows cannot be extended "
                "(extend first, then factorise)"
            )
        update = PartsUpdate(tokenizer=target_tokenizer)
        if isinstance(embedding, FactorizedEmbedding):
            rows, kinds = extend(embedding.coords.weight)
            dtype = embedding.coords.weight.dtype
            update.embedding = FactorizedEmbedding.from_factors(
                rows.to(dtype), embedding.primitives.weight.detach().T.clone(), new_padding, embedding.embed_scale
            )
        elif isinstance(embedding, nn.Embedding):
            rows, kinds = extend(embedding.weight)
            update.embedding = _resized(embedding, rows, size)
            update.embedding.padding_idx = new_padding
            if parts.tied:  # the head keeps sharing the (new) embedding's weight
                if not isinstance(head, nn.Linear) or head.bias is not None:
                    raise CompressError("extend_vocab: only a bias-free nn.Linear tied LM head can be extended")
                update.head = nn.Linear(head.in_features, size, bias=False, device="meta")
                update.head.weight = update.embedding.weight
        else:
            raise CompressError(f"extend_vocab: {name} is a {type(embedding).__name__}, not an embedding")
        if not parts.tied and head is not None:
            if getattr(head, "bias", None) is not None or not isinstance(head, nn.Linear):
                raise CompressError("extend_vocab: only a bias-free nn.Linear untied LM head can be extended")
            update.head = _resized(head, extend(head.weight)[0], size)

        for target, source in ((update.config, parts.config), (update.generation_config, parts.generation_config)):
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if source is not None and getattr(source, key, None) is not None:
                    target[key] = _map_token_id(getattr(source, key), source_tokenizer, target_vocab)
        update.config["vocab_size"] = size

        counts = torch.bincount(kinds, minlength=3).tolist()
        result = StageResult(self.name)
        result.summary = {
            "source_vocab": len(source_tokenizer),
            "target_vocab": size,
            "copied": counts[COPIED],
            "from_neighbours": counts[NEIGHBOURS],
            "random": counts[RANDOM],
            "vector_words": len(words),
            "vector_dim": int(vectors.shape[1]),
            "source_tokens_with_vectors": len(source_vectors),
            "target_tokens_with_vectors": len(target_vectors),
            "neighbours": config.neighbours,
            "temperature": config.temperature,
            "tokenizer": config.tokenizer,
        }
        return update, result
