"""What the benchmark measures: a case (mechanism, shape, dtype, options), its inputs and its FLOP count."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import fastattn

MECHANISMS = ("full", "bigbird", "linformer", "performer", "performer-causal")
MODES = ("fwd", "bwd", "fwdbwd")

# The backward is counted as 2.5 forwards (it recomputes the scores, as FlashAttention's benchmarks count it).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


@dataclass(frozen=True)
class Case:
    """One shape and configuration of one mechanism, on one device and dtype."""

    mechanism: str
    seq_len: int
    dtype: torch.dtype
    device: str
    batch: int
    heads: int
    head_dim: int
    block_size: int
    random_blocks: int
    kp: int
    features: int

    @property
    def causal(self) -> bool:
        return self.mechanism == "performer-causal"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def options(self) -> str:
        """The mechanism's own options, as written in the CSV."""
        if self.mechanism == "bigbird":
            return f"block_size={self.block_size};random_blocks={self.random_blocks}"
        if self.mechanism == "linformer":
            return f"kp={self.kp}"
        if self.mechanism.startswith("performer"):
            return f"features={self.features}"
        return ""

    def layout(self) -> fastattn.BlockLayout:
        return fastattn.bigbird_layout(self.seq_len, block_size=self.block_size, num_heads=self.heads,
                                       num_random_blocks=self.random_blocks, seed=0)


def forward_flops(case: Case) -> float:
    """Multiply-adds x 2 of the work each mechanism needs, nothing that a kernel may skip.

    full: 4*B*H*N*N*D (QK^T and PV); bigbird: 4*B*H*D*nnz_blocks*bs^2 (nnz per head, summed over
    heads below); linformer: 8*B*H*N*kp*D (K and V projected along the sequence, then QK'^T and
    PV'); performer: 8*B*H*N*m*D (features of Q and K, phi(K)^T V and phi(Q) times it; causal
    prefix sums do the same work).
    """
    b, h, n, d = case.batch, case.heads, case.seq_len, case.head_dim
    if case.mechanism == "full":
        return 4.0 * b * h * n * n * d
    if case.mechanism == "bigbird":
        return 4.0 * b * d * case.layout().nnz * case.block_size**2
    if case.mechanism == "linformer":
        return 8.0 * b * h * n * case.kp * d
    return 8.0 * b * h * n * case.features * d


def flops(case: Case, mode: str) -> float:
    return forward_flops(case) * MODE_FLOP_FACTOR[mode]


def linformer_projection(kp: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """A (kp, N) Gaussian projection with entries N(0, 1/kp): the Johnson-Lindenstrauss map of the Linformer paper."""
    return torch.randn(kp, seq_len, generator=generator) / math.sqrt(kp)


def make_inputs(case: Case, seed: int = 0) -> dict[str, object]:
    """q, k, v ~ N(0, 1) of shape (B, H, N, D) and the mechanism's extra argument, on the case's device and dtype.

    Keys are the argument names of the mechanism's call: ``layout`` (bigbird), ``proj_k`` and
    ``proj_v`` (linformer) or ``projection`` (performer).
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    place = {"device": case.device, "dtype": case.dtype}
    inputs: dict[str, object] = {name: torch.randn(shape, generator=generator).to(**place) for name in ("q", "k", "v")}
    if case.mechanism == "bigbird":
        inputs["layout"] = case.layout()
    elif case.mechanism == "linformer":
        for name in ("proj_k", "proj_v"):
            inputs[name] = linformer_projection(case.kp, case.seq_len, generator).to(**place)
    elif case.mechanism.startswith("performer"):
        inputs["projection"] = fastattn.random_features(case.features, case.head_dim, generator=generator, **place)
    return inputs


def differentiable_inputs(mechanism: str) -> tuple[str, ...]:
    """The inputs that receive gradients: q, k, v, and Linformer's projections (they are learned)."""
    return ("q", "k", "v", "proj_k", "proj_v") if mechanism == "linformer" else ("q", "k", "v")
