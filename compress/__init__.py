"""compress: make pretrained Hugging Face language models smaller and faster, with numbers.

Importing the package registers the "compress" checkpoint format with transformers, so
``AutoModelForCausalLM.from_pretrained(run_dir / "model")`` rebuilds compressed modules.
It does not import triton or lm-eval, and does not touch CUDA.
"""
__version__ = "0.1.0"

from . import checkpoint as _checkpoint  # noqa: E402,F401  (registration side effect)
