"""Stage configs for OFA-style embedding factorisation and vocabulary extension."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..base import StageConfig

INPUT_EMBEDDING = r"re:(.*\.)?embed_tokens$"


class OfaEmbeddingConfig(StageConfig):
    """Factorise the input embedding E (V x D) into coordinates (V x k) times primitives (k x D).

    Give ``dim`` (k) or ``reduction`` (the fraction of the embedding's V*D parameters to remove).
    ``weighting: frequency`` weights each row by sqrt(count + 1), counted on the calibration
    text, before the truncated SVD (frequent tokens are reconstructed better), then un-weights
    the coordinates. ``keep_frequent: N`` keeps full D-wide rows for the N most frequent calibration
    tokens and factorises only the tail (then ``dim``/``reduction`` count both parts). ``fit: logits``
    (tied heads) measures the error where the tail mostly acts, in the head's logits: the table is
    whitened by the covariance of the final hidden states (SVD-LLM's step). A tied LM head is served
    from the same factors unless ``untie`` keeps it as its own dense matrix.
    """

    method: Literal["ofa_embedding"] = "ofa_embedding"
    targets: list[str] = Field(
        default_factory=lambda: [INPUT_EMBEDDING],
        min_length=1,
        description="must select exactly the model's input embedding",
    )
    dim: int | None = Field(None, ge=1, description="k, the number of primitive embeddings")
    reduction: float | None = Field(None, gt=0, lt=1, description="fraction of the embedding's parameters removed")
    weighting: Literal["none", "frequency"] = "none"
    keep_frequent: int = Field(
        0,
        ge=0,
        description="the N tokens most frequent in the calibration text keep "
        "full rows; only the rest is factorised (adaptive-input layout)",
    )
    fit: Literal["embedding", "logits"] = Field(
        "embedding",
        description="minimise the table's own error, or "
        "the logit error of the tied head (whitened by the hidden states)",
    )
    fit_windows: int = Field(
        16, ge=1, description="calibration windows whose final hidden states give the covariance for fit: logits"
    )
    untie: bool = Field(False, description="tied models only: keep the LM head as its own dense V x D matrix")

    @model_validator(mode="after")
    def _one_size(self):
        if (self.dim is None) == (self.reduction is None):
            raise ValueError("give exactly one of dim (k) or reduction")
        if self.fit == "logits" and self.untie:
            raise ValueError("fit: logits serves the tied head from the factors; it cannot be combined with untie")
        return self


class ExtendVocabConfig(StageConfig):
    """Move the model to a new tokenizer by OFA's rules (arXiv 2311.08849).

    Tokens present in both vocabularies keep their rows (coordinates) exactly; a new token
    gets the softmax(similarity / temperature)-weighted average of the rows of its
    ``neighbours`` most similar old tokens, similarity being the cosine of their vectors in
    ``vectors`` (aligned word vectors, word2vec/fastText .vec text); the rest are random.
    """

    method: Literal["extend_vocab"] = "extend_vocab"
    targets: list[str] = Field(
        default_factory=lambda: [INPUT_EMBEDDING],
        min_length=1,
        description="must select exactly the model's input embedding",
    )
    tokenizer: str = Field(description="folder of the new tokenizer (saved with the checkpoint)")
    vectors: str = Field(description="aligned word vectors, .vec text format ('word v1 ... vd' per line)")
    neighbours: int = Field(10, ge=1, le=1000)
    temperature: float = Field(0.1, gt=0, le=100)
    max_words: int | None = Field(None, ge=1, description="read only the first N words of the vectors file")
    seed: int = 0

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, path: str) -> str:
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"tokenizer folder {path!r} does not exist")
        return path

    @field_validator("vectors")
    @classmethod
    def _vectors_exist(cls, path: str) -> str:
        if not Path(path).expanduser().is_file():
            raise ValueError(f"vectors file {path!r} does not exist")
        return path
