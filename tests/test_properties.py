"""Property tests: every public op, on every backend that runs here, against the float64 reference.

Hypothesis draws the shapes (N of 1, primes, below one block), head dims (1..256 on the CPU, 48/80/96
included; 32/64 for Triton), dtypes, per-head and shared layouts with empty rows, padding patterns (a
fully padded batch row included), memory layouts (expanded, transposed, strided rows, heads-last) and
magnitudes; the output and every gradient must pass fastattn.testing's tolerance rule, and NaN in an
input must reach exactly the outputs it touches. The example budget comes from the hypothesis profile
(tests/conftest.py: FASTATTN_HYPOTHESIS_PROFILE=long for a longer run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from fastattn.functional import PERFORMER_KERNELS
from fastattn.testing import check_against_reference, gradient_margin, gradient_rule_exclusion

EXAMPLES = settings.default.max_examples
# the interpreter runs a Triton kernel in up to seconds: half the budget
TRITON_EXAMPLES = max(2, EXAMPLES // 2)

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
LENGTHS = st.one_of(st.sampled_from((1, 2, 3, 5, 7, 11, 13, 17, 31, 37, 61)), st.integers(1, 80))
CPU_HEAD_DIMS = st.one_of(st.sampled_from((1, 3, 32, 48, 64, 80, 96, 128, 256)), st.integers(1, 256))
MEMORY_LAYOUTS = ("contiguous", "expanded", "transposed", "strided_rows", "heads_last")
PADDINGS = ("none", "random", "suffix", "full_batch_row")


class Tensors(dict):
    """A dict of tensors that hypothesis reports by shape, not by value."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{name}: {tuple(value.shape)}" for name, value in self.items()) + "}"


@dataclass
class Problem:
    """Inputs of one op call (float64, before casting to the dtype under test) and how to present them."""

    inputs: dict
    differentiable: tuple[str, ...]
    views: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def present(self, **tensors):
        """The tensors as the op receives them: the same values in the drawn memory layout."""
        return {name: _view(value, self.views.get(name, "contiguous"), self.shapes.get(name))
                if name in self.views else value for name, value in tensors.items()}


def _view(x: torch.Tensor, layout: str, shape) -> torch.Tensor:
    if layout == "expanded":  # x has size 1 where shape does not: a stride-0 view
        return x.expand(shape)
    if layout == "transposed":  # last stride N, as (B, H, D, N) storage transposed
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "strided_rows":  # rows D + 3 apart
        return F.pad(x, (0, 3))[..., : x.shape[-1]]
    if layout == "heads_last":  # (B, N, H, D) storage, as MultiheadAttention's head split
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


@st.composite
def attention_tensors(draw, *, batch, heads, query_len, key_len, head_dim, magnitude):
    """q, k, v in float64 with a drawn memory layout each; expanded ones are stored with size-1 dims."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tensors, views, shapes = Tensors(), {}, {}
    for name, length in (("q", query_len), ("k", key_len), ("v", key_len)):
        shape = (batch, heads, length, head_dim)
        layout = draw(st.sampled_from(MEMORY_LAYOUTS))
        stored = shape
        if layout == "expanded":
            dims = draw(st.sets(st.sampled_from((0, 1, 2)), min_size=1))
            stored = tuple(1 if i in dims else size for i, size in enumerate(shape))
        scale = magnitude if name != "v" else 1.0
        tensors[name] = torch.randn(stored, generator=generator, dtype=torch.float64) * scale
        views[name], shapes[name] = layout, shape
    return tensors, views, shapes


@st.composite
def padding_masks(draw, batch: int, key_len: int):
    pattern = draw(st.sampled_from(PADDINGS))
    if pattern == "none":
        return None
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.zeros(batch, key_len, dtype=torch.bool)
    if pattern == "random":
        mask = torch.rand(batch, key_len, generator=generator) < 0.3
    elif pattern == "suffix":
        mask[:, key_len - draw(st.integers(0, key_len)):] = True
    else:
        mask[draw(st.integers(0, batch - 1))] = True
    return mask


@st.composite
def common(draw, *, head_dims, dtypes, max_batch=3, max_heads=3, lengths=LENGTHS, causal_allowed=True,
           same_lengths=False):
    dtype = draw(st.sampled_from(dtypes))
    batch, heads = draw(st.integers(1, max_batch)), draw(st.integers(1, max_heads))
    query_len = draw(lengths)
    causal = causal_allowed and draw(st.booleans())
    key_len = query_len if causal or same_lengths else draw(lengths)
    head_dim = draw(head_dims)
    magnitude = 1.0 if dtype == torch.float64 else draw(st.sampled_from((1.0, 1.0, 4.0, 16.0)))
    tensors, views, shapes = draw(attention_tensors(batch=batch, heads=heads, query_len=query_len, key_len=key_len,
                                                    head_dim=head_dim, magnitude=magnitude))
    padding = draw(padding_masks(batch, key_len))
    return dict(dtype=dtype, batch=batch, heads=heads, query_len=query_len, key_len=key_len, head_dim=head_dim,
                causal=causal, tensors=tensors, views=views, shapes=shapes, padding=padding, magnitude=magnitude)


@st.composite
def block_layouts(draw, heads: int, query_len: int, key_len: int, block_sizes):
    """Per-head or shared, of any density, with some query-block rows listing no block at all."""
    block_size = draw(st.sampled_from(block_sizes))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout_heads = heads if draw(st.booleans()) else 1
    query_blocks, key_blocks = -(-query_len // block_size), -(-key_len // block_size)
    density = draw(st.sampled_from((0.0, 0.3, 0.7, 1.0)))
    mask = torch.rand(layout_heads, query_blocks, key_blocks, generator=generator) < density
    if draw(st.booleans()):
        diagonal = torch.arange(min(query_blocks, key_blocks))
        mask[:, diagonal, diagonal] = True
    empty_rows = torch.rand(layout_heads, query_blocks, generator=generator) < draw(st.sampled_from((0.0, 0.3)))
    mask[empty_rows] = False
    return fastattn.BlockLayout.from_dense(mask, block_size)


def _check(problem: Problem, kernel: Callable, reference_op: Callable, dtype, exclusion: str | None) -> None:
    """The tolerance rule on the output, and on every gradient unless fastattn.testing excludes them."""
    note(f"gradients excluded: {exclusion}" if exclusion else "gradients checked")

    def run_kernel(**inputs):
        return kernel(**problem.present(**inputs))

    def run_reference(**inputs):
        return reference_op(**problem.present(**inputs))

    check_against_reference(run_kernel, run_reference, problem.inputs, dtype, differentiable=problem.differentiable,
                            backward=exclusion is None, gradient_margin=gradient_margin(dtype))


def _conditioning(params: dict) -> dict:
    """The arguments of fastattn.testing.gradient_rule_exclusion that describe the drawn inputs."""
    constant_values = params["tensors"]["v"].shape[2] == 1 < params["key_len"]
    return dict(magnitude=params["magnitude"], values_constant_over_keys=constant_values)


def _describe(params: dict) -> None:
    note({key: value for key, value in params.items() if key not in ("tensors",)})


# ------------------------------------------------------------------------------------------------
# full attention (scaled_dot_product_attention, any backend of torch)

@settings(max_examples=EXAMPLES)
@given(common(head_dims=CPU_HEAD_DIMS, dtypes=CPU_DTYPES))
def test_full_attention(params):
    _describe(params)
    causal, padding = params["causal"], params["padding"]
    problem = Problem({**params["tensors"], "key_padding_mask": padding}, ("q", "k", "v"), params["views"],
                      params["shapes"])
    _check(problem, lambda **x: fastattn.full_attention(**x, causal=causal),
           lambda **x: reference.full_attention(**x, causal=causal), params["dtype"],
           gradient_rule_exclusion(key_len=params["key_len"], **_conditioning(params)))


# ------------------------------------------------------------------------------------------------
# block-sparse and BigBird: CPU, and Triton in the interpreter

def _block_sparse_property(params, layout, backend):
    _describe({**params, "layout": layout.to_dense().int().tolist(), "block_size": layout.block_size})
    causal = params["causal"]
    problem = Problem({**params["tensors"], "key_padding_mask": params["padding"]}, ("q", "k", "v"), params["views"],
                      params["shapes"])
    _check(problem, lambda **x: fastattn.block_sparse_attention(**x, layout=layout, causal=causal, backend=backend),
           lambda **x: reference.block_sparse_attention(**x, layout=layout, causal=causal), params["dtype"],
           gradient_rule_exclusion(key_len=params["key_len"], **_conditioning(params)))


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_block_sparse_attention_cpu(data):
    params = data.draw(common(head_dims=CPU_HEAD_DIMS, dtypes=CPU_DTYPES))
    layout = data.draw(block_layouts(params["heads"], params["query_len"], params["key_len"], (1, 3, 8, 16, 32, 64)))
    _block_sparse_property(params, layout, "cpu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU)")
@settings(max_examples=TRITON_EXAMPLES)
@given(st.data())
def test_block_sparse_attention_triton(data):
    params = data.draw(common(head_dims=st.sampled_from((32, 64)), dtypes=(torch.float32,), max_batch=2, max_heads=2,
                              lengths=st.one_of(st.sampled_from((1, 7, 16, 17, 31)), st.integers(1, 64))))
    layout = data.draw(block_layouts(params["heads"], params["query_len"], params["key_len"], (16, 32)))
    _block_sparse_property(params, layout, "triton")


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_bigbird_attention_cpu(data):
    params = data.draw(common(head_dims=CPU_HEAD_DIMS, dtypes=CPU_DTYPES, same_lengths=True))
    length = params["query_len"]
    options = dict(block_size=data.draw(st.sampled_from((1, 4, 8, 16))), num_random_blocks=data.draw(st.integers(0, 3)),
                   seed=data.draw(st.integers(0, 100)))
    _describe({**params, **options})
    causal = params["causal"]
    layout = fastattn.bigbird_layout(length, num_heads=params["heads"], causal=causal, **options)
    problem = Problem({**params["tensors"], "key_padding_mask": params["padding"]}, ("q", "k", "v"), params["views"],
                      params["shapes"])
    _check(problem, lambda **x: fastattn.bigbird_attention(**x, causal=causal, backend="cpu", **options),
           lambda **x: reference.block_sparse_attention(**x, layout=layout, causal=causal), params["dtype"],
           gradient_rule_exclusion(key_len=length, **_conditioning(params)))


# ------------------------------------------------------------------------------------------------
# Linformer and Performer (CPU)

@settings(max_examples=EXAMPLES)
@given(st.data())
def test_linformer_attention_cpu(data):
    params = data.draw(common(head_dims=CPU_HEAD_DIMS, dtypes=CPU_DTYPES, causal_allowed=False))
    key_len, heads = params["key_len"], params["heads"]
    projected = data.draw(st.one_of(st.sampled_from((1, 2, 3)), st.integers(1, 24)))
    columns = key_len + data.draw(st.integers(0, 5))  # projections may be longer than the keys
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))

    def projection():
        shape = (heads, projected, columns) if data.draw(st.booleans()) else (projected, columns)
        return torch.randn(shape, generator=generator, dtype=torch.float64) * key_len**-0.5

    inputs = {**params["tensors"], "proj_k": projection(), "key_padding_mask": params["padding"]}
    differentiable = ("q", "k", "v", "proj_k")
    if data.draw(st.booleans()):
        inputs["proj_v"] = projection()
        differentiable += ("proj_v",)
    _describe({**params, "kp": projected, "proj_k": tuple(inputs["proj_k"].shape), "proj_v": "proj_v" in inputs})
    problem = Problem(inputs, differentiable, params["views"], params["shapes"])
    _check(problem, lambda **x: fastattn.linformer_attention(**x, backend="cpu"), reference.linformer_attention,
           params["dtype"], gradient_rule_exclusion(key_len=projected, **_conditioning(params)))


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_performer_attention_cpu(data):
    params = data.draw(common(head_dims=CPU_HEAD_DIMS, dtypes=CPU_DTYPES))
    kernel = data.draw(st.sampled_from(PERFORMER_KERNELS))
    features = data.draw(st.one_of(st.sampled_from((1, 2, 3)), st.integers(1, 64)))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    heads, head_dim = params["heads"], params["head_dim"]
    per_head = data.draw(st.booleans())
    draws = [fastattn.random_features(features, head_dim, generator=generator, dtype=torch.float64)
             for _ in range(heads if per_head else 1)]
    projection = torch.stack(draws) if per_head else draws[0]
    causal = params["causal"]
    _describe({**params, "kernel": kernel, "m": features, "per_head": per_head})
    problem = Problem({**params["tensors"], "projection": projection, "key_padding_mask": params["padding"]},
                      ("q", "k", "v"), params["views"], params["shapes"])
    _check(problem, lambda **x: fastattn.performer_attention(**x, kernel=kernel, causal=causal, backend="cpu"),
           lambda **x: reference.performer_attention(**x, kernel=kernel, causal=causal), params["dtype"],
           gradient_rule_exclusion(key_len=params["key_len"], kernel=kernel, num_features=features,
                                   **_conditioning(params)))


# ------------------------------------------------------------------------------------------------
# NaN propagation: NaN in q or in an unpadded key reaches exactly the outputs that read it

OPS_FOR_NAN = ("full", "block_sparse", "linformer", "performer")


@settings(max_examples=EXAMPLES)
@given(st.data())
def test_nan_reaches_exactly_the_outputs_it_touches(data):
    op = data.draw(st.sampled_from(OPS_FOR_NAN))
    params = data.draw(common(head_dims=st.integers(1, 96), dtypes=CPU_DTYPES, causal_allowed=op != "linformer"))
    tensors = {name: value.expand(params["shapes"][name]).clone() for name, value in params["tensors"].items()}
    padding = params["padding"]
    target = data.draw(st.sampled_from(("q", "k")))
    batch = data.draw(st.integers(0, params["batch"] - 1))
    position = data.draw(st.integers(0, tensors[target].shape[2] - 1))
    if target == "k" and padding is not None and padding[batch, position]:
        padding = padding.clone()  # NaN in a padded key is ignored by the kernels; keep this key
        padding[batch, position] = False
    index = (batch, data.draw(st.integers(0, params["heads"] - 1)), position,
             data.draw(st.integers(0, params["head_dim"] - 1)))
    tensors[target][index] = float("nan")
    causal = params["causal"]
    generator = torch.Generator().manual_seed(0)
    batches, heads, query_len, key_len = params["batch"], params["heads"], params["query_len"], params["key_len"]
    # which (query, key) pairs each output reads: DESIGN's semantics, not the reference's (the Performer
    # reference turns a NaN normaliser into a zero row)
    allowed = torch.ones(batches, heads, query_len, key_len, dtype=torch.bool)
    if op == "full":
        kernel = lambda **x: fastattn.full_attention(**x, causal=causal)  # noqa: E731
        extra = {}
    elif op == "block_sparse":
        layout = data.draw(block_layouts(heads, query_len, key_len, (1, 3, 8, 16)))
        kernel = lambda **x: fastattn.block_sparse_attention(**x, layout=layout, causal=causal, backend="cpu")  # noqa: E731
        size = layout.block_size
        blocks = layout.to_dense().repeat_interleave(size, 1).repeat_interleave(size, 2)
        allowed &= blocks[:, :query_len, :key_len].unsqueeze(0)
        extra = {}
    elif op == "linformer":  # every query reads the kp projections of all keys (padded keys are zeroed)
        kernel = lambda **x: fastattn.linformer_attention(**x, backend="cpu")  # noqa: E731
        extra = {"proj_k": torch.randn(4, key_len, generator=generator, dtype=torch.float64)}
    else:
        kernel = lambda **x: fastattn.performer_attention(**x, causal=causal, backend="cpu")  # noqa: E731
        extra = {"projection": fastattn.random_features(16, params["head_dim"], generator=generator,
                                                        dtype=torch.float64)}
    if op != "linformer":
        if padding is not None:
            allowed &= ~padding[:, None, None, :]
        if causal:
            allowed &= torch.ones(query_len, key_len, dtype=torch.bool).tril()
    touched = torch.zeros(batches, heads, query_len, dtype=torch.bool)
    if target == "q":  # its row, unless the row sees no key (zeros)
        touched[index[:3]] = allowed[index[:3]].any()
    else:  # every row that reads the key
        touched[index[:2]] = allowed[index[0], index[1], :, position]
    _describe({**params, "op": op, "nan_in": target, "index": index})
    dtype = params["dtype"]
    actual = kernel(**{name: value.to(dtype) for name, value in {**tensors, **extra}.items()}, key_padding_mask=padding)
    expected = touched.unsqueeze(-1).expand(actual.shape)
    assert torch.equal(torch.isnan(actual), expected), (
        f"NaN outputs (batch, head, query) {torch.isnan(actual).any(-1).nonzero().tolist()}, expected "
        f"{touched.nonzero().tolist()}"
    )


@pytest.mark.parametrize("padded", (False, True), ids=("no_padding", "padding"))
def test_full_attention_keeps_the_nan_of_a_query_row(padded):
    """torch's CPU scaled_dot_product_attention returns zeros for a query row holding NaN."""
    q, k, v = (torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    q[0, 0, 1, 2] = float("nan")
    padding = torch.tensor([[False, False, True, False]]) if padded else None
    out = fastattn.full_attention(q, k, v, key_padding_mask=padding)
    assert torch.isnan(out[0, 0, 1]).all() and not torch.isnan(out[0, 0, [0, 2, 3]]).any()


def test_full_attention_keeps_the_nan_of_the_only_key_a_row_reads():
    """Causal row 0 reads key 0 only: NaN there makes all its scores NaN, which torch's CPU kernel turns into 0."""
    q, k, v = (torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    k[0, 0, 0, 5] = float("nan")
    out = fastattn.full_attention(q, k, v, causal=True)
    assert torch.isnan(out).all()
    query_nan = q.clone()
    query_nan[0, 0, 2, 0] = float("nan")
    out = fastattn.full_attention(query_nan, k.nan_to_num(), v, causal=True)
    assert torch.isnan(out[0, 0, 2]).all() and not torch.isnan(out[0, 0, [0, 1, 3]]).any()

