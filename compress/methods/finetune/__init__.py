from .apply import Finetune
from .config import FinetuneConfig

__all__ = ["Finetune", "FinetuneConfig"]
