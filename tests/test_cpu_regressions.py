"""Regressions of the CPU kernels (csrc/cpu) found by fuzzing (issue 10), each against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import check_against_reference
from tests.utils import assert_nan_queries_reach_only_what_they_read, describe_case, run_with_thread_counts

MECHANISMS = ["block_sparse", "linformer", "performer"]
BLOCK_SIZE = 16


def _projection(mechanism: str, dim: int, key_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if mechanism == "linformer":
        return torch.randn(3, key_len, generator=generator, dtype=torch.float64) / key_len**0.5
    return torch.randn(8, dim, generator=generator, dtype=torch.float64)


def _call(mechanism: str, q, k, v, extra, *, cpu: bool, causal: bool = False, key_padding_mask=None):
    """The public op (backend "cpu") or its reference; ``extra`` is the projection (the layout for block_sparse)."""
    module = fastattn if cpu else reference
    if mechanism == "full":
        return module.full_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    backend = {"backend": "cpu"} if cpu else {}
    if mechanism == "block_sparse":
        layout = fastattn.BlockLayout.from_dense(torch.ones(-(-q.shape[2] // BLOCK_SIZE), -(-k.shape[2] // BLOCK_SIZE),
                                                            dtype=torch.bool), BLOCK_SIZE)
        return module.block_sparse_attention(q, k, v, layout, causal=causal, key_padding_mask=key_padding_mask,
                                             **backend)
    if mechanism == "linformer":
        return module.linformer_attention(q, k, v, extra.to(q.dtype), key_padding_mask=key_padding_mask, **backend)
    kernel = "relu" if mechanism == "performer_relu" else "softmax"
    return module.performer_attention(q, k, v, extra.to(q.dtype), kernel=kernel, causal=causal,
                                      key_padding_mask=key_padding_mask, **backend)


# Layouts whose size-1 dims keep a stride smaller than a row, or whose rows overlap: each makes (q, k, v) in that
# layout from contiguous tensors. Before the kernels normalised strides, BLAS got them as leading dimensions
# (float64 Linformer: garbage outputs and gradients). The tensors in that layout are the leaves, so the
# gradients are compared per position.
LAYOUTS = {
    # issue 10's repro: one key; the kernels' transposed projections have rows one element apart
    "single-key": ((1, 1, 4, 8), (1, 1, 1, 8), lambda q, k, v: (q, k, v)),
    # k one row expanded to (B, H, N, D) (every stride 0 but the last: rows overlap), v one head's rows expanded
    # over B and H (with v one row too, every exact gradient of k is 0 and the rule's bound is noise)
    "expanded-kv": ((2, 2, 5, 8), (1, 1, 6, 8),
                    lambda q, k, v: (q, k[:, :, :1].expand(2, 2, 6, 8), v.expand(2, 2, 6, 8))),
    # q (B, H, D, 1) transposed to (B, H, 1, D): torch calls it contiguous, its rows are 1 element apart
    "transposed-q": ((2, 2, 8, 1), (2, 2, 6, 8), lambda q, k, v: (q.transpose(2, 3), k, v)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_size_one_and_expanded_dims_match_reference(mechanism, layout, dtype):
    q_shape, kv_shape, build = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(0)
    q, k, v = build(*(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
                      for shape in (q_shape, kv_shape, kv_shape)))
    extra = _projection(mechanism, q.shape[-1], k.shape[2], seed=1)

    def run(cpu):
        return lambda q, k, v: _call(mechanism, q, k, v, extra, cpu=cpu)

    if dtype != torch.float64:
        check_against_reference(run(True), run(False), {"q": q, "k": k, "v": v}, dtype)
        return
    # In float64 the rule's bound is the reference's own rounding: compare to a few ulps instead.
    tensors = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, out_ref = run(True)(*tensors), run(False)(*expected)
    grad = torch.randn(out_ref.shape, generator=generator, dtype=torch.float64)
    out.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name, tensor, tensor_ref in zip("qkv", tensors, expected):
        torch.testing.assert_close(tensor.grad, tensor_ref.grad, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")


def _performer_inputs(std: float, length: int = 32, dim: int = 32, features: int = 64, seed: int = 3, heads: int = 1):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, dim, generator=generator, dtype=torch.float64) * s for s in (std, std, 1))
    return {"q": q, "k": k, "v": v, "projection": torch.randn(features, dim, generator=generator, dtype=torch.float64)}


@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_performer_features_that_underflow_weigh_nothing(causal):
    # Issue 10's repro: |q|, |k| of std 16 put most features far below their stabiliser. They used to weigh
    # e^-87 each instead of 0 and, summed over the keys, swamp the true weights (0.25 off in float32).
    def run(cpu):
        return lambda q, k, v, projection: _call("performer", q, k, v, projection, cpu=cpu, causal=causal)

    check_against_reference(run(True), run(False), _performer_inputs(16), torch.float32)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_performer_normaliser_never_underflows(causal, seed):
    # At |q|, |k| of std 16 a query's best feature can meet keys far below one stabiliser shared by all
    # features: its normaliser fell below float32's range and the row came out 0 (13 of these 20 seeds failed
    # the rule, by up to 4e4x; causal 7, by up to 6e4x). Per-feature key stabilisers (running maxima when
    # causal) keep every normaliser >= 1. The float32
    # reference's own gradients overflow here, so the rule checks the output and the gradients must be finite.
    inputs = _performer_inputs(16, length=100, seed=seed, heads=2)

    def run(cpu):
        return lambda q, k, v, projection: _call("performer", q, k, v, projection, cpu=cpu, causal=causal)

    check_against_reference(run(True), run(False), inputs, torch.float32, backward=False)
    grads = {name: value.float().requires_grad_() for name, value in inputs.items() if name in "qkv"}
    fastattn.performer_attention(**grads, projection=inputs["projection"].float(), causal=causal,
                                 backend="cpu").sum().backward()
    for name, value in grads.items():
        assert torch.isfinite(value.grad).all(), f"grad of {name} is not finite"


@pytest.mark.parametrize("std", [30, 60])
@pytest.mark.parametrize("causal", [False, True], ids=["global", "causal"])
def test_performer_backward_finite_where_forward_is(causal, std):
    # Normalisers that underflow: their inverse overflowed in the backward (NaN dq, dk at std 30) while the
    # forward stayed finite. The float32 reference's own gradients are not finite here, so this checks finiteness.
    inputs = {name: value.float().requires_grad_() for name, value in _performer_inputs(std).items()}
    out = fastattn.performer_attention(inputs["q"], inputs["k"], inputs["v"], inputs["projection"].detach(),
                                       causal=causal, backend="cpu")
    assert torch.isfinite(out).all()
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
    for name in "qkv":
        assert torch.isfinite(inputs[name].grad).all(), f"grad of {name} is not finite"


def _saturated_linformer_inputs(kp: int):
    # q along the first projected key, so that every row's softmax saturates on it: p == 1 in float32, and
    # the exact dS is 0 (kp == 1) or about e^-40 times dP.
    generator = torch.Generator().manual_seed(0)
    batch, heads, length, dim = 2, 2, 32, 32
    k, v = (torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    proj_k = torch.randn(kp, length, generator=generator, dtype=torch.float64) / length**0.5
    first_key = torch.einsum("n,bhnd->bhd", proj_k[0], k)[:, :, None]
    q = 10 * first_key + 0.1 * torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64)
    return {"q": q, "k": k, "v": v, "proj_k": proj_k}


@pytest.mark.parametrize("kp", [1, 4])
def test_linformer_saturated_rows_have_exact_zero_score_gradients(kp):
    # dS = P (dP - delta) with delta taken from the output rounded to bfloat16 left a residue of its rounding
    # on rows with p == 1 (dq 1.5e-2 where it is exactly 0 with kp == 1).
    def run(cpu):
        return lambda q, k, v, proj_k: _call("linformer", q, k, v, proj_k, cpu=cpu)

    check_against_reference(run(True), run(False), _saturated_linformer_inputs(kp), torch.bfloat16,
                            ("q", "k", "v", "proj_k"))


# NaN semantics (DESIGN.md): NaN in an input reaches every output it touches; a row that sees no key gives 0;
# padded keys are ignored, whatever they hold. The references differ in two places, so these tests state
# the contract directly: reference.performer_attention gives 0 for a row whose normaliser is NaN, and the
# references mask padded keys by multiplying by 0 (or through 0 probabilities in a dense product), which
# turns a NaN in a padded position into NaN outputs.
NAN_MODES = [(mechanism, causal) for mechanism in MECHANISMS for causal in (False, True) if mechanism != "linformer"
             or not causal]
# The NaN tests also take the Performer's relu features, whose relu(NaN) was 0 (a NaN in q or k vanished), and
# full attention, where a NaN in a padded key reached every row (scaled_dot_product_attention's additive mask).
NAN_FEATURE_MODES = NAN_MODES + [("performer_relu", False), ("performer_relu", True), ("full", False), ("full", True)]


def _nan_case(mechanism, causal, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    return q, k, v, _projection(mechanism, 16, 40, seed)


@pytest.mark.parametrize("mechanism,causal", NAN_FEATURE_MODES,
                         ids=[describe_case(m=m, causal=c) for m, c in NAN_FEATURE_MODES])
def test_nan_in_a_query_reaches_its_row_only(mechanism, causal):
    # Issue 10: q[0, 0, 3, 1] = nan gave a zero output row in the block-sparse kernel.
    q, k, v, extra = _nan_case(mechanism, causal)
    q[0, 0, 3, 1] = float("nan")
    out = _call(mechanism, q, k, v, extra, cpu=True, causal=causal)
    nan_rows = torch.isnan(out).any(-1)
    assert torch.isnan(out[0, 0, 3]).all()
    assert nan_rows.sum() == 1
    expected = _call(mechanism, q, k, v, extra, cpu=False, causal=causal)
    torch.testing.assert_close(out[~nan_rows], expected[~nan_rows], rtol=1e-10, atol=1e-10)


def test_nan_in_a_query_reaches_bigbird_output():
    q, k, v, _ = _nan_case("block_sparse", False)
    q[0, 0, 3, 1] = float("nan")
    out = fastattn.bigbird_attention(q.float(), k.float(), v.float(), block_size=BLOCK_SIZE, backend="cpu")
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, 4:]).all()


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("mechanism,causal", NAN_FEATURE_MODES,
                         ids=[describe_case(m=m, causal=c) for m, c in NAN_FEATURE_MODES])
def test_nan_in_a_key_reaches_every_row_that_sees_it(mechanism, causal, name):
    q, k, v, extra = _nan_case(mechanism, causal)
    position = 25
    {"k": k, "v": v}[name][1, 0, position, 2] = float("nan")
    out = _call(mechanism, q, k, v, extra, cpu=True, causal=causal)
    sees_it = torch.arange(40) >= position if causal else torch.ones(40, dtype=torch.bool)
    assert torch.isnan(out[1, 0, sees_it]).any(-1).all()  # a NaN in v reaches its own column
    if name == "k":  # (a NaN in v still reaches the earlier rows of its causal block: 0 * NaN in P V)
        assert torch.isfinite(out[1, 0, ~sees_it]).all()
    # Other heads and batch elements never see it.
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mechanism,causal", NAN_FEATURE_MODES,
                         ids=[describe_case(m=m, causal=c) for m, c in NAN_FEATURE_MODES])
def test_nan_in_a_query_reaches_only_what_it_reads(mechanism, causal, dtype):
    # The CPU Performer gave NaN outputs for a NaN query that sees no key (phi(q) . 0), and NaN gradients to the
    # padded keys' values; the block-sparse kernel NaN gradients to padded keys (dS^T Q with 0 * NaN).
    extra = _projection(mechanism, 32, 40, 0)
    assert_nan_queries_reach_only_what_they_read(
        lambda q, k, v, mask: _call(mechanism, q, k, v, extra, cpu=True, causal=causal, key_padding_mask=mask),
        causal=causal, dtype=dtype, rows_without_keys=mechanism != "linformer")


@pytest.mark.parametrize("mechanism,causal", NAN_FEATURE_MODES,
                         ids=[describe_case(m=m, causal=c) for m, c in NAN_FEATURE_MODES])
def test_nan_in_padded_keys_changes_nothing(mechanism, causal):
    q, k, v, extra = _nan_case(mechanism, causal)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 30:] = True
    mask[1, ::3] = True
    if not causal:
        mask[1, :] = True  # a batch element with every key padded: its rows see no key and give 0

    def run(k, v):
        tensors = [t.clone().requires_grad_() for t in (q, k, v)]
        out = _call(mechanism, *tensors, extra, cpu=True, causal=causal, key_padding_mask=mask)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in tensors]

    padded = mask[:, None, :, None]
    poisoned = run(k.masked_fill(padded, float("nan")), v.masked_fill(padded, float("inf")))
    for got, expected in zip(poisoned, run(k.masked_fill(padded, 0), v.masked_fill(padded, 0))):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if not causal:
        assert (poisoned[0][1] == 0).all()


# Grouped-query attention (issue 12): k and v with Hkv heads, query head h reading kv head h // (H // Hkv),
# natively in the kernels, through the op-level calls. The reference gets k and v repeated per query head,
# so autograd sums the gradients of each group.
GQA_CASES = [  # (mechanism, B, H, Hkv, N, D, causal, padding)
    ("block_sparse", 2, 4, 1, 70, 32, False, True),
    ("block_sparse", 1, 6, 2, 50, 16, True, False),
    ("block_sparse", 2, 4, 2, 33, 64, True, True),
    ("linformer", 2, 4, 1, 70, 32, False, True),
    ("linformer", 1, 6, 3, 50, 16, False, False),
    ("performer", 2, 4, 2, 70, 32, False, True),
    ("performer", 1, 6, 2, 90, 16, True, True),
    ("performer", 2, 4, 1, 33, 32, True, False),
]


def _gqa_inputs(mechanism, batch, heads, kv_heads, length, dim, padding, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    inputs = {"q": torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype),
              "k": torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=dtype),
              "v": torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=dtype)}
    if mechanism == "linformer":  # per query head, as the projections stay with GQA
        inputs["proj_k"] = torch.randn(heads, 12, length, generator=generator, dtype=dtype) / length**0.5
        inputs["proj_v"] = torch.randn(heads, 12, length, generator=generator, dtype=dtype) / length**0.5
    elif mechanism == "performer":
        inputs["projection"] = torch.stack([fastattn.random_features(24, dim, generator=generator, dtype=dtype)
                                            for _ in range(heads)])
    if padding:
        mask = torch.rand(batch, length, generator=generator) < 0.25
        mask[-1, length // 2:] = True
        inputs["key_padding_mask"] = mask
    return inputs


def _gqa_fn(mechanism, causal, *, kernel: bool):
    """The op-level call (k, v with Hkv heads) or the reference on k, v repeated to H heads."""
    from fastattn.ops import block_sparse as block_sparse_ops, linformer as linformer_ops, performer as performer_ops

    def run(q, k, v, key_padding_mask=None, **extra):
        if not kernel:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        scale = q.shape[-1] ** -0.5
        if mechanism == "block_sparse":
            layout = fastattn.bigbird_layout(q.shape[2], block_size=BLOCK_SIZE, num_heads=q.shape[1],
                                             num_random_blocks=1, seed=2, causal=causal)
            call = block_sparse_ops.block_sparse_attention if kernel else reference.block_sparse_attention
            return call(q, k, v, layout, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        if mechanism == "linformer":
            call = linformer_ops.linformer_attention if kernel else reference.linformer_attention
            return call(q, k, v, extra["proj_k"], extra["proj_v"], key_padding_mask=key_padding_mask, scale=scale)
        call = performer_ops.performer_attention if kernel else reference.performer_attention
        return call(q, k, v, extra["projection"], kernel="softmax", causal=causal, key_padding_mask=key_padding_mask,
                    scale=scale)
    return run


def _gqa_differentiable(mechanism):
    return ("q", "k", "v") + (("proj_k", "proj_v") if mechanism == "linformer" else ())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GQA_CASES, ids=[
    describe_case(m=m, B=b, H=h, Hkv=hkv, N=n, D=d, causal=c, padding=p) for m, b, h, hkv, n, d, c, p in GQA_CASES
])
def test_grouped_query_attention_matches_reference(case, dtype):
    mechanism, batch, heads, kv_heads, length, dim, causal, padding = case
    inputs = _gqa_inputs(mechanism, batch, heads, kv_heads, length, dim, padding)
    check_against_reference(_gqa_fn(mechanism, causal, kernel=True), _gqa_fn(mechanism, causal, kernel=False), inputs,
                            dtype, _gqa_differentiable(mechanism))


@pytest.mark.parametrize("mechanism,causal", NAN_MODES, ids=[describe_case(m=m, causal=c) for m, c in NAN_MODES])
def test_grouped_query_attention_gradcheck(mechanism, causal):
    inputs = _gqa_inputs(mechanism, 1, 4, 2, 20, 8, padding=True)
    names = _gqa_differentiable(mechanism)
    tensors = [inputs[name].requires_grad_() for name in names]
    rest = {name: value for name, value in inputs.items() if name not in names}
    fn = _gqa_fn(mechanism, causal, kernel=True)
    assert torch.autograd.gradcheck(lambda *args: fn(**dict(zip(names, args)), **rest), tensors, eps=1e-6, atol=1e-5,
                                    rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("mechanism,causal", NAN_MODES, ids=[describe_case(m=m, causal=c) for m, c in NAN_MODES])
def test_grouped_query_gradients_do_not_depend_on_thread_count(mechanism, causal):
    inputs = _gqa_inputs(mechanism, 2, 8, 2, 300, 32, padding=True, dtype=torch.float32)
    names = _gqa_differentiable(mechanism)
    fn = _gqa_fn(mechanism, causal, kernel=True)

    def grads():
        tensors = {name: value.clone().requires_grad_() if name in names else value for name, value in inputs.items()}
        out = fn(**tensors)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [tensors[name].grad for name in names]

    single, several = run_with_thread_counts(grads, (1, 4))
    for got, expected in zip(several, single):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_grouped_query_ops_pass_opcheck(mechanism):
    # The fake kernels give the kernels' shapes with Hkv < H (dK, dV with Hkv heads; Performer's saved key
    # stabiliser per query head).
    inputs = _gqa_inputs(mechanism, 2, 4, 2, 40, 16, padding=True, dtype=torch.float32)
    q, k, v, mask = (inputs[name].requires_grad_() if name != "key_padding_mask" else inputs[name]
                     for name in ("q", "k", "v", "key_padding_mask"))
    if mechanism == "block_sparse":
        layout = fastattn.bigbird_layout(40, block_size=BLOCK_SIZE, num_heads=4, num_random_blocks=1, causal=True)
        torch.library.opcheck(torch.ops.fastattn.block_sparse_fwd.default,
                              (q, k, v, *layout.csr("cpu"), BLOCK_SIZE, True, mask, 0.25))
    elif mechanism == "linformer":
        proj_k, proj_v = (inputs[name].requires_grad_() for name in ("proj_k", "proj_v"))
        torch.library.opcheck(torch.ops.fastattn.linformer_fwd.default, (q, k, v, proj_k, proj_v, mask, 0.25))
    else:
        for causal in (False, True):
            torch.library.opcheck(torch.ops.fastattn.performer_fwd.default,
                                  (q, k, v, inputs["projection"], "softmax", causal, mask, 0.25))
