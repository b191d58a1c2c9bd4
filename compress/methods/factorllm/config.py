from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import StageConfig


class FactorLLMConfig(StageConfig):
    """FactorLLM (arXiv 2408.11855): split each gated FFN into experts that reuse its weights, add a
    router trained against Prior-Approximate (PA) pseudo-labels, run the top-k experts per token.

    Stage order: split (partition + layer-by-layer router fit on calibration activations, each
    layer seeing the already-split layers before it), then optional end-to-end training
    (``train``) with accelerate, attention and norms frozen.
    """

    method: Literal["factorllm"] = "factorllm"
    targets: list[str] = Field(default_factory=lambda: [r"re:.*\.mlp$"], min_length=1,
                               description="gated FFN modules (gate_proj/up_proj/down_proj + act_fn)")
    experts: int = Field(4, ge=2, le=256, description="routed experts per FFN")
    top_k: int = Field(2, ge=1, description="routed experts run per token")
    shared_experts: int = Field(0, ge=0, le=64, description="always-on experts (same size as routed ones)")
    partition: Literal["contiguous", "random", "cluster"] = "cluster"
    cluster_on: Literal["activations", "weights"] = Field(
        "activations", description="cluster: neurons' |activation| patterns on calibration tokens (co-activation, "
                                   "MoEfication) or their normalised gate/up weight rows (data-free)")
    cluster_tokens: int = Field(4096, ge=16, description="calibration tokens sampled per layer for clustering")
    cluster_iters: int = Field(25, ge=1, le=1000, description="balanced k-means iterations")
    combine: Literal["sum", "scale", "weights"] = Field(
        "weights", description="sum: plain partial sum of the dense FFN; scale: times experts/top_k (FactorLLM); "
                               "weights: top_k * softmax over the chosen router logits (the default: measured best "
                               "after training, bench/results/factorllm.md)")
    labels: Literal["pa", "best_subset"] = Field(
        "pa", description="pseudo-labels: pa = the top_k experts with the lowest MSE(E_i(x), T top_k/experts) "
                          "(FactorLLM); best_subset = the top_k-subset whose combined output is closest to T")
    router_fit: Literal["none", "least_squares"] = Field(
        "least_squares", description="layer-by-layer router fit on calibration activations: none = random "
                                     "init (untrained); least_squares = ridge regression onto the labels, then "
                                     "router_fit_epochs of PA-loss refinement")
    router_fit_epochs: int = Field(10, ge=0, le=10_000)
    router_fit_lr: float = Field(1e-2, gt=0, le=10.0)
    router_fit_windows: int = Field(32, ge=1, description="calibration windows used for clustering and the router fit")
    ridge: float = Field(1e-3, ge=0, description="least squares: ridge relative to the mean input variance")
    calibration_batch_size: int = Field(4, ge=1, le=1024)
    # end-to-end training (accelerate)
    train: Literal["none", "router", "router+experts"] = "none"
    steps: int = Field(0, ge=0, le=1_000_000, description="training steps (0 = none)")
    lr: float = Field(1e-4, gt=0, le=1.0)
    router_lr: float | None = Field(None, gt=0, le=10.0, description="router learning rate (default: lr * 10)")
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(2, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    lm_loss_weight: float = Field(1.0, ge=0, description="next-token cross-entropy of the whole model")
    distill_loss_weight: float = Field(1.0, ge=0, description="relative MSE of each MoE FFN output vs the dense FFN")
    route_loss_weight: float = Field(1.0, ge=0, description="KL(softmax(router) || softmax(pseudo-labels))")
    balance_loss_weight: float = Field(0.01, ge=0, description="Switch-style load balance (1 at uniform load)")
    eval_windows: int = Field(4, ge=1, description="calibration windows scored before and after training")
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed experts ({self.experts})")
        if self.steps and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        if self.train != "none" and not self.steps:
            raise ValueError(f"train: {self.train} needs steps > 0")
        if self.train == "none" and self.steps:
            raise ValueError("steps > 0 needs train: router or router+experts")
        return self
