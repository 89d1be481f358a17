"""Random feature matrices for Performer attention."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_features"]


def random_features(num_features: int, head_dim: int, *, orthogonal: bool = True,
                    generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """A (num_features, head_dim) matrix of Gaussian random features, as in the Performer paper.

    With ``orthogonal=True`` the rows come in blocks of ``head_dim`` mutually orthogonal rows (the QR
    factor of a Gaussian matrix), each row then rescaled to the norm of an independent Gaussian
    vector, so every row is marginally N(0, I) while the estimator's variance drops. Otherwise the
    rows are i.i.d. N(0, I). Drawn in float32 on the CPU from ``generator`` and combined in float64 (so the
    result does not depend on the number of threads), then cast and moved.
    """
    for name, value in (("num_features", num_features), ("head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if orthogonal:
        blocks = []
        # LAPACK's float32 QR rounds differently with the number of threads; in float64 the differences
        # are far below float32's rounding.
        for start in range(0, num_features, head_dim):
            orthonormal, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator).double())
            blocks.append(orthonormal.T[: num_features - start])
        norms = torch.randn(num_features, head_dim, generator=generator).double().norm(dim=1, keepdim=True)
        features = torch.cat(blocks) * norms
    else:
        features = torch.randn(num_features, head_dim, generator=generator)
    return features.to(dtype=dtype or torch.get_default_dtype(), device=device)
