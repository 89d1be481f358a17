"""Backend registry: what each backend supports, why it declines a call, and automatic selection.

As in xformers' dispatcher, every backend declares its devices, dtypes and head dims and answers
``not_supported_reasons(mechanism, q, **options)``; a call goes to the first backend of ``BACKENDS``
(in order of preference) that chooses itself automatically for the device of q and has no reason
to decline, and when none can serve it the error lists every backend with its reasons. The compiled backends ("cpu", "cuda") support a mechanism when fastattn._C
registered a kernel for it under that dispatch key, so a new kernel needs no change here.
"""
from __future__ import annotations

import functools
import importlib
import operator
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

MECHANISMS = ("block_sparse", "linformer", "performer")


class BackendNotSupportedError(ValueError):
    """No backend (or not the one asked for) can serve this call; the message says why, per backend."""


@functools.lru_cache(maxsize=None)
def compiled_extension_error() -> str | None:
    """None when fastattn._C loads, else why it does not."""
    try:
        importlib.import_module("fastattn._C")
    except ImportError as error:
        return f"fastattn._C is not built or does not load ({error})"
    return None


def _mechanism_module(mechanism: str):
    return importlib.import_module(f"fastattn.ops.{mechanism}")


def _compiled_implementation(dispatch_key: str) -> Callable[[str], Callable | None]:
    def implementation(mechanism: str) -> Callable | None:
        if torch.compiler.is_compiling():
            # select() has checked this backend eagerly; fastattn.ops imported the mechanism's module.
            return getattr(sys.modules[f"fastattn.ops.{mechanism}"], f"{mechanism}_attention")
        if compiled_extension_error() is not None:
            return None
        op = f"{mechanism}_fwd"
        if not hasattr(torch.ops.fastattn, op):
            return None
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key):
            return None
        return getattr(_mechanism_module(mechanism), f"{mechanism}_attention")
    return implementation


def _reference_implementation(mechanism: str) -> Callable:
    from . import reference

    return getattr(reference, f"{mechanism}_attention")


def _triton_module():
    # Dynamo cannot trace import_module; once imported (select() runs eagerly first), sys.modules has it.
    return sys.modules.get("fastattn.triton_kernels") or importlib.import_module("fastattn.triton_kernels")


def _triton_unavailable() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


def _triton_implementation(mechanism: str) -> Callable | None:
    return _triton_module().IMPLEMENTATIONS.get(mechanism)


def _triton_device_reasons(q: Tensor) -> list[str]:
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"]
    return []


def _no_reasons(mechanism: str, q: Tensor, options: dict) -> list[str]:
    return []


def _cuda_reasons(mechanism: str, q: Tensor, options: dict) -> list[str]:
    reasons = []
    if "cuda" not in importlib.import_module("fastattn._C").compiled_backends:
        reasons.append("fastattn._C was built without its CUDA kernels (torch without CUDA, or no nvcc, at build time)")
    if mechanism == "performer":
        return reasons + _cuda_performer_reasons(options)
    if mechanism != "block_sparse":
        return reasons
    block_size = options.get("block_size")
    if block_size not in (32, 64, 128):
        reasons.append(f"block_size must be 32, 64 or 128, got {block_size}")
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        capability = torch.cuda.get_device_capability(q.device)
        if capability < (8, 0):
            reasons.append(f"float16/bfloat16 need tensor cores of compute capability 8.0+ (mma.sync m16n8k16), "
                           f"got {capability[0]}.{capability[1]}")
    return reasons


# The largest number of Performer features the CUDA kernels take (csrc/cuda/performer_params.h,
# kPerformerMaxFeatures): their query kernels hold every feature of a tile of queries in shared memory.
CUDA_PERFORMER_MAX_FEATURES = 512


def _cuda_performer_reasons(options: dict) -> list[str]:
    """What the CUDA Performer kernels decline. Grouped-query attention is served by repeating k and v to the
    heads of q (the CUDA backend lists no mechanism in gqa_mechanisms)."""
    reasons = []
    features = options.get("features")  # m, where the caller passes it
    if features is not None and (features % 16 or not 0 < features <= CUDA_PERFORMER_MAX_FEATURES):
        reasons.append(f"Performer needs m (features) a multiple of 16 up to {CUDA_PERFORMER_MAX_FEATURES}, "
                       f"got {features}")
    return reasons


def _triton_reasons(mechanism: str, q: Tensor, options: dict) -> list[str]:
    reasons = _triton_device_reasons(q)
    block_size = options.get("block_size")
    if mechanism == "block_sparse" and block_size not in (16, 32, 64, 128):
        reasons.append(f"block_size must be 16, 32, 64 or 128, got {block_size}")
    return reasons


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | None
    max_head_dim: int
    implementation: Callable[[str], Callable | None]
    unavailable_reason: Callable[[], str | None] = field(default=lambda: None)
    extra_reasons: Callable[[str, Tensor, dict], list[str]] = field(default=_no_reasons)
    auto_device_types: tuple[str, ...] = ()
    manual_reason: str = ""
    # Mechanisms whose kernels read k and v with fewer heads than q (grouped-query attention) natively;
    # for the others the public ops repeat k and v to the heads of q before the call.
    gqa_mechanisms: tuple[str, ...] = ()

    def not_supported_reasons(self, mechanism: str, q: Tensor, **options) -> list[str]:
        """Why this backend cannot run ``mechanism`` on inputs like ``q``; empty when it can."""
        unavailable = self.unavailable_reason()
        if unavailable is not None:
            return [unavailable]
        reasons = []
        if self.implementation(mechanism) is None:
            reasons.append(f"has no {mechanism} kernel")
        if q.device.type not in self.device_types:
            reasons.append(f"device {q.device.type} not supported (supports {', '.join(self.device_types)})")
        if q.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(q.dtype).replace('torch.', '')} not supported (supports {names})")
        head_dim = q.shape[-1]
        if self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head dim {head_dim} not supported (supports {self.head_dims})")
        elif head_dim > self.max_head_dim:
            reasons.append(f"head dim {head_dim} > {self.max_head_dim}")
        return reasons + self.extra_reasons(mechanism, q, options)


_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)

BACKENDS: dict[str, Backend] = {
    "cuda": Backend(
        "cuda", "fused CUDA kernels (fastattn._C, tensor cores for fp16/bf16)", ("cuda",), _LOW_PRECISION,
        (32, 64, 128), 128, _compiled_implementation("CUDA"), compiled_extension_error, _cuda_reasons,
        auto_device_types=("cuda",),
    ),
    "triton": Backend(
        "triton", "Triton kernels (fastattn.triton_kernels)", ("cuda", "cpu"), _LOW_PRECISION,
        (32, 64, 128), 128, _triton_implementation, _triton_unavailable, _triton_reasons,
        auto_device_types=("cuda",),
        manual_reason='runs CPU tensors only when asked (backend="triton"): Triton\'s interpreter is for debugging',
        gqa_mechanisms=MECHANISMS,
    ),
    "cpu": Backend(
        "cpu", "fused C++ CPU kernels (fastattn._C, at::parallel_for + at::vec)", ("cpu",),
        (torch.float32, torch.float64, torch.bfloat16), None, 256, _compiled_implementation("CPU"),
        compiled_extension_error, auto_device_types=("cpu",), gqa_mechanisms=MECHANISMS,
    ),
    "reference": Backend(
        "reference", "exact pure-PyTorch reference (materialises the attention matrix)", ("cpu", "cuda"),
        (torch.float16, torch.bfloat16, torch.float32, torch.float64), None, 2**31, _reference_implementation,
        manual_reason='never chosen automatically (it materialises the attention matrix): pass backend="reference"',
        gqa_mechanisms=MECHANISMS,
    ),
}


def select(mechanism: str, q: Tensor, backend: str | None = None, **options) -> Backend:
    """The backend that runs ``mechanism`` on inputs like ``q``: the one named, or the first that can."""
    if torch.compiler.is_compiling():
        # operator.index specialises a symbolic head dim (dynamic=True): backends support some head dims only.
        return BACKENDS[_select_while_compiling(mechanism, q.device, q.dtype, operator.index(q.shape[-1]), backend,
                                                tuple(sorted(options.items())))]
    return _select(mechanism, q, backend, **options)


@torch._dynamo.assume_constant_result
def _select_while_compiling(mechanism: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                            backend: str | None, options: tuple) -> str:
    """``select`` run eagerly while torch.compile traces (it imports modules and queries the dispatcher,
    which Dynamo cannot trace): the choice depends only on the device, dtype and head dim of q."""
    probe = torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype)
    return _select(mechanism, probe, backend, **dict(options)).name


def _select(mechanism: str, q: Tensor, backend: str | None = None, **options) -> Backend:
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected None or one of {sorted(BACKENDS)}, got {backend!r}")
        reasons = BACKENDS[backend].not_supported_reasons(mechanism, q, **options)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {backend!r} cannot run {mechanism} attention here: {'; '.join(reasons)}"
            )
        return BACKENDS[backend]
    declined = {}
    for name, candidate in BACKENDS.items():
        reasons = candidate.not_supported_reasons(mechanism, q, **options)
        if not reasons and q.device.type not in candidate.auto_device_types:
            reasons = [candidate.manual_reason]
        if not reasons:
            return candidate
        declined[name] = reasons
    lines = "\n".join(f"  {name}: {'; '.join(reasons)}" for name, reasons in declined.items())
    raise BackendNotSupportedError(
        f"no backend can run {mechanism} attention for q of dtype {q.dtype}, device {q.device}, "
        f"head dim {q.shape[-1]}:\n{lines}"
    )
