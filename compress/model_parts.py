"""The model-level parts a ``"model"`` method works on: read them out of a model, install the new ones.

A causal LM keeps its input embedding and LM head where ``get_input_embeddings`` /
``get_output_embeddings`` say; they may be tied (one weight). A method receives exactly these parts and
the tokenizer (``ModelParts``) and returns new ones (``PartsUpdate``); only this module edits the model.
"""

from __future__ import annotations

from torch import nn

from .errors import CompressError
from .methods.base import ModelParts, PartsUpdate
from .modules import TiedFactorizedLMHead
from .targets import replace_module, select_modules


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise CompressError(f"{type(module).__name__} is not part of the model")


def is_tied(model: nn.Module, embedding: nn.Module) -> bool:
    head = model.get_output_embeddings()
    if isinstance(head, TiedFactorizedLMHead):
        return True
    weight = getattr(head, "weight", None) if head is not None else None
    return isinstance(weight, nn.Parameter) and weight is getattr(embedding, "weight", None)


def read_parts(model: nn.Module, config, tokenizer, where: str) -> ModelParts:
    """The embedding (which ``config.targets`` must select, and nothing else), the head, the tokenizer."""
    embedding = model.get_input_embeddings()
    name = module_name(model, embedding)
    selected = select_modules(model, config.targets, config.ignore, f"{where}.targets")
    if list(selected) != [name]:
        raise CompressError(
            f"{where}.targets must select only the input embedding {name!r}; they select {list(selected)[:3]}"
        )
    head = model.get_output_embeddings()
    return ModelParts(
        embedding_name=name,
        embedding=embedding,
        head_name=None if head is None else module_name(model, head),
        head=head,
        tied=is_tied(model, embedding),
        tokenizer=tokenizer,
        config=model.config,
        generation_config=getattr(model, "generation_config", None),
    )


def forget_tying(model: nn.Module) -> None:
    """After the tie is re-implemented by our modules (or broken on purpose), transformers must not re-tie
    ``lm_head.weight`` to a parameter that no longer exists, neither now nor when the checkpoint reloads."""
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


def install(model: nn.Module, parts: ModelParts, update: PartsUpdate) -> None:
    """Put the new parts into ``model`` (modules, tie, config fields)."""
    if update.embedding is not None:
        replace_module(model, parts.embedding_name, update.embedding)
    if update.head is not None:
        if parts.head_name is None:
            raise CompressError("the model has no LM head to replace")
        replace_module(model, parts.head_name, update.head)
    head = model.get_output_embeddings()
    if isinstance(head, TiedFactorizedLMHead):  # follows whatever embedding is now in place
        head.bind(model)
    if update.untie:
        forget_tying(model)
    for key, value in update.config.items():
        setattr(model.config, key, value)
    generation = getattr(model, "generation_config", None)
    for key, value in update.generation_config.items():
        if generation is not None:
            setattr(generation, key, value)
