"""Replacement nn.Modules that compression methods swap in.

MODULE_TYPES maps the ``type`` written in a checkpoint's compression config to the
class that rebuilds the empty module before its weights load.
"""

from .dense_sparse import DenseSparseLinear
from .factorized_embedding import FactorizedEmbedding, TiedFactorizedLMHead
from .grouped_lowrank import GroupedLowRankLinear
from .lowrank import LowRankLinear
from .lowrank_sparse import LowRankSparseLinear
from .moe_ffn import MoEFeedForward

MODULE_TYPES = {
    cls.spec_type: cls
    for cls in (
        LowRankLinear,
        GroupedLowRankLinear,
        DenseSparseLinear,
        LowRankSparseLinear,
        FactorizedEmbedding,
        TiedFactorizedLMHead,
        MoEFeedForward,
    )
}

__all__ = [
    "LowRankLinear",
    "GroupedLowRankLinear",
    "DenseSparseLinear",
    "LowRankSparseLinear",
    "FactorizedEmbedding",
    "TiedFactorizedLMHead",
    "MoEFeedForward",
    "MODULE_TYPES",
]
