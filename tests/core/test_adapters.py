"""LoRA adapters (peft) on every kind of compressed module: they train, merge back into the factors exactly,
and the merged model keeps its ranks, shapes and checkpoint format; finetune's `adapter: lora` does it all."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.modules import MODULE_TYPES
from tests.tiny import make_tiny_llama

STAGES = [
    {"method": "lowrank_attention", "per_projection": {"q": 0.5, "k": 0.5, "v": 0.5}, "kv_groups": 2},
    {"method": "lowrank", "targets": [r"re:.*self_attn\.o_proj$"], "reduction": 0.4},
    {"method": "dsformer", "targets": [r"re:.*layers\.0\.mlp\.gate_proj$"], "reduction": 0.3, "iters": 2},
    {"method": "lost", "targets": [r"re:.*layers\.0\.mlp\.(up|down)_proj$"], "reduction": 0.3},
    {
        "method": "factorllm",
        "targets": [r"re:.*layers\.1\.mlp$"],
        "experts": 4,
        "top_k": 2,
        "partition": "contiguous",
        "router_fit": "none",
    },
]


def _windows(n=8, length=16, seed=0):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _shapes(model):
    return {
        name: (type(m).__name__, {n: tuple(p.shape) for n, p in m.named_parameters()})
        for name, m in model.named_modules()
        if isinstance(m, tuple(MODULE_TYPES.values()))
    }


def test_adapters_train_and_merge_into_every_kind_of_factor(tmp_path):
    model = compress.compress(make_tiny_llama(), STAGES, calibration=_windows(), progress=False)
    shapes = _shapes(model)
    assert {kind for kind, _ in shapes.values()} == {
        "LowRankLinear",
        "GroupedLowRankLinear",
        "DenseSparseLinear",
        "LowRankSparseLinear",
        "MoEFeedForward",
    }
    config = compress.lora_config(model, rank=2, alpha=4)
    peft_model = get_peft_model(model, config)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = _windows(4, 16, seed=1)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward(), optimizer.step(), optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    ids = _windows(2, 9, seed=5)
    with torch.no_grad():
        adapted = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
    assert _shapes(merged) == shapes  # ranks, expert sizes, sparse supports: all unchanged
    compress.save(merged, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged(ids).logits)


def test_finetune_with_a_lora_adapter_heals_and_leaves_plain_factors(tmp_path):
    stages = [
        {"method": "lowrank", "reduction": 0.5},
        {"method": "finetune", "steps": 20, "lr": 3e-3, "batch_size": 4, "adapter": {"rank": 4, "alpha": 8}},
    ]
    model = compress.compress(make_tiny_llama(), stages, calibration=_windows(16, 32), progress=False)
    summary = model.compression.stages[1].summary
    lowrank = [m for m in model.modules() if type(m).__name__ == "LowRankLinear"]
    adapter_params = sum(4 * (p.shape[0] + p.shape[1]) for m in lowrank for p in (m.A, m.B))
    assert summary["trainable_params"] == adapter_params and summary["adapter"] == "lora rank 4 alpha 8"
    assert summary["calibration_loss_after"] < summary["calibration_loss_before"]
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()]  # merged and unloaded
    assert not any(p.requires_grad for p in model.parameters())


def test_a_tied_factorised_head_refuses_embedding_adapters():
    model = compress.compress(make_tiny_llama(), [{"method": "ofa_embedding", "dim": 16}], progress=False)
    with pytest.raises(CompressError, match="tied factorised LM head"):
        compress.lora_config(model, targets=["FactorizedEmbedding"])
