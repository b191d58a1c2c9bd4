"""Where a causal LM keeps its input embedding and LM head, and whether the two are tied."""
from __future__ import annotations

from torch import nn

from ...errors import CompressError
from ...targets import select_modules


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise CompressError(f"{type(module).__name__} is not part of the model")


def input_embedding(model: nn.Module, config, where: str) -> tuple[str, nn.Module]:
    """The model's input embedding, which ``config.targets`` must select (and nothing else)."""
    embedding = model.get_input_embeddings()
    name = module_name(model, embedding)
    selected = select_modules(model, config.targets, config.ignore, f"{where}.targets")
    if list(selected) != [name]:
        raise CompressError(f"{where}.targets must select only the input embedding {name!r}; "
                            f"they select {list(selected)[:3]}")
    return name, embedding


def embed_scale(embedding: nn.Module) -> float:
    """The constant some models multiply looked-up vectors by (Gemma: sqrt(D)); 1 for a plain nn.Embedding."""
    if type(embedding).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is None and getattr(embedding, "embed_scale", None) is not None:
        scale = float(embedding.embed_scale)
    if scale is None:
        raise CompressError(f"unsupported embedding class {type(embedding).__name__}: its forward is not a "
                            "plain lookup (optionally scaled)")
    return float(scale)


def is_tied(model: nn.Module, embedding: nn.Module) -> bool:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None) if head is not None else None
    return isinstance(weight, nn.Parameter) and weight is getattr(embedding, "weight", None)


def forget_tying(model: nn.Module) -> None:
    """After the tie is re-implemented by our modules (or broken on purpose), transformers must not re-tie
    ``lm_head.weight`` to a parameter that no longer exists, neither now nor when the checkpoint reloads."""
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
