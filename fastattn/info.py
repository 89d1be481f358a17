"""``python -m fastattn.info``: versions, devices, how fastattn._C was built, and which backend serves which op."""
from __future__ import annotations

import importlib
import platform

import torch

from . import backends

_SAMPLE_DTYPES = {"cpu": torch.float32, "cuda": torch.float16}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def report() -> str:
    lines = [
        f"fastattn {importlib.import_module('fastattn').__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}",
    ]
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        lines.append(f"cuda {torch.version.cuda}: {torch.cuda.get_device_name()} "
                     f"(sm{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("cuda: no GPU visible")
    error = backends.compiled_extension_error()
    if error is None:
        built = importlib.import_module("fastattn._C")
        lines.append(f"fastattn._C: backends {', '.join(built.compiled_backends)}; built with {built.compiler} "
                     f"against torch {built.torch_version}"
                     + (f"; CUDA archs {built.cuda_archs}" if built.cuda_archs else ""))
    else:
        lines.append(error)
    lines.append("")
    lines.append("which backend serves each op (head dim 64, block size 64):")
    for device in devices:
        q = torch.empty(1, 1, 1, 64, device=device, dtype=_SAMPLE_DTYPES[device])
        for mechanism in backends.MECHANISMS:
            lines.append(f"  {mechanism} on {device} ({str(q.dtype).replace('torch.', '')}):")
            options = dict(block_size=64, causal=False, kernel="softmax")
            for name, backend in backends.BACKENDS.items():
                reasons = backend.not_supported_reasons(mechanism, q, **options)
                verdict = "yes" if not reasons else "no: " + "; ".join(reasons)
                lines.append(f"    {name:10s}{verdict}")
            try:
                chosen = backends.select(mechanism, q, **options).name
            except backends.BackendNotSupportedError:
                chosen = "none"
            lines.append(f"    -> chosen automatically: {chosen}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
