import contextlib
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  registers the checkpoint format
from compress.activations import calibrate_sequentially
from compress.checkpoint import mark_compressed
from compress.errors import CompressError
from compress.lowrank_math import truncated_svd_factors
from compress.methods.base import StageContext
from compress.models import load_folder, save_folder
from compress.modules import LowRankLinear
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe
from compress.targets import replace_module, select_modules
from tests.tiny import make_tiny_llama

TARGETS = [r"re:.*\.(q|k|v|o|gate|up|down)_proj$"]


def _windows(n=6, seq=24, vocab=256, seed=0):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _direct_input_cov(model, name, windows):
    xs = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    return X


def test_sequential_stats_equal_direct_computation():
    model = make_tiny_llama()
    dense = copy.deepcopy(model)
    windows = _windows()
    modules = select_modules(model, TARGETS)
    seen = {}

    def on_layer(index, layer_modules, stats):
        for name, module in layer_modules.items():
            seen[name] = stats[name]
            A, B = truncated_svd_factors(module.weight, 4)
            replace_module(model, name, LowRankLinear.from_factors(A, B, module.bias))

    calibrate_sequentially(
        model, modules, windows, on_layer, sequential=True, cross=True, dense_cov=True, batch_size=4
    )  # 6 windows: batches of 4 and 2
    # layer 1's attention inputs depend only on layer 0, which is compressed in the final model
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        Xc = _direct_input_cov(model, name, windows)
        Xd = _direct_input_cov(dense, name, windows)
        got = seen[name]
        assert got["tokens"] == Xc.shape[0]
        assert torch.allclose(got["cov"], Xc.T @ Xc / Xc.shape[0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(got["abs_mean"], Xc.abs().mean(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(got["cross"], Xd.T @ Xc / Xc.shape[0], rtol=1e-5, atol=1e-6)
        assert torch.allclose(got["dense_cov"], Xd.T @ Xd / Xd.shape[0], rtol=1e-5, atol=1e-6)
    # layer 1 really saw the compressed layer 0 (differs from the dense inputs)
    q1 = seen["model.layers.1.self_attn.q_proj"]
    assert not torch.allclose(q1["cov"], q1["dense_cov"], rtol=1e-3)
    # q/k/v share their input: one accumulator
    assert seen["model.layers.0.self_attn.q_proj"] is seen["model.layers.0.self_attn.v_proj"]


def _compress_rank(rank, seen, calls, model):
    def on_layer(index, layer_modules, stats):
        calls.append(sorted(name.rsplit(".", 1)[-1] for name in layer_modules))
        for name, module in layer_modules.items():
            seen[name] = stats[name]
            A, B = truncated_svd_factors(module.weight, rank)
            replace_module(model, name, LowRankLinear.from_factors(A, B, module.bias))

    return on_layer


def test_sublayer_stats_are_the_inputs_of_the_final_model():
    """Inside a layer, o_proj is calibrated after q/k/v were compressed and down_proj after gate/up:
    every module's statistics are exactly its inputs in the finished model (and the dense ones in the
    untouched model)."""
    model = make_tiny_llama()
    dense = copy.deepcopy(model)
    windows = _windows()
    seen, calls = {}, []
    calibrate_sequentially(
        model,
        select_modules(model, TARGETS),
        windows,
        _compress_rank(4, seen, calls, model),
        sequential=True,
        sublayer=True,
        cross=True,
        dense_cov=True,
        batch_size=4,
    )
    assert calls == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2
    for name in seen:
        Xc = _direct_input_cov(model, name, windows)
        Xd = _direct_input_cov(dense, name, windows)
        n = Xc.shape[0]
        assert seen[name]["tokens"] == n
        assert torch.allclose(seen[name]["cov"], Xc.T @ Xc / n, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(seen[name]["cross"], Xd.T @ Xc / n, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(seen[name]["dense_cov"], Xd.T @ Xd / n, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("intermediate", [160, 48], ids=["mlp-wider-than-hidden", "mlp-narrower"])
def test_sublayer_calibration_never_reruns_a_finished_block(monkeypatch, intermediate):
    """Once o_proj is replaced a layer's attention gives the same output on every later pass, and that output
    is o_proj's on the inputs o_proj's own pass saw: the attention never runs whole after the probe call. The
    MLP ends in down_proj the same way: down_proj's inputs are kept too (wider than the hidden states or not),
    and the final pass does not run it either. The statistics and the compressed model are the same
    bits as with every pass recomputed."""
    from compress import activations

    def run():
        model = make_tiny_llama(intermediate=intermediate)
        seen, calls, attention, mlp = {}, [], [], []
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(lambda *args: attention.append(1))
            layer.mlp.register_forward_hook(lambda *args: mlp.append(1))
        calibrate_sequentially(
            model,
            select_modules(model, TARGETS),
            _windows(),
            _compress_rank(4, seen, calls, model),
            sequential=True,
            sublayer=True,
            cross=True,
            batch_size=4,
        )  # 2 layers, 2 batches, 2 streams (current and dense)
        return model, seen, len(attention), len(mlp)

    model, seen, attention, mlp = run()
    monkeypatch.setattr(activations._FinishedBlocks, "running", lambda self, *a, **k: contextlib.nullcontext())
    recomputed, seen_recomputed, attention_recomputed, mlp_recomputed = run()
    # one probe_layer call (the two layers are of one kind, so they share its probe), then per layer and batch
    assert attention == 1
    # ... down_proj's dense pass (it makes the next dense stream)
    assert mlp == 1 + 2 * 2
    # recomputed: gate/up's and down's pass on both streams, the final pass; the MLP: down's dense pass, final
    assert attention_recomputed == 1 + 2 * 2 * (2 + 2 + 1)
    assert mlp_recomputed == 1 + 2 * 2 * 2
    for name in seen:
        assert all(torch.equal(seen[name][k], seen_recomputed[name][k]) for k in ("cov", "cross")), name
    ids = _windows(2, 16, seed=4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, recomputed(ids).logits)


def test_layer_granular_stats_miss_the_compressed_qkv():
    """Without sublayer, layer 0's o_proj is calibrated on inputs made by the dense q/k/v: not the
    inputs it gets once they are compressed (the mismatch sublayer calibration removes)."""
    model = make_tiny_llama()
    windows = _windows()
    seen, calls = {}, []
    calibrate_sequentially(
        model,
        select_modules(model, TARGETS),
        windows,
        _compress_rank(2, seen, calls, model),
        sequential=True,
        batch_size=4,
    )
    assert len(calls) == 2
    name = "model.layers.0.self_attn.o_proj"
    X = _direct_input_cov(model, name, windows)
    assert not torch.allclose(seen[name]["cov"], X.T @ X / X.shape[0], rtol=1e-3, atol=1e-6)


def test_sublayer_needs_sequential():
    with pytest.raises(CompressError, match="sublayer: true needs sequential: true"):
        _stage(reduction=0.3, backend="whiten", sublayer=True, sequential=False)


def test_non_sequential_stats_are_the_dense_ones():
    model = make_tiny_llama()
    dense = copy.deepcopy(model)
    windows = _windows()
    seen = {}

    def on_layer(index, layer_modules, stats):
        for name, module in layer_modules.items():
            seen[name] = stats[name]
            A, B = truncated_svd_factors(module.weight, 2)
            replace_module(model, name, LowRankLinear.from_factors(A, B, module.bias))

    calibrate_sequentially(model, select_modules(model, TARGETS), windows, on_layer, sequential=False)
    name = "model.layers.1.mlp.down_proj"
    X = _direct_input_cov(dense, name, windows)
    assert torch.allclose(seen[name]["cov"], X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)


def test_float32_products_accumulate_in_row_blocks_within_their_rounding_bound(monkeypatch):
    """A wide input's float32 product is accumulated a block of rows at a time (bounded temporaries): every row
    is added once, within the documented rounding bound of the exact product."""
    import compress.activations as activations

    a, b = torch.randn(64, 40, dtype=torch.float32), torch.randn(64, 40, dtype=torch.float32)
    monkeypatch.setattr(activations, "ACCUMULATE_BLOCK_ELEMENTS", 7 * 40)  # blocks of 7 rows, the last of 5
    total = torch.ones(40, 40, dtype=torch.float64)
    activations._accumulate(total, a, b)
    exact = 1 + a.double().T @ b.double()
    bound = 64 * 2.0**-24 * (a.double().abs().T @ b.double().abs())
    assert bool(((total - exact).abs() <= bound).all()) and not torch.equal(total, exact)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_sums_are_accumulated_on_the_upper_triangle_and_filled_symmetric(monkeypatch, dtype):
    """x^T x is summed a row panel at a time, on and above the diagonal only (panels of 7 rows over a width of
    40: the last is shorter); filling the lower triangle gives the whole symmetric sum over every batch."""
    import compress.activations as activations

    monkeypatch.setattr(activations, "GRAM_MIN_PANEL_ROWS", 7)
    batches = [torch.randn(64, 40, dtype=dtype) for _ in range(3)]
    total = torch.zeros(40, 40, dtype=torch.float64)
    for x in batches:
        activations._accumulate_gram(total, x)
    panel = torch.arange(40) // 7
    below = panel[:, None] > panel[None, :]  # left of each panel's diagonal block: never multiplied
    assert not total[below].any() and total[~below].all()
    activations._fill_lower(total)
    exact = sum(x.double().T @ x.double() for x in batches)
    assert torch.equal(total, total.T)
    assert torch.allclose(total, exact, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-3)


def test_float32_products_stay_within_their_rounding_bound():
    """statistics_dtype float32: each batch's x x^T is rounded in float32 (then summed in float64), within
    tokens x 2^-24 of sum |x_i||x_j| per batch (the bound the recipe field documents); float64 is exact here."""
    model = make_tiny_llama()
    windows = _windows()  # 2 batches of 4 windows
    seen = {torch.float64: {}, torch.float32: {}}
    for dtype, stats_of in seen.items():
        calibrate_sequentially(
            model,
            select_modules(model, TARGETS),
            windows,
            lambda i, local, stats, into=stats_of: into.update(stats),
            sequential=False,
            statistics_dtype=dtype,
        )
    name = "model.layers.1.mlp.down_proj"
    X = _direct_input_cov(model, name, windows)
    n = X.shape[0]
    exact, rounded = seen[torch.float64][name]["cov"], seen[torch.float32][name]["cov"]
    assert torch.allclose(exact, X.T @ X / n, rtol=1e-12, atol=1e-15)
    bound = (n // 2) * 2.0**-24 * (X.abs().T @ X.abs()) / n  # per batch of n / 2 tokens, summed
    assert not torch.equal(rounded, exact) and bool(((rounded - exact).abs() <= bound).all())
    assert torch.allclose(seen[torch.float32][name]["abs_mean"], X.abs().mean(0), rtol=1e-6, atol=0)
    with pytest.raises(CompressError, match="statistics_dtype"):
        stage = {"method": "lowrank", "reduction": 0.2}
        parse_recipe({"name": "t", "stages": [stage], "calibration": {"statistics_dtype": "float16"}})


def _stage(**kw):
    return parse_recipe({"name": "t", "stages": [{"method": "lowrank", "targets": TARGETS, **kw}]}).stages[0]


def _loss(model, windows):
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


@pytest.mark.parametrize(
    "backend,extra",
    [
        ("asvd", {}),
        ("whiten", {}),
        ("whiten_dense_target", {"shrinkage": 0.1}),
        ("whiten", {"refine": True}),
        ("svd", {"refine": True}),
        ("whiten", {"sequential": False}),
        ("whiten_dense_target", {"sublayer": True, "shrinkage": 0.1}),
    ],
)
def test_backends_through_the_pipeline(backend, extra):
    model = make_tiny_llama()
    windows = _windows()
    ctx = StageContext(None, lambda: windows, progress=False)
    result = apply_stage(model, _stage(reduction=0.3, backend=backend, **extra), ctx)
    assert result.summary["calibration"]["layers"] == 2
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 14
    assert 0.3 <= result.summary["achieved_reduction"] < 0.33
    for p in model.parameters():
        assert torch.isfinite(p).all()
    # the profile accounts for the layer time: passes, accumulations and factorisations, nothing twice
    calibration = result.summary["calibration"]
    phases = calibration["phase_seconds"]
    assert {"forward", "statistics", "factorise"} <= phases.keys() and min(phases.values()) >= 0
    assert sum(phases.values()) <= calibration["layer_seconds_total"] * 1.01 + 0.01
    assert sum(phases.values()) >= calibration["layer_seconds_total"] * 0.5


def test_activation_aware_beats_plain_svd_on_calibration_loss():
    windows = _windows(n=8, seq=32)
    losses = {}
    for backend in ("svd", "whiten"):
        model = make_tiny_llama()
        apply_stage(model, _stage(reduction=0.5, backend=backend), StageContext(None, lambda: windows, progress=False))
        losses[backend] = _loss(model, windows)
    dense = _loss(make_tiny_llama(), windows)
    assert abs(losses["whiten"] - dense) < abs(losses["svd"] - dense)


def test_sensitivity_allocation_meets_the_budget():
    model = make_tiny_llama()
    windows = _windows()
    result = apply_stage(
        model,
        _stage(reduction=0.4, backend="whiten", allocation="sensitivity", sensitivity_windows=4),
        StageContext(None, lambda: windows, progress=False),
    )
    assert 0.4 <= result.summary["achieved_reduction"] <= 0.405
    ranks = {r["rank"] for r in result.rows}
    assert len(ranks) > 1  # not uniform
    assert result.summary["est_loss_increase"] >= 0


def test_calibrated_model_save_load_round_trip(tmp_path, smol_tokenizer):
    model = make_tiny_llama(vocab_size=len(smol_tokenizer))
    windows = _windows(vocab=len(smol_tokenizer))
    recipe = parse_recipe(
        {
            "name": "t",
            "stages": [
                {
                    "method": "lowrank",
                    "targets": TARGETS,
                    "reduction": 0.3,
                    "backend": "whiten_dense_target",
                    "shrinkage": 0.1,
                }
            ],
        }
    )
    apply_stage(model, recipe.stages[0], StageContext(smol_tokenizer, lambda: windows, progress=False))
    mark_compressed(model, recipe.model_dump(mode="json"))
    save_folder(model, smol_tokenizer, tmp_path / "m")
    ids = windows[:2, :17]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours, _, _ = load_folder(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
        assert torch.equal(model(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("sublayer", [False, True])
def test_engine_replays_per_layer_kind_kwargs_gemma3(sublayer):
    """Gemma-3 layers get different masks / rotary tables per layer type (sliding vs full)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128,
    )
    model = Gemma3ForCausalLM(config).eval()
    windows = _windows(n=3, seq=16)
    seen = {}

    def on_layer(index, layer_modules, stats):
        seen.update(stats)

    targets = select_modules(model, [r"re:.*\.(q_proj|down_proj)$"])
    calibrate_sequentially(
        model, targets, windows, on_layer, sequential=True, sublayer=sublayer, cross=sublayer, batch_size=2
    )
    for name in ("model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        X = _direct_input_cov(model, name, windows)
        assert torch.allclose(seen[name]["cov"], X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6), name


class _StreamRecorder:
    """A layer store that reads nothing: it only records the dtype of the streams entering each layer."""

    def __init__(self):
        self.dtypes = []

    def enter(self, index):
        pass

    def leave(self, index, streams=None):
        self.dtypes.append({h.dtype for stream in streams if stream is not None for h in stream})


@pytest.mark.parametrize("sublayer", [False, True])
def test_streams_held_in_bf16_give_nearly_the_float32_statistics(sublayer):
    windows = _windows(n=8, seq=32)
    seen = {}
    for dtype in (None, torch.bfloat16):
        model = make_tiny_llama(layers=3)
        recorder = _StreamRecorder()
        stats_by_name = seen.setdefault(dtype, {})

        def on_layer(index, layer_modules, stats, model=model, stats_by_name=stats_by_name):
            for name, module in layer_modules.items():
                stats_by_name[name] = stats[name]["cov"]
                A, B = truncated_svd_factors(module.weight, 8)
                replace_module(model, name, LowRankLinear.from_factors(A, B, module.bias))

        calibrate_sequentially(
            model,
            select_modules(model, TARGETS),
            windows,
            on_layer,
            sublayer=sublayer,
            dense_cov=True,
            store=recorder,
            stream_dtype=dtype,
        )
        assert recorder.dtypes == [{dtype or torch.float32}] * 3
        assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, cov in seen[None].items():
        error = (seen[torch.bfloat16][name] - cov).norm() / cov.norm()
        assert 0 < error < 0.02, name  # bf16 rounding of the hidden states: a small, non-zero change


def test_a_variant_streams_statistics_are_pooled_with_the_main_streams():
    import contextlib

    model = make_tiny_llama()
    windows = _windows()
    modules = select_modules(model, TARGETS)
    seen = {}
    on_layer = _compress_rank(8, seen, [], model)

    def layer0_at_rank(rank):
        for module in model.model.layers[0].modules():
            if isinstance(module, LowRankLinear):
                module.select(rank)

    @contextlib.contextmanager
    def at_rank_3():  # the variant: layer 0's factors cut to rank 3
        layer0_at_rank(3)
        try:
            yield
        finally:
            layer0_at_rank(8)

    calibrate_sequentially(model, modules, windows, on_layer, sequential=True, variants=[at_rank_3])
    name = "model.layers.1.self_attn.q_proj"
    main = _direct_input_cov(model, name, windows)
    layer0_at_rank(3)
    variant = _direct_input_cov(model, name, windows)
    layer0_at_rank(8)
    pooled = (main.T @ main + variant.T @ variant) / (main.shape[0] + variant.shape[0])
    assert seen[name]["tokens"] == 2 * main.shape[0]
    assert torch.allclose(seen[name]["cov"], pooled, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pooled, main.T @ main / main.shape[0], rtol=1e-3)  # the variant did differ
    # layer 0 sees the same inputs on both streams: its statistics are the main stream's
    first = _direct_input_cov(model, "model.layers.0.self_attn.q_proj", windows)
    assert torch.allclose(seen["model.layers.0.self_attn.q_proj"]["cov"], first.T @ first / first.shape[0], rtol=1e-5)


def _engine_statistics(output_side: bool) -> dict:
    """Each module's (weight, stats) from a sub-layer dense-target walk of a fresh tiny Llama (float64 products)."""
    torch.manual_seed(0)
    model = make_tiny_llama()
    seen = {}

    def on_layer(index, layer_modules, stats):
        for name, module in layer_modules.items():
            seen[name] = (module.weight.detach().clone(), stats[name])
            A, B = truncated_svd_factors(module.weight, 4)
            replace_module(model, name, LowRankLinear.from_factors(A, B, module.bias))

    calibrate_sequentially(
        model,
        select_modules(model, TARGETS),
        _windows(),
        on_layer,
        sequential=True,
        sublayer=True,
        cross=True,
        batch_size=4,
        output_side=output_side,
    )
    return seen


def test_output_side_cross_moments_are_the_weighted_input_side_ones():
    """With output_side, down_proj (alone in the last group, fewer outputs than inputs) gets target_cross, its
    dense module's outputs against its current inputs: W times the cross moment it would get otherwise; every
    other module's statistics are the same bits as without it."""
    inputs, outputs = _engine_statistics(False), _engine_statistics(True)
    for name, (W, stats) in outputs.items():
        want = inputs[name][1]
        if name.endswith("down_proj"):
            assert "cross" not in stats and stats["target_cross"].shape == W.shape
            expected = W.double() @ want["cross"]
            assert torch.allclose(stats["target_cross"], expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
            assert torch.equal(stats["cov"], want["cov"])
        else:
            assert "target_cross" not in stats
            assert all(torch.equal(stats[key], want[key]) for key in ("cov", "cross", "abs_mean"))


def test_output_side_sensitivity_moments_are_the_weighted_input_side_ones():
    """The sensitivity walk with output_side gives down_proj its outputs' second moment and its input's power:
    W C W^T and C's diagonal, as measured from the inputs."""
    from compress.activations import ResidentLayers, sensitivity_walk

    seen = {}
    for output_side in (False, True):
        torch.manual_seed(0)
        model = make_tiny_llama()
        got = seen[output_side] = {}

        def on_layer(index, layer_modules, stats, fisher, got=got):
            for name, module in layer_modules.items():
                got[name] = (module.weight.detach().clone(), stats[name], fisher[name])

        modules = select_modules(model, TARGETS)
        sensitivity_walk(
            model, modules, _windows(n=4), ResidentLayers(), on_layer, statistics=True, output_side=output_side
        )
    for name, (W, stats, fisher) in seen[True].items():
        _, want, want_fisher = seen[False][name]
        assert torch.equal(fisher, want_fisher)
        if name.endswith("down_proj"):
            assert "cov" not in stats
            expected = W.double() @ want["cov"] @ W.double().T
            assert torch.allclose(stats["output_cov"], expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
            assert torch.allclose(stats["input_power"], want["cov"].diagonal(), rtol=1e-6)
        else:
            assert "output_cov" not in stats and torch.equal(stats["cov"], want["cov"])
