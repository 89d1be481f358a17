"""Helpers shared by the Python glue of every op (the twins of csrc/common.h)."""
from __future__ import annotations

import os

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of running sums, lse and other saved statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Contiguous output; filled with NaN under FASTATTN_POISON_OUTPUTS=1 so an unwritten tile fails tests."""
    if os.environ.get("FASTATTN_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
