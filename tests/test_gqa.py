"""Grouped-query attention: k and v with Hkv heads, H % Hkv == 0, query head h reading kv head h // (H / Hkv).

Every mechanism on every backend that runs here, outputs and gradients (dK, dV summed over each group)
against fastattn.reference in float64; the reference itself against an explicit per-head formula.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import check_against_reference
from tests.utils import describe_case, random_block_layout, random_padding

LENGTH, HEAD_DIM, BLOCK = 50, 32, 16


def _projections(heads, generator):
    return {
        "proj_k": torch.randn(heads, 8, LENGTH, generator=generator, dtype=torch.float64) / LENGTH**0.5,
        "projection": fastattn.random_features(16, HEAD_DIM, generator=generator, dtype=torch.float64),
    }


def _layouts(heads):
    """name -> (per-head layout, causal) of the block-sparse mechanisms."""
    return {
        "block_sparse": (random_block_layout(heads, LENGTH, LENGTH, BLOCK, per_head=True, seed=3), False),
        "bigbird-causal": (fastattn.bigbird_layout(LENGTH, block_size=BLOCK, num_heads=heads, num_random_blocks=1,
                                                   causal=True), True),
    }


def _mechanisms(heads):
    """name -> (public op taking backend, reference op, extra inputs' names)."""
    layout, bigbird = (layout for layout, _ in _layouts(heads).values())
    return {
        "full-causal": (
            lambda backend, q, k, v, key_padding_mask: fastattn.full_attention(
                q, k, v, causal=True, key_padding_mask=key_padding_mask),
            lambda q, k, v, key_padding_mask: reference.full_attention(
                q, k, v, causal=True, key_padding_mask=key_padding_mask), ()),
        "block_sparse": (
            lambda backend, q, k, v, key_padding_mask: fastattn.block_sparse_attention(
                q, k, v, layout, key_padding_mask=key_padding_mask, backend=backend),
            lambda q, k, v, key_padding_mask: reference.block_sparse_attention(
                q, k, v, layout, key_padding_mask=key_padding_mask), ()),
        "bigbird-causal": (
            lambda backend, q, k, v, key_padding_mask: fastattn.bigbird_attention(
                q, k, v, block_size=BLOCK, num_random_blocks=1, causal=True, key_padding_mask=key_padding_mask,
                backend=backend),
            lambda q, k, v, key_padding_mask: reference.block_sparse_attention(
                q, k, v, bigbird, causal=True, key_padding_mask=key_padding_mask), ()),
        "linformer": (
            lambda backend, q, k, v, key_padding_mask, proj_k: fastattn.linformer_attention(
                q, k, v, proj_k, key_padding_mask=key_padding_mask, backend=backend),
            lambda q, k, v, key_padding_mask, proj_k: reference.linformer_attention(
                q, k, v, proj_k, key_padding_mask=key_padding_mask), ("proj_k",)),
        "performer-causal": (
            lambda backend, q, k, v, key_padding_mask, projection: fastattn.performer_attention(
                q, k, v, projection, causal=True, key_padding_mask=key_padding_mask, backend=backend),
            lambda q, k, v, key_padding_mask, projection: reference.performer_attention(
                q, k, v, projection, causal=True, key_padding_mask=key_padding_mask), ("projection",)),
        "performer-relu": (
            lambda backend, q, k, v, key_padding_mask, projection: fastattn.performer_attention(
                q, k, v, projection, kernel="relu", key_padding_mask=key_padding_mask, backend=backend),
            lambda q, k, v, key_padding_mask, projection: reference.performer_attention(
                q, k, v, projection, kernel="relu", key_padding_mask=key_padding_mask), ("projection",)),
    }


def _inputs(heads, kv_heads, extra, padded, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = {"q": torch.randn(2, heads, LENGTH, HEAD_DIM, generator=generator, dtype=torch.float64)}
    for name in ("k", "v"):
        inputs[name] = torch.randn(2, kv_heads, LENGTH, HEAD_DIM, generator=generator, dtype=torch.float64)
    inputs["key_padding_mask"] = random_padding(2, LENGTH, seed) if padded else None
    projections = _projections(heads, generator)
    inputs.update({name: projections[name] for name in extra})
    return inputs


# (H, Hkv, padded)
GROUPS = [(4, 2, False), (6, 1, True), (4, 4, True)]
BACKENDS = ["cpu", "reference"]
CASES = [(name, backend, *group) for name in _mechanisms(1) for backend in BACKENDS for group in GROUPS
         if not (name == "full-causal" and backend == "reference")]


@pytest.mark.parametrize("name, backend, heads, kv_heads, padded", CASES,
                         ids=[describe_case(**{c[0]: True}, backend=c[1], H=c[2], Hkv=c[3], padded=c[4]) for c in CASES])
def test_grouped_query_attention_matches_reference(name, backend, heads, kv_heads, padded):
    public, ground_truth, extra = _mechanisms(heads)[name]
    inputs = _inputs(heads, kv_heads, extra, padded)
    check_against_reference(lambda **kw: public(backend, **kw), ground_truth, inputs, torch.float32)


def test_triton_block_sparse_reads_grouped_heads():
    public, ground_truth, extra = _mechanisms(4)["bigbird-causal"]
    check_against_reference(lambda **kw: public("triton", **kw), ground_truth, _inputs(4, 2, extra, True),
                            torch.float32)


@pytest.mark.parametrize("name", list(_mechanisms(1)))
def test_reference_reads_kv_head_h_over_group_size(name):
    """The ground truth against an independent formula: each query head run with its kv head, one at a time."""
    heads, kv_heads = 6, 2
    _, ground_truth, extra = _mechanisms(heads)[name]
    inputs = _inputs(heads, kv_heads, extra, padded=True)
    grouped = ground_truth(**inputs)
    per_head = []
    for head in range(heads):
        kv_head = head // (heads // kv_heads)
        one = dict(inputs, q=inputs["q"][:, head:head + 1], k=inputs["k"][:, kv_head:kv_head + 1],
                   v=inputs["v"][:, kv_head:kv_head + 1])
        if "proj_k" in one:
            one["proj_k"] = one["proj_k"][head]
        if name in _layouts(heads):
            layout, causal = _layouts(heads)[name]
            one_head = fastattn.BlockLayout.from_dense(layout.to_dense()[head:head + 1], BLOCK)
            per_head.append(reference.block_sparse_attention(one["q"], one["k"], one["v"], one_head, causal=causal,
                                                             key_padding_mask=one["key_padding_mask"]))
        else:
            per_head.append(ground_truth(**one))
    torch.testing.assert_close(grouped, torch.cat(per_head, dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kv_heads", [3, 0, 8])
@pytest.mark.parametrize("name", list(_mechanisms(1)))
def test_kv_heads_that_do_not_divide_the_query_heads_are_rejected(name, kv_heads):
    public, _, extra = _mechanisms(4)[name]
    inputs = _inputs(4, 1, extra, padded=False)
    inputs["k"] = inputs["v"] = torch.zeros(2, kv_heads, LENGTH, HEAD_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"k: expected Hkv heads dividing H=4 .*got Hkv={kv_heads}"):
        public("cpu", **inputs)
