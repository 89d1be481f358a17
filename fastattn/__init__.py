"""fastattn: fused block-sparse (BigBird), Linformer and Performer attention for PyTorch."""
from . import backends, ops, reference  # noqa: F401  (importing ops registers the compiled ops' autograd)
from .backends import BackendNotSupportedError

from .features import random_features
from .functional import (
    bigbird_attention,
    block_sparse_attention,
    full_attention,
    linformer_attention,
    performer_attention,
)
from .layout import BlockLayout, bigbird_layout
from . import models, nn
from .nn import replace_attention

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "BlockLayout",
    "bigbird_attention",
    "bigbird_layout",
    "block_sparse_attention",
    "full_attention",
    "linformer_attention",
    "performer_attention",
    "random_features",
    "models",
    "nn",
    "reference",
    "replace_attention",
]
