"""BigBird layout properties, and the errors that bad block-sparse inputs raise (Python checks and the op's own)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
from fastattn.layout import BlockLayout, bigbird_layout

layout_arguments = st.fixed_dictionaries({
    "seq_len": st.integers(1, 700),
    "block_size": st.sampled_from([8, 16, 32, 64]),
    "num_heads": st.integers(1, 4),
    "num_random_blocks": st.integers(0, 4),
    "seed": st.integers(0, 2**31 - 1),
})


def _blocks(args: dict) -> int:
    return math.ceil(args["seq_len"] / args["block_size"])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layout_arguments)
def test_bigbird_layout_global_window_and_random_blocks(args):
    mask = bigbird_layout(**args).to_dense()
    blocks = _blocks(args)
    last = blocks - 1
    assert mask.shape == (args["num_heads"], blocks, blocks)
    assert mask[:, [0, last], :].all() and mask[:, :, [0, last]].all(), "first and last blocks are global"
    for row in range(blocks):
        window = [col for col in (row - 1, row, row + 1) if 0 <= col < blocks]
        assert mask[:, row, window].all(), f"row {row} must see its window {window}"
    for row in range(1, last):
        fixed = {0, last, row - 1, row, row + 1}
        expected = len(fixed) + min(args["num_random_blocks"], blocks - len(fixed))
        assert (mask[:, row].sum(-1) == expected).all(), f"row {row}: {len(fixed)} fixed + r random blocks"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(layout_arguments)
def test_causal_bigbird_layout_is_lower_triangular_with_random_blocks_left_of_the_window(args):
    mask = bigbird_layout(**args, causal=True).to_dense()
    blocks = _blocks(args)
    assert not mask.triu(1).any(), "a causal layout lists no block above the diagonal"
    assert mask[:, :, 0].all(), "every row sees the first block"
    for row in range(1, blocks):
        assert mask[:, row, [row - 1, row]].all(), f"row {row} must see itself and its left neighbour"
        # Blocks 1 .. row - 2 are left of the window and are not the global block 0.
        randoms = mask[:, row, 1:max(row - 1, 1)].sum(-1)
        assert (randoms == min(args["num_random_blocks"], max(row - 2, 0))).all(), f"row {row}: r random blocks"


@settings(max_examples=30, deadline=None, derandomize=True)
@given(layout_arguments, st.integers(1, 500))
def test_causal_bigbird_layout_is_prefix_stable(args, extra):
    """Regression (issue 12): the last row was global and random blocks were drawn per length, so a
    token's output depended on how many tokens followed it."""
    short = bigbird_layout(**args, causal=True).to_dense()
    longer = bigbird_layout(**{**args, "seq_len": args["seq_len"] + extra}, causal=True).to_dense()
    blocks = short.shape[1]
    assert torch.equal(longer[:, :blocks, :blocks], short)
    assert not longer[:, :blocks, blocks:].any()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_causal_bigbird_output_of_a_token_does_not_depend_on_the_tokens_after_it(backend):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 200, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    full = fastattn.bigbird_attention(q, k, v, block_size=16, num_random_blocks=2, causal=True, backend=backend)
    for length in (1, 37, 112, 199):
        prefix = fastattn.bigbird_attention(q[:, :, :length], k[:, :, :length], v[:, :, :length], block_size=16,
                                            num_random_blocks=2, causal=True, backend=backend)
        torch.testing.assert_close(prefix, full[:, :, :length], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", ["a", None, 1.5, True, 2**70], ids=["str", "None", "float", "bool", "2**70"])
def test_bigbird_rejects_a_seed_that_is_not_an_int64(seed):
    # int(seed) took 1.5 and True silently, and "a", None or 2**70 failed without naming the argument.
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="seed: expected an int"):
        bigbird_layout(64, block_size=4, seed=seed)
    with pytest.raises(ValueError, match="seed: expected an int"):
        fastattn.bigbird_attention(q, q, q, block_size=4, seed=seed)


def test_bigbird_takes_an_integer_seed_of_any_integer_type():
    numpy_seed = torch.tensor(5).numpy()[()]
    assert bigbird_layout(64, block_size=4, seed=numpy_seed) == bigbird_layout(64, block_size=4, seed=5)


def test_bigbird_layout_is_reproducible_from_seed_and_differs_per_head():
    first = bigbird_layout(2048, block_size=64, num_heads=4, num_random_blocks=3, seed=7).to_dense()
    again = bigbird_layout(2048, block_size=64, num_heads=4, num_random_blocks=3, seed=7).to_dense()
    other = bigbird_layout(2048, block_size=64, num_heads=4, num_random_blocks=3, seed=8).to_dense()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert all(not torch.equal(first[0], first[h]) for h in range(1, 4)), "random blocks differ per head"


def _inputs(batch=2, heads=2, length=64, dim=16, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) for _ in range(3))


def _layout(length=64, block_size=16, heads=1):
    return bigbird_layout(length, block_size=block_size, num_heads=heads, num_random_blocks=1)


BAD_CALLS = [
    ("q-rank-3", ValueError, "q", lambda q, k, v: dict(q=q[0])),
    ("k-head-dim", ValueError, "k", lambda q, k, v: dict(k=k[..., :8], v=v[..., :8])),
    ("v-length", ValueError, "v", lambda q, k, v: dict(v=v[:, :, :32])),
    ("k-batch", ValueError, "k", lambda q, k, v: dict(k=k[:1], v=v[:1])),
    ("k-dtype", TypeError, "k", lambda q, k, v: dict(k=k.double())),
    ("layout-too-short", ValueError, "layout", lambda q, k, v: dict(layout=_layout(48))),
    ("layout-block-size", ValueError, "layout",
     lambda q, k, v: dict(layout=BlockLayout(torch.ones(4, 4, dtype=torch.bool), block_size=32))),
    ("layout-heads", ValueError, "layout", lambda q, k, v: dict(layout=_layout(heads=3))),
    ("layout-type", TypeError, "layout", lambda q, k, v: dict(layout=torch.ones(4, 4, dtype=torch.bool))),
    ("padding-dtype", TypeError, "key_padding_mask", lambda q, k, v: dict(key_padding_mask=torch.zeros(2, 64))),
    ("padding-shape", ValueError, "key_padding_mask",
     lambda q, k, v: dict(key_padding_mask=torch.zeros(2, 63, dtype=torch.bool))),
    ("causal-lengths", ValueError, "causal",
     lambda q, k, v: dict(k=k[:, :, :48], v=v[:, :, :48], causal=True, layout=BlockLayout(torch.ones(4, 3, dtype=torch.bool), 16))),
]


@pytest.mark.parametrize("name, error, argument, change", BAD_CALLS, ids=[call[0] for call in BAD_CALLS])
def test_bad_input_names_the_argument(name, error, argument, change):
    q, k, v = _inputs()
    call = dict(q=q, k=k, v=v, layout=_layout(), causal=False, key_padding_mask=None)
    call.update(change(q, k, v))
    with pytest.raises(error, match=argument):
        fastattn.block_sparse_attention(call.pop("q"), call.pop("k"), call.pop("v"), call.pop("layout"), **call,
                                        backend="cpu")


def _op_call(**changes):
    q, k, v = _inputs()
    layout = _layout()
    row_offsets, col_indices, col_offsets, row_indices = layout.csr("cpu")
    args = dict(q=q, k=k, v=v, row_offsets=row_offsets, col_indices=col_indices, col_offsets=col_offsets,
                row_indices=row_indices, block_size=16, causal=False, key_padding_mask=None, scale=0.25)
    args.update(changes)
    return torch.ops.fastattn.block_sparse_fwd(*args.values())


OP_ERRORS = [
    ("block-size-does-not-fit-csr", ValueError, "row_offsets", dict(block_size=32)),
    ("column-index-out-of-range", ValueError, "col_indices",
     dict(col_indices=torch.full_like(_layout().csr("cpu")[1], 4))),
    ("offsets-decrease", ValueError, "row_offsets",
     dict(row_offsets=torch.tensor([[0, 5, 3, 8, 12]], dtype=torch.int32))),
    ("csr-dtype", TypeError, "row_offsets", dict(row_offsets=_layout().csr("cpu")[0].long())),
    ("csr-heads", ValueError, "row_offsets", dict(row_offsets=_layout(heads=3).csr("cpu")[0],
                                                  col_indices=_layout(heads=3).csr("cpu")[1])),
    ("unsupported-dtype", TypeError, "q", dict(q=torch.zeros(2, 2, 64, 16, dtype=torch.float16),
                                               k=torch.zeros(2, 2, 64, 16, dtype=torch.float16),
                                               v=torch.zeros(2, 2, 64, 16, dtype=torch.float16))),
    ("non-unit-last-stride", ValueError, "stride", dict(q=torch.zeros(2, 2, 16, 64).transpose(2, 3))),
    ("padding-mask-shape", ValueError, "key_padding_mask", dict(key_padding_mask=torch.zeros(2, 60, dtype=torch.bool))),
    ("causal-lengths", ValueError, "causal", dict(q=torch.zeros(2, 2, 48, 16), causal=True,
                                                  row_offsets=_layout().csr("cpu")[0][:, :4])),
]


@pytest.mark.parametrize("name, error, argument, changes", OP_ERRORS, ids=[call[0] for call in OP_ERRORS])
def test_op_rejects_bad_input(name, error, argument, changes):
    with pytest.raises(error, match=argument):
        _op_call(**changes)


PUBLIC_OPS = {
    "full": lambda q, k, v, **kw: fastattn.full_attention(q, k, v, **kw),
    "block_sparse": lambda q, k, v, **kw: fastattn.block_sparse_attention(q, k, v, _layout(heads=2), **kw),
    "bigbird": lambda q, k, v, **kw: fastattn.bigbird_attention(q, k, v, block_size=16, num_random_blocks=1, **kw),
    "linformer": lambda q, k, v, **kw: fastattn.linformer_attention(q, k, v, torch.randn(8, 64), **kw),
    "performer": lambda q, k, v, **kw: fastattn.performer_attention(q, k, v, torch.randn(8, 16), **kw),
}


@pytest.mark.parametrize("scale", (float("inf"), float("nan"), 0.0, -0.5), ids=("inf", "nan", "zero", "negative"))
@pytest.mark.parametrize("name", tuple(PUBLIC_OPS))
def test_every_op_needs_a_positive_finite_scale(name, scale):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"scale: expected a positive finite float or None, got float"):
        PUBLIC_OPS[name](q, k, v, scale=scale)


@pytest.mark.parametrize("empty", ("heads", "batch", "length", "head_dim"))
def test_bigbird_names_the_empty_tensor_not_its_layout_arguments(empty):
    q, k, v = _inputs()
    dim = ("batch", "heads", "length", "head_dim").index(empty)
    q, k, v = (t.narrow(dim, 0, 0) for t in (q, k, v))
    with pytest.raises(ValueError, match=r"^q, k: expected non-empty tensors"):
        fastattn.bigbird_attention(q, k, v, block_size=16)
