"""Fake kernels and autograd formulas of the compiled ops declared in csrc/fastattn.cpp, one file per mechanism.

Each module exposes ``<mechanism>_attention(...)``: the differentiable call of that mechanism's
compiled op, shared by the CPU and CUDA backends (the dispatcher picks the kernel by device).
Importing this package registers every mechanism whose schema fastattn._C declares.
"""
import importlib

import torch

from ..backends import MECHANISMS, compiled_extension_error

if compiled_extension_error() is None:
    for _mechanism in MECHANISMS:
        if hasattr(torch.ops.fastattn, f"{_mechanism}_fwd"):
            importlib.import_module(f"{__name__}.{_mechanism}")
