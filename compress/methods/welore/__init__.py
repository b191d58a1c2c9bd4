from .apply import WeLore
from .config import WeLoreConfig

__all__ = ["WeLore", "WeLoreConfig"]
