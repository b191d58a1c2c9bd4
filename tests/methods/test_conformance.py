"""Every method through the same checks, via the Python API: it applies, the model still runs, the parameter
count moves as promised, save -> from_pretrained gives identical logits, and a bad config is one clear error.

A method added to the registry must get a case here (the last test enforces it).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.registry import all_methods
from tests.tiny import make_tiny_llama

MLP = r"re:.*\.mlp\.(gate|up|down)_proj$"
# (case id, stages, parameters: "fewer" | "more" | "same")
CASES = [
    ("welore", [{"method": "welore", "reduction": 0.3}], "fewer"),
    ("lowrank-svd", [{"method": "lowrank", "reduction": 0.3}], "fewer"),
    (
        "lowrank-dense-target-layer-training",
        [
            {
                "method": "lowrank",
                "reduction": 0.3,
                "backend": "whiten_dense_target",
                "sublayer": True,
                "shrinkage": 0.1,
                "train": {"steps": 3, "scope": "layer", "lr": 1e-3},
            }
        ],
        "fewer",
    ),
    (
        "lowrank_attention-kv-groups",
        [{"method": "lowrank_attention", "reduction": 0.4, "backend": "whiten", "kv_groups": 2}],
        "fewer",
    ),
    (
        "dsformer-trained",
        [
            {
                "method": "dsformer",
                "targets": [MLP],
                "reduction": 0.3,
                "iters": 3,
                "scaling": "activation",
                "train": {"steps": 2},
            }
        ],
        "fewer",
    ),
    ("lost-whiten", [{"method": "lost", "targets": [MLP], "reduction": 0.3, "scaling": "whiten"}], "fewer"),
    (
        "factorllm",
        [
            {
                "method": "factorllm",
                "experts": 4,
                "top_k": 2,
                "router_fit_windows": 4,
                "cluster_tokens": 64,
                "train": {"steps": 2},
            }
        ],
        "more",
    ),
    ("ofa_embedding", [{"method": "ofa_embedding", "dim": 16, "weighting": "frequency"}], "fewer"),
    ("welore+finetune", [{"method": "welore", "reduction": 0.3}, {"method": "finetune", "steps": 2}], "fewer"),
]
# extend_vocab needs a second tokenizer and word vectors: tests/ofa/test_ofa_extend_vocab.py runs it end to end
COVERED_ELSEWHERE = {"extend_vocab"}


def _windows(n=8, length=24, seed=0):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case, stages, parameters", CASES, ids=[c[0] for c in CASES])
def test_method_conforms(case, stages, parameters, tmp_path):
    model = make_tiny_llama()
    before = _params(model)
    model = compress.compress(model, stages, calibration=_windows(), progress=False)

    assert [r.method for r in model.compression.stages] == [s["method"] for s in stages]
    after = _params(model)
    assert {"fewer": after < before, "more": after > before, "same": after == before}[parameters], (before, after)
    ids = _windows(2, 17, seed=5)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()

    compress.save(model, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert _params(reloaded) == after
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)

    bad = [{**stages[0], "no_such_field": 1}]
    with pytest.raises(CompressError, match=r"stages\[0\]\.no_such_field: unknown field"):
        compress.compress(make_tiny_llama(), bad, calibration=_windows(), progress=False)


@pytest.mark.parametrize("case, stages, parameters", CASES, ids=[c[0] for c in CASES])
def test_method_runs_with_the_streams_held_in_bf16(case, stages, parameters):
    recipe = {"name": "bf16-streams", "stages": stages, "calibration": {"activation_dtype": "bfloat16"}}
    fp32 = compress.compress(make_tiny_llama(), stages, calibration=_windows(), progress=False)
    model = compress.compress(make_tiny_llama(), recipe, calibration=_windows(), progress=False)
    assert _params(model) == _params(fp32)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # only the streams were bf16
    with torch.no_grad():
        assert torch.isfinite(model(_windows(2, 17, seed=5)).logits).all()


def test_no_method_runs_its_own_loop():
    """Every method is a Method driven by the pipeline: no `run` of its own, no walk over the model."""
    import inspect

    from compress.methods.base import Method

    for name, method in all_methods().items():
        assert isinstance(method, Method) and method.level in ("layers", "model", "training"), name
        assert not hasattr(method, "run"), f"{name} defines its own run loop"
        source = inspect.getsource(type(method))
        for walk in ("select_modules(", "named_modules(", "calibrate_sequentially(", "train_loop("):
            assert walk not in source, f"{name} calls {walk} itself"


def test_every_registered_method_has_a_case():
    covered = {stage["method"] for _, stages, _ in CASES for stage in stages} | COVERED_ELSEWHERE
    assert set(all_methods()) <= covered, set(all_methods()) - covered


def test_layer_local_training_brings_each_layer_closer_to_the_dense_one():
    stage = {
        "method": "lowrank",
        "reduction": 0.5,
        "backend": "whiten",
        "sequential": True,
        "train": {"steps": 30, "scope": "layer", "lr": 3e-3, "batch_size": 4},
    }
    model = compress.compress(make_tiny_llama(), [stage], calibration=_windows(16, 32), progress=False)
    training = model.compression.stages[0].summary["training"]
    assert training["scope"] == "layer" and training["layers"] == 2 and training["steps_per_layer"] == 30
    assert training["mean_rel_error_after"] < 0.9 * training["mean_rel_error_before"], training
    assert not any(p.requires_grad for p in model.model.layers.parameters())
