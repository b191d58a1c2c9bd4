from .apply import DSFormer, dsformer_shape
from .config import DSFormerConfig
from .factorize import dense_sparse_factorize

__all__ = ["DSFormer", "DSFormerConfig", "dense_sparse_factorize", "dsformer_shape"]
