from .apply import FactorLLM
from .config import FactorLLMConfig
from .flops import dense_ffn_flops, ffn_flops_per_token, model_ffn_flops, moe_ffn_flops
from .train import measure_agreement, pa_wrapped, train_moe

__all__ = [
    "FactorLLM",
    "FactorLLMConfig",
    "dense_ffn_flops",
    "ffn_flops_per_token",
    "model_ffn_flops",
    "moe_ffn_flops",
    "measure_agreement",
    "pa_wrapped",
    "train_moe",
]
