"""FactorizedEmbedding and the tied head: exact at full rank, never V x D in the head, Gemma's scale."""

import torch
from torch import nn

from compress.methods.ofa.factorize import factorize_embedding
from compress.modules import MODULE_TYPES, FactorizedEmbedding, TiedFactorizedLMHead


def _factorised(vocab=200, width=32, dim=None, scale=1.0):
    E = torch.randn(vocab, width, generator=torch.Generator().manual_seed(0))
    coords, primitives = factorize_embedding(E, dim or min(vocab, width))
    return E, FactorizedEmbedding.from_factors(coords.float(), primitives.float(), embed_scale=scale)


def test_full_rank_embedding_and_tied_logits_match_dense():
    E, emb = _factorised()
    head = TiedFactorizedLMHead(emb, "embed")
    ids = torch.randint(0, 200, (3, 11))
    h = torch.randn(3, 11, 32)
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), nn.functional.embedding(ids, E), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(h), h @ E.T, rtol=1e-4, atol=1e-4)


def test_tied_head_is_the_dense_product_of_the_factors_at_any_rank():
    _, emb = _factorised(dim=5)
    head = TiedFactorizedLMHead(emb, "embed")
    h = torch.randn(4, 32, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(head(h), h @ emb.weight.T, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in head.parameters()) == 0  # nothing of its own: it reads the embedding


def test_gradients_from_both_uses_reach_the_shared_factors():
    _, emb = _factorised(dim=4)
    model = nn.ModuleDict({"embed": emb, "head": TiedFactorizedLMHead(emb, "embed")})
    ids = torch.tensor([[1, 2, 3]])
    model["head"](emb(ids)).sum().backward()
    assert emb.coords.weight.grad[5].abs().sum() > 0  # a row only the head touched
    assert emb.primitives.weight.grad.abs().sum() > 0


def test_gemma_scaled_embedding_is_reproduced():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    dense = Gemma3TextScaledWordEmbedding(50, 16, padding_idx=0, embed_scale=16**0.5)
    coords, primitives = factorize_embedding(dense.weight, 16)
    emb = FactorizedEmbedding.from_factors(coords.float(), primitives.float(), 0, dense.scalar_embed_scale)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_spec_rebuilds_the_same_shapes_and_binding():
    _, emb = _factorised(dim=6, scale=2.5)
    spec = emb.spec()
    rebuilt = MODULE_TYPES[spec["type"]].from_spec(spec)
    assert (rebuilt.coords.weight.shape, rebuilt.primitives.weight.shape, rebuilt.embed_scale) == (
        emb.coords.weight.shape,
        emb.primitives.weight.shape,
        2.5,
    )
    head = MODULE_TYPES["tied_factorized_lm_head"].from_spec(TiedFactorizedLMHead(emb, "embed").spec())
    holder = nn.ModuleDict({"embed": emb, "head": head})
    head.bind(holder)
    assert head.embedding is emb


def test_full_rows_layout_matches_its_dense_table_and_round_trips_its_spec():
    E = torch.randn(60, 16, generator=torch.Generator().manual_seed(1))
    full_ids = torch.tensor([41, 3, 17])
    tail = torch.tensor([i for i in range(60) if i not in (3, 17, 41)])
    coords, primitives = factorize_embedding(E[tail], 16)  # full rank: the whole table is exact
    emb = FactorizedEmbedding.from_factors(coords.float(), primitives.float(), None, 1.0, full_ids, E[full_ids])
    assert emb.full_ids.tolist() == [3, 17, 41]
    ids = torch.randint(0, 60, (2, 9))
    h = torch.randn(2, 9, 16)
    head = TiedFactorizedLMHead(emb, "embed")
    with torch.no_grad():
        torch.testing.assert_close(emb.weight, E, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb(ids), nn.functional.embedding(ids, E), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(h), h @ E.T, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in emb.parameters()) == 3 * 16 + 16 * (57 + 16)
    rebuilt = MODULE_TYPES["factorized_embedding"].from_spec(emb.spec())
    rebuilt.load_state_dict(emb.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), emb(ids))


def test_full_rows_get_gradients_from_both_uses():
    E = torch.randn(30, 8)
    emb = FactorizedEmbedding.from_factors(
        *[t.float() for t in factorize_embedding(E[2:], 4)], None, 1.0, torch.tensor([0, 1]), E[:2]
    )
    head = TiedFactorizedLMHead(emb, "embed")
    head(emb(torch.tensor([[5, 6]]))).sum().backward()  # only tail tokens are looked up
    assert emb.full_rows.weight.grad.abs().sum() > 0  # the head still trains the full rows
    assert emb.coords.weight.grad[3].abs().sum() > 0
