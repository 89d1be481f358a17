"""The references agree with each other and with first principles: they are the ground truth of every test."""
import math

import pytest
import torch

import fastattn
from fastattn import reference


def _qkv(batch=2, heads=3, query_len=37, key_len=37, head_dim=16, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, head_dim, generator=generator, dtype=dtype)
                 for n in (query_len, key_len, key_len))


def _explicit_softmax_attention(q, k, v, allowed, scale):
    """Attention written out per query row with Python loops: a second opinion on _masked_attention."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = allowed[b, h, i].nonzero().flatten()
                if keys.numel():
                    weights = torch.softmax(q[b, h, i] @ k[b, h, keys].T * scale, dim=0)
                    out[b, h, i] = weights @ v[b, h, keys]
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_full_attention_matches_explicit_loops_with_padding(causal):
    q, k, v = _qkv(batch=2, heads=2, query_len=9, key_len=9, head_dim=8)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 5:] = True
    padding[1, :3] = True
    allowed = (~padding)[:, None, None, :].expand(2, 2, 9, 9)
    if causal:
        allowed = allowed & torch.ones(9, 9, dtype=torch.bool).tril()
    expected = _explicit_softmax_attention(q, k, v, allowed, 8**-0.5)
    actual = reference.full_attention(q, k, v, causal=causal, key_padding_mask=padding)
    torch.testing.assert_close(actual, expected)
    if causal:
        assert actual[1, :, :3].abs().max() == 0, "queries 0..2 of batch 1 see only padding: zeros expected"


def test_public_full_attention_matches_reference_and_zeroes_masked_rows():
    q, k, v = _qkv(query_len=20, key_len=20)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, :7] = True
    expected = reference.full_attention(q, k, v, causal=True, key_padding_mask=padding)
    actual = fastattn.full_attention(q, k, v, causal=True, key_padding_mask=padding)
    torch.testing.assert_close(actual, expected)
    assert torch.isfinite(actual).all()


def test_block_sparse_reference_with_every_block_is_full_attention():
    q, k, v = _qkv(query_len=50, key_len=70)
    layout = fastattn.BlockLayout.from_dense(torch.ones(4, 5, dtype=torch.bool), block_size=16)
    torch.testing.assert_close(reference.block_sparse_attention(q, k, v, layout), reference.full_attention(q, k, v))


def test_block_sparse_reference_masks_unlisted_blocks_per_head():
    q, k, v = _qkv(batch=1, heads=2, query_len=8, key_len=8, head_dim=4)
    blocks = torch.tensor([[[1, 0], [1, 1]], [[1, 1], [0, 1]]], dtype=torch.bool)
    layout = fastattn.BlockLayout.from_dense(blocks, block_size=4)
    allowed = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(0)
    expected = _explicit_softmax_attention(q, k, v, allowed, 0.5)
    torch.testing.assert_close(reference.block_sparse_attention(q, k, v, layout), expected)


def test_linformer_reference_with_identity_projection_is_full_attention():
    q, k, v = _qkv(query_len=12, key_len=12)
    identity = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(reference.linformer_attention(q, k, v, identity), reference.full_attention(q, k, v))


def test_linformer_reference_zeroes_padded_keys_before_projecting():
    q, k, v = _qkv(query_len=6, key_len=10)
    projection = torch.randn(4, 16, dtype=torch.float64)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[:, 6:] = True
    expected = reference.linformer_attention(q, k[:, :, :6], v[:, :, :6], projection)
    torch.testing.assert_close(reference.linformer_attention(q, k, v, projection, key_padding_mask=padding), expected)


def _favor_by_definition(q, k, v, projection, scale, causal):
    """FAVOR+ exactly as the paper writes it, without stabilisers (fine in float64 at small scale)."""
    m = projection.shape[0]

    def phi(x):
        x = x * scale**0.5
        return torch.exp(x @ projection.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kernel_matrix = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        kernel_matrix = kernel_matrix.tril()
    return (kernel_matrix @ v) / kernel_matrix.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_performer_reference_equals_unstabilised_favor(causal):
    q, k, v = _qkv(query_len=25, key_len=25)
    projection = fastattn.random_features(32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = _favor_by_definition(q, k, v, projection, 16**-0.5, causal)
    actual = reference.performer_attention(q, k, v, projection, causal=causal)
    torch.testing.assert_close(actual, expected)


def test_performer_reference_approaches_softmax_attention_as_features_grow():
    q, k, v = _qkv(batch=1, heads=2, query_len=64, key_len=64, head_dim=16, seed=3)
    exact = reference.full_attention(q, k, v)
    errors = []
    for m in (16, 1024):
        projection = fastattn.random_features(m, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        approx = reference.performer_attention(q, k, v, projection)
        errors.append(((approx - exact).norm() / exact.norm()).item())
    assert errors[1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_performer_reference_nan_reaches_the_rows_that_read_it(causal):
    # A NaN query that sees keys gave a zero row (normaliser > 0 is False for NaN), and causal, a NaN in a later
    # key reached the earlier rows (the causal mask applied as a product: 0 * NaN).
    q, k, v = _qkv(batch=2, heads=1, query_len=12, key_len=12, head_dim=8)
    projection = fastattn.random_features(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, :5] = True
    q[0, 0, 3, 1] = float("nan")
    k[0, 0, 8, 0] = float("nan")
    q[1, 0, 2, 1] = float("nan")  # causal: sees no key (keys 0-4 padded), so gives 0
    out = reference.performer_attention(q, k, v, projection, causal=causal, key_padding_mask=mask)
    expected = torch.zeros(2, 1, 12, dtype=torch.bool)
    expected[0, 0, 3] = True
    expected[0, 0, 8 if causal else 0:] = True
    expected[1, 0, 2] = not causal
    assert torch.equal(torch.isnan(out).all(-1), expected)
    assert torch.equal(torch.isnan(out).any(-1), expected)
    if causal:
        assert (out[1, 0, :5] == 0).all()
