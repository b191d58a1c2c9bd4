from .apply import OfaEmbedding
from .config import ExtendVocabConfig, OfaEmbeddingConfig
from .extend_vocab import ExtendVocab

__all__ = ["OfaEmbedding", "OfaEmbeddingConfig", "ExtendVocab", "ExtendVocabConfig"]
