"""Replacement nn.Modules that compression methods swap in.

MODULE_TYPES maps the ``type`` written in a checkpoint's compression config to the
class that rebuilds the empty module before its weights load.
"""
from .lowrank import LowRankLinear

MODULE_TYPES = {LowRankLinear.spec_type: LowRankLinear}

__all__ = ["LowRankLinear", "MODULE_TYPES"]
