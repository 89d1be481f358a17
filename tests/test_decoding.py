"""fastattn.decoding: the newest Nq of Nk positions over a cache give the last Nq rows of the causal op,
against fastattn.reference in float64 (the causal op over all positions, then its last rows)."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.decoding import bigbird_attention_over_cache, performer_attention_over_cache
from fastattn.testing import check_against_reference
from tests.utils import describe_case, random_padding

BLOCK = 16


def _inputs(heads, kv_heads, key_len, padded, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, heads, key_len, 32)
    inputs = {"q": torch.randn(shape, generator=generator, dtype=torch.float64),
              "k": torch.randn(2, kv_heads, key_len, 32, generator=generator, dtype=torch.float64),
              "v": torch.randn(2, kv_heads, key_len, 32, generator=generator, dtype=torch.float64)}
    padding = random_padding(2, key_len, seed) if padded else None
    if padding is not None:
        padding[:, -1] = False  # the newest token is never padding
    return inputs, padding


# (H, Hkv, Nk, Nq, padded): one new token in the first block, at a block boundary, deep in a sparse row;
# several new tokens (chunked prefill); the whole sequence.
CASES = [(2, 2, 1, 1, False), (2, 1, 17, 1, True), (4, 2, 130, 1, True), (2, 2, 130, 37, True),
         (2, 2, 100, 100, False)]
IDS = [describe_case(H=h, Hkv=g, Nk=nk, Nq=nq, padded=p) for h, g, nk, nq, p in CASES]


@pytest.mark.parametrize("heads, kv_heads, key_len, query_len, padded", CASES, ids=IDS)
def test_bigbird_over_cache_gives_the_last_rows_of_the_causal_forward(heads, kv_heads, key_len, query_len, padded):
    inputs, padding = _inputs(heads, kv_heads, key_len, padded)
    layout = fastattn.bigbird_layout(key_len, block_size=BLOCK, num_heads=heads, num_random_blocks=1, seed=4,
                                     causal=True)

    def expected(q, k, v):
        return reference.block_sparse_attention(q, k, v, layout, causal=True, key_padding_mask=padding)[
            :, :, key_len - query_len:]

    def actual(q, k, v):
        return bigbird_attention_over_cache(q[:, :, key_len - query_len:], k, v, block_size=BLOCK,
                                            num_random_blocks=1, seed=4, key_padding_mask=padding, backend="cpu")

    check_against_reference(actual, expected, inputs, torch.float32)


@pytest.mark.parametrize("heads, kv_heads, key_len, query_len, padded", CASES, ids=IDS)
def test_performer_over_cache_gives_the_last_rows_of_the_causal_forward(heads, kv_heads, key_len, query_len, padded):
    inputs, padding = _inputs(heads, kv_heads, key_len, padded)
    projection = fastattn.random_features(24, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def expected(q, k, v):
        return reference.performer_attention(q, k, v, projection, causal=True, key_padding_mask=padding)[
            :, :, key_len - query_len:]

    def actual(q, k, v):
        return performer_attention_over_cache(q[:, :, key_len - query_len:], k, v, projection.to(q.dtype),
                                              key_padding_mask=padding, backend="cpu")

    check_against_reference(actual, expected, inputs, torch.float32)


def test_more_queries_than_keys_are_rejected():
    q = torch.zeros(1, 1, 5, 32)
    with pytest.raises(ValueError, match="q: expected at most Nk = 4 queries"):
        bigbird_attention_over_cache(q, q[:, :, :4], q[:, :, :4])
