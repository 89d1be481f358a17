import atexit
import os
import shutil
import tempfile

import torch

# Set before fastattn or triton is imported: compiled ops fill their outputs with NaN before writing
# (an unwritten tile fails), and without a GPU Triton runs its kernels in the interpreter on CPU
# tensors (on a GPU machine the interpreter would make the GPU tests crawl).
os.environ.setdefault("FASTATTN_POISON_OUTPUTS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh inductor cache per test run: its key leaves out the fake kernels of custom ops, so code compiled
# before an op's saved tensors changed shape would be reused (and fail its own shape asserts).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastattn-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported: import the kernels now, so a test
# that unsets it (test_bench times no interpreted kernel) cannot make them GPU kernels for later tests.
if importlib.util.find_spec("triton") is not None:
    import fastattn.triton_kernels  # noqa: E402, F401

# Property tests (tests/test_properties.py): a small fixed budget in `make test`, a long run on request
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("FASTATTN_HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (run by make gpu-check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
