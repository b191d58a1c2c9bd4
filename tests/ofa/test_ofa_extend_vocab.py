"""extend_vocab: the .vec reader, OFA's initialisation rules, and the stage on SmolLM2's real tokenizer."""

import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import compress  # noqa: F401  registers the checkpoint format
from compress.checkpoint import mark_compressed
from compress.errors import CompressError
from compress.methods.base import StageContext
from compress.methods.ofa.extend_vocab import COPIED, NEIGHBOURS, RANDOM, ofa_rows
from compress.methods.ofa.word_vectors import read_vec, subword_vectors
from compress.models import load_folder, save_folder
from compress.modules import FactorizedEmbedding, TiedFactorizedLMHead
from compress.pipeline import apply_stage
from compress.recipe import parse_recipe
from tests.tiny import make_tiny_llama

NEW_WORDS = ["quokkaburger", "zeptowidget", "flibbertastic"]  # the last has no vector: random
COMMON = [
    "the",
    "cat",
    "dog",
    "house",
    "river",
    "king",
    "queen",
    "apple",
    "water",
    "city",
    "music",
    "green",
    "small",
    "run",
    "book",
    "light",
    "stone",
    "bird",
    "tree",
    "road",
]


# ------------------------------------------------------------------ .vec reader


def test_read_vec_with_and_without_header(tmp_path):
    (tmp_path / "h.vec").write_text("2 3\ncat 1 2 3 \ndog 0.5 -1 2e-1\n")
    (tmp_path / "n.vec").write_text("cat 1 2 3\n\ndog 0.5 -1 2e-1\n")
    for name in ("h.vec", "n.vec"):
        words, vectors = read_vec(tmp_path / name)
        assert words == ["cat", "dog"]
        torch.testing.assert_close(vectors, torch.tensor([[1, 2, 3], [0.5, -1, 0.2]]))
    assert read_vec(tmp_path / "h.vec", max_words=1)[0] == ["cat"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("cat 1 2 3\ndog 1 2\n", "line 2: 2 values, expected 3"),
        ("2 3\ncat 1 2\n", "line 2: 2 values, expected 3"),
        ("cat 1 x 3\n", "line 1: non-numeric"),
        ("cat\n", "line 1: expected 'word v1 ... vd'"),
        ("", "holds no vectors"),
    ],
)
def test_malformed_vec_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.vec"
    path.write_text(text)
    with pytest.raises(CompressError, match=message) as info:
        read_vec(path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ OFA's rules


def _brute_force_row(vector, source_vectors, source_rows, neighbours, temperature):
    scored = []
    for sid, u in source_vectors.items():
        cos = float(vector.double() @ u.double() / (vector.double().norm() * u.double().norm()))
        scored.append((cos, sid))
    scored.sort(reverse=True)
    best = scored[:neighbours]
    z = sum(math.exp(c / temperature) for c, _ in best)
    return sum(math.exp(c / temperature) / z * source_rows[sid].double() for c, sid in best)


def _unambiguous_neighbours(vector, source_vectors, start=10):
    """Smallest n >= start with no tie at the n-th place (tokens spelling the same word share a vector)."""
    cos = sorted(
        (
            float(vector.double() @ u.double() / (vector.double().norm() * u.double().norm()))
            for u in source_vectors.values()
        ),
        reverse=True,
    )
    return next(n for n in range(start, len(cos)) if cos[n - 1] - cos[n] > 1e-9)


def test_ofa_rows_copy_average_and_randomise():
    g = torch.Generator().manual_seed(0)
    source_rows = torch.randn(30, 5, generator=g)
    source_vocab = {f"s{i}": i for i in range(30)}
    target_vocab = {"s3": 0, "new_a": 1, "s7": 2, "new_b": 3, "new_c": 4}
    source_vectors = {i: torch.randn(6, generator=g) for i in range(0, 30, 2)}  # half the source has vectors
    target_vectors = {1: torch.randn(6, generator=g), 3: source_vectors[4] * 2, 0: torch.randn(6, generator=g)}
    rows, kinds = ofa_rows(
        source_rows,
        source_vocab,
        target_vocab,
        source_vectors,
        target_vectors,
        5,
        neighbours=4,
        temperature=0.1,
        generator=torch.Generator().manual_seed(1),
    )
    assert kinds.tolist() == [COPIED, NEIGHBOURS, COPIED, NEIGHBOURS, RANDOM]  # a shared token ignores its vector
    assert torch.equal(rows[0], source_rows[3].double()) and torch.equal(rows[2], source_rows[7].double())
    for tid in (1, 3):
        expected = _brute_force_row(target_vectors[tid], source_vectors, source_rows, 4, 0.1)
        torch.testing.assert_close(rows[tid], expected, rtol=1e-10, atol=1e-10)
    assert not any(torch.allclose(rows[4], r.double()) for r in source_rows)


def test_subword_vectors_direct_hits_and_means(smol_tokenizer):
    words = ["cat", "xylophonist", "xylophone"]
    vectors = torch.tensor([[1.0, 0], [0, 2.0], [4.0, 4.0]])
    out = subword_vectors(smol_tokenizer, words, vectors)
    vocab = smol_tokenizer.get_vocab()
    assert torch.equal(out[vocab["Ġcat"]], vectors[0]) and torch.equal(out[vocab["cat"]], vectors[0])
    pieces = {w: set(smol_tokenizer(" " + w)["input_ids"]) | set(smol_tokenizer(w)["input_ids"]) for w in words[1:]}
    shared = (pieces["xylophonist"] & pieces["xylophone"]) - {vocab.get("cat")}
    only_ist = pieces["xylophonist"] - pieces["xylophone"]
    assert shared and only_ist
    for tid in shared:  # in both words' tokenisations: the mean of their vectors
        torch.testing.assert_close(out[tid], (vectors[1] + vectors[2]) / 2)
    for tid in only_ist:
        torch.testing.assert_close(out[tid], vectors[1])


# ------------------------------------------------------------------ the stage, on SmolLM2's tokenizer


@pytest.fixture(scope="module")
def new_tokenizer_dir(tmp_path_factory, smol_tokenizer):
    folder = tmp_path_factory.mktemp("tok")
    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    assert tokenizer.add_tokens(NEW_WORDS) == 3
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vec_file(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    words = COMMON + NEW_WORDS[:2]
    vectors = torch.randn(len(words), 8, generator=g)
    vectors[-2] = vectors[COMMON.index("cat")] + 0.1 * vectors[-2]  # quokkaburger lives near "cat"
    path = tmp_path_factory.mktemp("vec") / "aligned.vec"
    path.write_text(
        f"{len(words)} 8\n"
        + "".join(w + " " + " ".join(f"{x:.6f}" for x in v.tolist()) + "\n" for w, v in zip(words, vectors))
    )
    return path


def _extend(model, tokenizer, new_tokenizer_dir, vec_file, windows=None, **extra):
    stages = [{"method": "extend_vocab", "tokenizer": str(new_tokenizer_dir), "vectors": str(vec_file), **extra}]
    recipe = parse_recipe({"name": "t", "stages": stages})
    ctx = StageContext(tokenizer, lambda: windows, progress=False)
    return recipe, ctx, apply_stage(model, recipe.stages[0], ctx)


def test_extend_factorised_tied_model(tmp_path, smol_tokenizer, new_tokenizer_dir, vec_file):
    V = len(smol_tokenizer)
    model = make_tiny_llama(vocab_size=V, hidden=32, intermediate=64, layers=1)
    recipe = parse_recipe({"name": "t", "stages": [{"method": "ofa_embedding", "dim": 8}]})
    apply_stage(model, recipe.stages[0], StageContext(smol_tokenizer, lambda: None, progress=False))
    old_coords = model.model.embed_tokens.coords.weight.detach().clone()
    ids = torch.tensor([smol_tokenizer("The cat sat by the river.")["input_ids"]])
    with torch.no_grad():
        old_logits = model(ids).logits

    words, vectors = read_vec(vec_file)
    source_vectors = subword_vectors(smol_tokenizer, words, vectors)
    vector = vectors[words.index("quokkaburger")]
    neighbours = _unambiguous_neighbours(vector, source_vectors)
    _, ctx, result = _extend(model, smol_tokenizer, new_tokenizer_dir, vec_file, neighbours=neighbours)
    s = result.summary
    assert (s["target_vocab"], s["copied"], s["from_neighbours"], s["random"]) == (V + 3, V, 2, 1)
    assert len(ctx.tokenizer) == V + 3 and model.config.vocab_size == V + 3
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, FactorizedEmbedding) and isinstance(head, TiedFactorizedLMHead)
    assert head.embedding is embedding
    coords = embedding.coords.weight.detach()
    assert torch.equal(coords[:V], old_coords)  # every shared token keeps its coordinates exactly

    new_id = ctx.tokenizer.convert_tokens_to_ids("quokkaburger")
    expected = _brute_force_row(vector, source_vectors, old_coords, neighbours, 0.1)
    torch.testing.assert_close(coords[new_id].double(), expected, rtol=1e-5, atol=1e-6)

    with torch.no_grad():  # old text: same logits over the old vocabulary (the tied head follows the rows)
        logits = model(ids).logits
    torch.testing.assert_close(logits[..., :V], old_logits, rtol=1e-5, atol=1e-5)

    new_ids = ctx.tokenizer("a quokkaburger and a flibbertastic zeptowidget", return_tensors="pt")["input_ids"]
    assert new_ids.max() >= V
    mark_compressed(model, {})
    save_folder(model, ctx.tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _, tokenizer, _ = load_folder(tmp_path)
    assert len(tokenizer) == V + 3
    with torch.no_grad():
        assert torch.equal(reloaded(new_ids).logits, model(new_ids).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_extend_dense_model(smol_tokenizer, new_tokenizer_dir, vec_file, tie):
    V = len(smol_tokenizer)
    model = make_tiny_llama(vocab_size=V, hidden=32, intermediate=64, layers=1, tie=tie)
    old_embed = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    words, vectors = read_vec(vec_file)
    source_vectors = subword_vectors(smol_tokenizer, words, vectors)
    vector = vectors[words.index("quokkaburger")]
    neighbours = _unambiguous_neighbours(vector, source_vectors)
    _, ctx, result = _extend(model, smol_tokenizer, new_tokenizer_dir, vec_file, neighbours=neighbours)
    assert result.summary["copied"] == V
    assert model.model.embed_tokens.weight.shape == (V + 3, 32) and model.lm_head.weight.shape == (V + 3, 32)
    assert torch.equal(model.model.embed_tokens.weight[:V], old_embed)
    assert torch.equal(model.lm_head.weight[:V], old_head)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    new_id = ctx.tokenizer.convert_tokens_to_ids("quokkaburger")
    expected = _brute_force_row(vector, source_vectors, old_head, neighbours, 0.1)
    torch.testing.assert_close(model.lm_head.weight[new_id].detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_missing_tokenizer_is_a_parse_error(tmp_path, vec_file):
    with pytest.raises(CompressError, match="tokenizer folder .* does not exist"):
        parse_recipe(
            {
                "name": "t",
                "stages": [{"method": "extend_vocab", "tokenizer": str(tmp_path / "nope"), "vectors": str(vec_file)}],
            }
        )


def test_malformed_vectors_fail_the_stage(tmp_path, smol_tokenizer, new_tokenizer_dir):
    bad = tmp_path / "bad.vec"
    bad.write_text("cat 1 2\ndog 1\n")
    model = make_tiny_llama(vocab_size=len(smol_tokenizer), hidden=32, intermediate=64, layers=1)
    with pytest.raises(CompressError, match="line 2"):
        _extend(model, smol_tokenizer, new_tokenizer_dir, bad)


def test_compress_run_saves_the_new_tokenizer(tmp_path, smol_tokenizer, new_tokenizer_dir, vec_file):
    from compress.cli import main

    V = len(smol_tokenizer)
    folder = tmp_path / "tiny-model"
    save_folder(make_tiny_llama(vocab_size=V, hidden=32, intermediate=64, layers=1), smol_tokenizer, folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-extend",
                "stages": [{"method": "extend_vocab", "tokenizer": str(new_tokenizer_dir), "vectors": str(vec_file)}],
                "calibration": {"samples": 2, "seq_len": 32},
                "eval": {"tasks": [], "perplexity_windows": 1, "seq_len": 32},
            }
        )
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), str(folder), "--out", str(out), "--quiet"]) == 0
    model, tokenizer, _ = load_folder(out / "model")
    assert len(tokenizer) == V + 3 and model.config.vocab_size == V + 3
    assert tokenizer.convert_tokens_to_ids("quokkaburger") >= V
