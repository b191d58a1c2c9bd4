from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...training import Training
from ..base import StageConfig


class FactorLLMConfig(StageConfig):
    """FactorLLM (arXiv 2408.11855): split each gated FFN into experts that reuse its weights, add a
    router trained against Prior-Approximate (PA) pseudo-labels, run the top-k experts per token.

    Stage order: split (partition + layer-by-layer router fit on calibration activations, each
    layer seeing the already-split layers before it), then optional end-to-end training (a ``train:``
    block; ``trainable`` says what trains) with accelerate, attention and norms frozen.
    """

    method: Literal["factorllm"] = "factorllm"
    targets: list[str] = Field(
        default_factory=lambda: [r"re:.*\.mlp$"],
        min_length=1,
        description="gated FFN modules (gate_proj/up_proj/down_proj + act_fn)",
    )
    experts: int = Field(4, ge=2, le=256, description="routed experts per FFN")
    top_k: int = Field(2, ge=1, description="routed experts run per token")
    shared_experts: int = Field(0, ge=0, le=64, description="always-on experts (same size as routed ones)")
    partition: Literal["contiguous", "random", "cluster"] = "cluster"
    cluster_on: Literal["activations", "weights"] = Field(
        "activations",
        description="cluster: neurons' |activation| patterns on calibration tokens (co-activation, "
        "MoEfication) or their normalised gate/up weight rows (data-free)",
    )
    cluster_tokens: int = Field(4096, ge=16, description="calibration tokens sampled per layer for clustering")
    cluster_iters: int = Field(25, ge=1, le=1000, description="balanced k-means iterations")
    combine: Literal["sum", "scale", "weights"] = Field(
        "weights",
        description="sum: plain partial sum of the dense FFN; scale: times experts/top_k (FactorLLM); "
        "weights: top_k * softmax over the chosen router logits (the default: measured best "
        "after training, bench/results/factorllm.md)",
    )
    labels: Literal["pa", "best_subset"] = Field(
        "pa",
        description="pseudo-labels: pa = the top_k experts with the lowest MSE(E_i(x), T top_k/experts) "
        "(FactorLLM); best_subset = the top_k-subset whose combined output is closest to T",
    )
    router_fit: Literal["none", "least_squares"] = Field(
        "least_squares",
        description="layer-by-layer router fit on calibration activations: none = random "
        "init (untrained); least_squares = ridge regression onto the labels, then "
        "router_fit_epochs of PA-loss refinement",
    )
    router_fit_epochs: int = Field(10, ge=0, le=10_000)
    router_fit_lr: float = Field(1e-2, gt=0, le=10.0)
    router_fit_windows: int = Field(32, ge=1, description="calibration windows used for clustering and the router fit")
    ridge: float = Field(1e-3, ge=0, description="least squares: ridge relative to the mean input variance")
    calibration_batch_size: int = Field(4, ge=1, le=1024)
    # end-to-end training (accelerate): the shared hyper-parameters, plus what trains and the PA loss's weights
    train: Training | None = Field(None, description="end-to-end training after the split (default: none)")
    trainable: Literal["router", "router+experts"] = Field(
        "router+experts", description="router: only the routers train; router+experts: the experts' weights too"
    )
    router_lr: float | None = Field(None, gt=0, le=10.0, description="router learning rate (default: train.lr * 10)")
    lm_loss_weight: float = Field(1.0, ge=0, description="next-token cross-entropy of the whole model")
    distill_loss_weight: float = Field(1.0, ge=0, description="relative MSE of each MoE FFN output vs the dense FFN")
    route_loss_weight: float = Field(1.0, ge=0, description="KL(softmax(router) || softmax(pseudo-labels))")
    balance_loss_weight: float = Field(0.01, ge=0, description="Switch-style load balance (1 at uniform load)")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _old_train_field(cls, data):
        if isinstance(data, dict) and isinstance(data.get("train"), str):
            raise ValueError(
                "'train' is a block of training settings now, e.g. train: {steps: 120, lr: 1.0e-4}; "
                f"say what trains with trainable: {data['train']}"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed experts ({self.experts})")
        if self.train is not None and (self.train.scope != "global" or self.train.loss != "next_token"):
            raise ValueError(
                "factorllm trains the whole model with its PA loss: train.scope must be global and "
                "train.loss next_token"
            )
        return self
