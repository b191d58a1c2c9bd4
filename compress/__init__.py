"""compress: make pretrained Hugging Face language models smaller and faster, with numbers.

    import compress
    model = compress.compress("smollm2-135m", "recipes/lowrank-20.yaml")   # or an nn.Module, a Recipe, stages
    compress.save(model, "out/")                                            # the checkpoint format
    scores = compress.evaluate(model, tasks=["wikipedia_ppl"])
    compress.recipes.LowRank(reduction=0.2, backend="whiten_dense_target")  # stage configs as classes

Importing the package registers the "compress" checkpoint format with transformers, so
``AutoModelForCausalLM.from_pretrained(run_dir / "model")`` rebuilds compressed modules.
It does not import triton or lm-eval, and does not touch CUDA.
"""

__version__ = "0.1.0"

from . import checkpoint as _checkpoint  # noqa: E402,F401  (registration side effect)
from .adapters import lora_config  # noqa: E402
from .api import Compression, compress, evaluate, save  # noqa: E402
from .elastic import resize, set_budget  # noqa: E402
from .errors import CompressError  # noqa: E402

__all__ = [
    "Compression",
    "CompressError",
    "compress",
    "evaluate",
    "lora_config",
    "recipes",
    "resize",
    "save",
    "set_budget",
]


def __getattr__(name: str):
    if name == "recipes":  # stage config classes: imported on first use (they load every method)
        import importlib

        return importlib.import_module(".recipes", __name__)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
