"""The tolerance rule of fastattn's tests, for users' CI too: a kernel against the float64 reference.

For every output and every gradient, the kernel's max error against the reference evaluated in float64
must be at most 2x the error of the same reference run in the kernel's dtype, plus 2x the dtype's
rounding noise at the output's magnitude (FlashAttention's rule)::

    from fastattn import reference
    from fastattn.testing import check_against_reference

    check_against_reference(my_attention, reference.full_attention, {"q": q, "k": k, "v": v}, torch.bfloat16)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def forward_backward(fn: Callable[..., Tensor], inputs: dict[str, Tensor], grad_out: Tensor | None,
                     dtype: torch.dtype, differentiable: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``fn`` on ``inputs`` cast to ``dtype`` (float tensors only); return the output and the gradients."""
    cast = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            value = value.detach().to(dtype).requires_grad_(name in differentiable)
        cast[name] = value
    out = fn(**cast)
    grads = {}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = {name: cast[name].grad for name in differentiable}
    return out.detach(), grads


def tolerance(reference64: Tensor, reference_low: Tensor, dtype: torch.dtype) -> float:
    """2x the error of the reference run in ``dtype``, plus 2x dtype's rounding noise at the output's magnitude."""
    reference_error = (reference_low.double() - reference64).abs().max().item()
    noise = torch.finfo(dtype).eps * reference64.abs().max().item()
    return 2 * reference_error + 2 * noise


def assert_within_tolerance(name: str, actual: Tensor, reference64: Tensor, reference_low: Tensor, dtype) -> None:
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: has {(~torch.isfinite(actual)).sum().item()} non-finite values"
    error = (actual.double() - reference64).abs().max().item()
    bound = tolerance(reference64, reference_low, dtype)
    assert error <= bound, f"{name}: max error {error:.3e} exceeds {bound:.3e} (tolerance rule, {dtype})"


def check_against_reference(kernel: Callable[..., Tensor], reference: Callable[..., Tensor], inputs: dict[str, Tensor],
                            dtype: torch.dtype, differentiable: tuple[str, ...] = ("q", "k", "v"),
                            backward: bool = True, seed: int = 0) -> None:
    """The tolerance rule on the output and every gradient: kernel in ``dtype`` vs reference in float64."""
    generator = torch.Generator().manual_seed(seed)
    reference64, _ = forward_backward(reference, inputs, None, torch.float64, differentiable)
    grad_out = torch.randn(reference64.shape, generator=generator, dtype=torch.float64).to(reference64.device) if backward else None
    reference64, grads64 = forward_backward(reference, inputs, grad_out, torch.float64, differentiable)
    reference_low, grads_low = forward_backward(reference, inputs, grad_out, dtype, differentiable)
    actual, grads = forward_backward(kernel, inputs, grad_out, dtype, differentiable)
    assert actual.dtype == dtype, f"output dtype {actual.dtype} != input dtype {dtype}"
    assert_within_tolerance("output", actual, reference64, reference_low, dtype)
    for name in grads64 if backward else ():
        assert_within_tolerance(f"grad of {name}", grads[name], grads64[name], grads_low[name], dtype)
