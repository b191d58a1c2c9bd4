from .apply import Lost, lost_shape
from .config import LostConfig
from .factorize import lowrank_sparse_factorize

__all__ = ["Lost", "LostConfig", "lost_shape", "lowrank_sparse_factorize"]
