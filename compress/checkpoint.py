"""Compressed checkpoints that load back with plain ``from_pretrained``.

Choice: we register a custom quantization config + quantizer with transformers
(``register_quantization_config`` / ``register_quantizer``) under ``quant_method:
"compress"``. config.json carries, per replaced module, a small spec (type and shapes);
on ``from_pretrained`` the quantizer swaps in empty ``LowRankLinear`` & co. *before* the
safetensors weights load, so loading is transformers' own fast, pickle-free path.
Why not ``trust_remote_code``: it copies modeling code into every checkpoint (forks that
drift) and asks users to run code from a folder; here they need ``import compress``.
Without that import transformers would ignore the unknown method, so ``compress``'s own
loaders always import this module first.
"""

from __future__ import annotations

from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .modules import MODULE_TYPES
from .targets import replace_module

QUANT_METHOD = "compress"
FORMAT_VERSION = 1


@register_quantization_config(QUANT_METHOD)
class CompressConfig(QuantizationConfigMixin):
    """The compression section of config.json: which modules were replaced, by what, and how."""

    def __init__(
        self, modules: dict | None = None, recipe: dict | None = None, format_version: int = FORMAT_VERSION, **kwargs
    ):
        self.quant_method = QUANT_METHOD
        self.modules = modules or {}
        self.recipe = recipe
        self.format_version = format_version
        for key, value in kwargs.items():  # keep unknown fields written by newer versions
            setattr(self, key, value)


@register_quantizer(QUANT_METHOD)
class CompressQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: CompressConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if quantization_config.format_version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {quantization_config.format_version} is newer than this "
                f"compress supports ({FORMAT_VERSION}); upgrade compress"
            )

    def _process_model_before_weight_loading(self, model, **kwargs):
        install_replacements(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def install_replacements(model: nn.Module, specs: dict[str, dict], dtype=None) -> None:
    """Swap in the empty replacement modules ``specs`` describes (before the weights load); ``dtype``: of the
    module each replaces, unless given."""
    for name, spec in specs.items():
        if spec.get("type") not in MODULE_TYPES:
            raise ValueError(f"config.json: module {name} has unknown type {spec.get('type')!r}")
        old = model.get_submodule(name)
        own = next(old.parameters()).dtype if any(True for _ in old.parameters()) else None
        replace_module(model, name, MODULE_TYPES[spec["type"]].from_spec(spec, dtype=dtype or own))
    for name in specs:  # modules that share another's weights (tied heads)
        module = model.get_submodule(name)
        if hasattr(module, "bind"):
            module.bind(model)


def compressed_modules(model: nn.Module) -> dict[str, dict]:
    """Specs of every replacement module in ``model`` (what config.json must record)."""
    types = tuple(MODULE_TYPES.values())
    return {name: module.spec() for name, module in model.named_modules() if isinstance(module, types)}


def mark_compressed(model: nn.Module, recipe: dict | None = None) -> CompressConfig:
    """Attach the compression section to ``model.config`` so save_pretrained writes it."""
    config = CompressConfig(modules=compressed_modules(model), recipe=recipe)
    model.config.quantization_config = config
    return config
