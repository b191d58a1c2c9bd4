from .apply import LowRankAttention
from .config import LowRankAttentionConfig

__all__ = ["LowRankAttention", "LowRankAttentionConfig"]
