"""Triton kernels of fastattn, one file per mechanism; installed as ``fastattn.triton_kernels``.

``IMPLEMENTATIONS`` maps a mechanism to its differentiable call, with the signature of the matching
``fastattn.ops.<mechanism>.<mechanism>_attention``; the backend registry reads it.
"""
from .block_sparse import block_sparse_attention
from .linformer import linformer_attention
from .performer import performer_attention

IMPLEMENTATIONS: dict = {
    "block_sparse": block_sparse_attention,
    "linformer": linformer_attention,
    "performer": performer_attention,
}
