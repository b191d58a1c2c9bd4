"""Recipes in Python: every stage config and recipe part as an importable, validated pydantic class.

    from compress.recipes import Finetune, LowRank, Recipe, Training
    stages = [LowRank(reduction=0.4, backend="whiten", allocation="sensitivity"), Finetune(steps=96)]
    recipe = Recipe(name="mine", stages=stages)

The same validation as a YAML recipe (unknown fields rejected, ranges checked); ``compress.compress``
takes a ``Recipe``, one stage config or a list of them.
"""

from __future__ import annotations

from .methods.dsformer.config import DSFormerConfig as DSFormer
from .methods.factorllm.config import FactorLLMConfig as FactorLLM
from .methods.finetune.config import FinetuneConfig as Finetune
from .methods.lost.config import LostConfig as Lost
from .methods.lowrank.config import LowRankConfig as LowRank
from .methods.lowrank_attention.config import LowRankAttentionConfig as LowRankAttention
from .methods.ofa.config import ExtendVocabConfig as ExtendVocab
from .methods.ofa.config import OfaEmbeddingConfig as OfaEmbedding
from .methods.welore.config import WeLoreConfig as WeLore
from .recipe import CalibrationConfig as Calibration
from .recipe import EvalConfig as Eval
from .recipe import OutputConfig as Output
from .recipe import PushConfig as Push
from .recipe import recipe_model
from .training import Training

Recipe = recipe_model()

__all__ = [
    "Calibration",
    "DSFormer",
    "Eval",
    "ExtendVocab",
    "FactorLLM",
    "Finetune",
    "Lost",
    "LowRank",
    "LowRankAttention",
    "OfaEmbedding",
    "Output",
    "Push",
    "Recipe",
    "Training",
    "WeLore",
]
