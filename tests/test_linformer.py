"""Linformer attention on the CPU backend (csrc/cpu/linformer.cpp) against fastattn.reference."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import linformer as linformer_ops
from fastattn.testing import check_against_reference
from tests.utils import (CPU_DTYPE_IDS, CPU_DTYPES, allow_bf16_products, cpu_has_bf16_units, describe_case,
                         run_with_thread_counts)

EXTRA_LENGTH = 9  # projections are made longer than the sequence: the functional layer slices them


def _inputs(batch, heads, length, dim, kp, *, per_head=False, shared=False, padding=False, seed=0,
            dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) for _ in range(3))
    shape = (heads, kp, length + EXTRA_LENGTH) if per_head else (kp, length + EXTRA_LENGTH)
    inputs = {"q": q, "k": k, "v": v}
    inputs["proj_k"] = torch.randn(shape, generator=generator, dtype=dtype) / length**0.5
    if not shared:
        inputs["proj_v"] = torch.randn(shape, generator=generator, dtype=dtype) / length**0.5
    if padding:
        mask = torch.rand(batch, length, generator=generator) < 0.3
        mask[-1] = True  # the last batch element is all padding
        inputs["key_padding_mask"] = mask
    return inputs


def _cpu(q, k, v, proj_k, proj_v=None, key_padding_mask=None):
    return fastattn.linformer_attention(q, k, v, proj_k, proj_v, key_padding_mask=key_padding_mask, backend="cpu")


def _reference(q, k, v, proj_k, proj_v=None, key_padding_mask=None):
    return reference.linformer_attention(q, k, v, proj_k, proj_v, key_padding_mask=key_padding_mask)


# (B, H, N, D, kp, per_head, shared, padding)
CASES = [
    (2, 3, 1, 32, 16, False, False, False),
    (1, 2, 7, 32, 16, True, False, True),
    (2, 2, 63, 64, 32, False, True, True),
    (1, 2, 64, 64, 64, True, True, False),
    (2, 1, 65, 32, 130, False, False, True),
    (1, 2, 200, 128, 48, True, False, False),
    (1, 1, 1000, 16, 64, False, False, True),
    (2, 2, 300, 32, 256, True, False, True),
    (1, 1, 70, 256, 20, False, False, True),
    (1, 1, 1280, 16, 32, False, False, False),  # 5 query tiles: with 2 threads, the last backward split is empty
    (2, 2, 3000, 32, 64, True, False, True),  # sums over thousands of keys and queries keep BLAS-like rounding
    (1, 2, 33, 24, 17, True, False, True),  # odd kp: bf16 products over it read a zero pad
    (1, 1, 31, 33, 16, False, False, True),  # odd head dim: bfloat16 takes float32 products
]


@pytest.mark.parametrize("dtype, bf16_products", CPU_DTYPES, ids=CPU_DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[
    describe_case(B=b, H=h, N=n, D=d, kp=kp, per_head=p, shared=s, padding=pad) for b, h, n, d, kp, p, s, pad in CASES
])
def test_matches_reference(case, dtype, bf16_products, monkeypatch):
    allow_bf16_products(monkeypatch, bf16_products)
    batch, heads, length, dim, kp, per_head, shared, padding = case
    inputs = _inputs(batch, heads, length, dim, kp, per_head=per_head, shared=shared, padding=padding)
    differentiable = ("q", "k", "v", "proj_k") + (() if shared else ("proj_v",))
    check_against_reference(_cpu, _reference, inputs, dtype, differentiable)


@pytest.mark.skipif(not cpu_has_bf16_units(), reason="one bfloat16 path only on a CPU without bf16 units")
def test_bf16_products_switch_changes_the_path(monkeypatch):
    inputs = {name: t.bfloat16().requires_grad_() for name, t in _inputs(1, 2, 100, 32, 24, padding=True).items()
              if name != "key_padding_mask"}
    results = []
    for allowed in (True, False):
        allow_bf16_products(monkeypatch, allowed)
        out = _cpu(**inputs)
        results.append([out, *torch.autograd.grad(out, list(inputs.values()), torch.ones_like(out))])
    for with_bf16, with_float32 in zip(*results):
        assert not torch.equal(with_bf16, with_float32), "bf16 products round K', V', P and dS to bfloat16"


@pytest.mark.parametrize("dtype, bf16_products", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_strided_inputs_match_reference(dtype, bf16_products, monkeypatch):
    allow_bf16_products(monkeypatch, bf16_products)
    # q, k, v laid out as (B, N, H, D) and viewed as (B, H, N, D): the rows of a head are H * D apart, and
    # the kernel reads float32 rows in place with that stride.
    batch, heads, length, dim = 2, 3, 300, 32
    inputs = _inputs(batch, heads, length, dim, 40, padding=True)
    for name in ("q", "k", "v"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)

    def strided_cpu(q, k, v, **rest):
        assert q.stride(2) == k.stride(2) == v.stride(2) == heads * dim
        return _cpu(q, k, v, **rest)

    check_against_reference(strided_cpu, _reference, inputs, dtype, ("q", "k", "v", "proj_k", "proj_v"))


GRADCHECK_CASES = [(False, False), (True, False), (False, True)]


@pytest.mark.parametrize("per_head,padding", GRADCHECK_CASES,
                         ids=["shared-projections", "per-head-proj_v-is-proj_k", "shared-projections-padding"])
def test_gradcheck(per_head, padding):
    # 130 queries span two query tiles of the kernel; proj_v is the same tensor as proj_k in one case.
    inputs = _inputs(2, 2, 130, 4, 5, per_head=per_head, shared=per_head, padding=padding)
    inputs["key_padding_mask"] = inputs.get("key_padding_mask")
    names = ("q", "k", "v", "proj_k") + (() if per_head else ("proj_v",))
    tensors = [inputs[name].requires_grad_() for name in names]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        return _cpu(given["q"], given["k"], given["v"], given["proj_k"], given.get("proj_v"),
                    inputs["key_padding_mask"])

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-projection", "per-head-projection"])
def test_opcheck(per_head):
    inputs = _inputs(2, 2, 70, 16, 12, per_head=per_head, padding=True, dtype=torch.float32)
    tensors = [inputs[name].requires_grad_() for name in ("q", "k", "v", "proj_k", "proj_v")]
    length = inputs["q"].shape[2]
    args = (*tensors[:3], tensors[3][..., :length], tensors[4][..., :length], inputs["key_padding_mask"], 0.25)
    torch.library.opcheck(torch.ops.fastattn.linformer_fwd.default, args)


def test_compile_fullgraph_matches_eager():
    # The op's differentiable call, which both the CPU and CUDA backends use (backend selection is outside it).
    inputs = _inputs(2, 2, 80, 16, 24, per_head=True, padding=True, dtype=torch.float32)
    length = inputs["q"].shape[2]

    def fn(q, k, v, proj_k, proj_v):
        return linformer_ops.linformer_attention(q, k, v, proj_k[..., :length], proj_v[..., :length],
                                                 key_padding_mask=inputs["key_padding_mask"], scale=0.25)

    def outputs_and_grads(function):
        tensors = [inputs[name].clone().requires_grad_() for name in ("q", "k", "v", "proj_k", "proj_v")]
        out = function(*tensors)
        out.square().sum().backward()
        return [out.detach()] + [t.grad for t in tensors]

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    for eager, traced in zip(outputs_and_grads(fn), outputs_and_grads(compiled)):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_padded_keys_change_nothing():
    inputs = _inputs(2, 2, 90, 16, 24, per_head=True, padding=True, dtype=torch.float32)
    mask = inputs["key_padding_mask"]

    def run(k, v):
        q, proj_k = inputs["q"].clone().requires_grad_(), inputs["proj_k"].clone().requires_grad_()
        out = _cpu(q, k, v, proj_k, inputs["proj_v"], mask)
        out.sum().backward()
        return out.detach(), q.grad, proj_k.grad

    padded = mask[:, None, :, None]
    k = torch.where(padded, torch.randn_like(inputs["k"]) * 20, inputs["k"])
    v = torch.where(padded, torch.randn_like(inputs["v"]) * 20, inputs["v"])
    for changed, original in zip(run(k, v), run(inputs["k"], inputs["v"])):
        torch.testing.assert_close(changed, original, rtol=1e-6, atol=1e-6)


def test_shared_projection_gets_the_sum_of_both_gradients():
    inputs = _inputs(1, 2, 50, 16, 8, dtype=torch.float32)
    proj = inputs["proj_k"].requires_grad_()
    _cpu(inputs["q"], inputs["k"], inputs["v"], proj).square().sum().backward()
    separate = [inputs["proj_k"].detach().clone().requires_grad_() for _ in range(2)]
    _cpu(inputs["q"], inputs["k"], inputs["v"], *separate).square().sum().backward()
    torch.testing.assert_close(proj.grad, separate[0].grad + separate[1].grad)


# The backward splits each head's sums over its 5 query tiles into parts, whose number must not follow the
# number of threads.
@pytest.mark.parametrize("dtype, bf16_products", CPU_DTYPES, ids=CPU_DTYPE_IDS)
def test_backward_same_bits_whatever_the_thread_count(dtype, bf16_products, monkeypatch):
    allow_bf16_products(monkeypatch, bf16_products)
    inputs = _inputs(1, 1, 1100, 16, 24, dtype=torch.float32)
    names = ("q", "k", "v", "proj_k", "proj_v")

    def outputs_and_grads():
        tensors = [inputs[name].to(dtype).clone().requires_grad_() for name in names]
        out = _cpu(*tensors)
        out.float().square().sum().backward()
        return [out] + [t.grad for t in tensors]

    results = run_with_thread_counts(outputs_and_grads, (1, max(torch.get_num_threads(), 4)))
    for name, first, again in zip(("out",) + names, *results):
        assert torch.equal(first, again), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_inputs_stay_finite(dtype):
    inputs = _inputs(1, 2, 130, 64, 32, padding=True, dtype=torch.float32)
    tensors = [(inputs[name] * 4).to(dtype).requires_grad_() for name in ("q", "k", "v", "proj_k", "proj_v")]
    out = _cpu(*tensors, inputs["key_padding_mask"])
    out.float().square().sum().backward()
    for name, value in zip(("out", "q", "k", "v", "proj_k", "proj_v"), [out] + [t.grad for t in tensors]):
        assert torch.isfinite(value).all(), f"{name} has non-finite values"


@pytest.mark.parametrize("proj_k_shape,proj_v_shape,message", [
    ((8, 19), None, "proj_k: expected N >= 20"),
    ((3, 8, 30), None, "proj_k: expected shape"),
    ((8, 30), (6, 30), "proj_v: expected kp = 8"),
    ((8, 30), (2, 8, 10), "proj_v: expected N >= 20"),
], ids=["too-short", "wrong-heads", "kp-mismatch", "proj_v-too-short"])
def test_bad_projection_is_rejected(proj_k_shape, proj_v_shape, message):
    inputs = _inputs(1, 2, 20, 16, 8, dtype=torch.float32)
    proj_v = None if proj_v_shape is None else torch.randn(proj_v_shape)
    with pytest.raises(ValueError, match=message):
        _cpu(inputs["q"], inputs["k"], inputs["v"], torch.randn(proj_k_shape), proj_v)


def test_compiled_op_rejects_projection_that_does_not_fit():
    inputs = _inputs(1, 2, 20, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"proj_k: expected shape \(kp, 20\)"):
        torch.ops.fastattn.linformer_fwd(inputs["q"], inputs["k"], inputs["v"], torch.randn(8, 30), torch.randn(8, 20),
                                         None, 0.25)
