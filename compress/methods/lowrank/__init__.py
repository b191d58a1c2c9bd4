from .apply import LowRank
from .config import LowRankConfig

__all__ = ["LowRank", "LowRankConfig"]
