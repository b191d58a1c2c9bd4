"""LoRA adapters (peft) on compressed modules.

Every replacement module names the parameters an adapter may train (``adapter_parameters``: a low-rank
module's two factors, a MoE FFN's expert weights ...). :func:`lora_config` turns a target selection into a
``peft.LoraConfig`` over those parameters (peft's ``target_parameters``: a low-rank update of each
parameter, applied inside the module's own forward), so

    from peft import get_peft_model
    peft_model = get_peft_model(compressed, compress.lora_config(compressed, rank=8))
    ... train ...
    merged = peft_model.merge_and_unload()

works on any compressed model. A merge adds each adapter to its factor (SVD-LLM's LoRA healing): a low-rank
module keeps its rank and its parameter count exactly, and the checkpoint format is unchanged.
"""

from __future__ import annotations

from torch import nn

from .errors import CompressError

DEFAULT_TARGETS = (
    "LowRankLinear",
    "GroupedLowRankLinear",
    "DenseSparseLinear",
    "LowRankSparseLinear",
    "MoEFeedForward",
)


def adapter_parameter_names(model: nn.Module, targets=DEFAULT_TARGETS, ignore=()) -> list[str]:
    """The full names of the parameters adapters may train in the targeted compressed modules."""
    from .modules import FactorizedEmbedding, TiedFactorizedLMHead
    from .targets import select_modules

    names = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in select_modules(model, targets, ignore, "adapter targets").items():
        parameters = getattr(type(module), "adapter_parameters", None)
        if parameters is None:
            raise CompressError(
                f"adapter targets: {name} is a {type(module).__name__}, not a compressed module with adapter parameters"
            )
        if isinstance(module, FactorizedEmbedding) and isinstance(head, TiedFactorizedLMHead):
            raise CompressError(
                f"adapter targets: {name} feeds a tied factorised LM head, which reads the factors "
                "outside the embedding's forward and would not see the adapter; train the factors "
                "with finetune instead"
            )
        names += [f"{name}.{parameter}" for parameter in parameters]
    return names


def lora_config(
    model: nn.Module, *, rank: int = 8, alpha: float = 16, targets=DEFAULT_TARGETS, ignore=(), **lora_kwargs
):
    """A ``peft.LoraConfig`` with rank-``rank`` adapters on the factors of the targeted compressed modules."""
    from .utils import require

    require("peft", "peft", "LoRA adapters")
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[],
        target_parameters=adapter_parameter_names(model, targets, ignore),
        **lora_kwargs,
    )
