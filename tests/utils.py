"""Helpers of the test files only (the tolerance rule itself is fastattn.testing)."""
from __future__ import annotations

import torch


def describe_case(**params) -> str:
    """A readable test id such as B2-H3-N200-D64-causal."""
    parts = []
    for key, value in params.items():
        if isinstance(value, bool):
            if value:
                parts.append(key)
        elif isinstance(value, torch.dtype):
            parts.append(str(value).replace("torch.", ""))
        else:
            parts.append(f"{key}{value}")
    return "-".join(parts)
