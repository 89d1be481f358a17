"""Builds fastattn._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FASTATTN_CUDA=0          build without the CUDA kernels even where they could be built
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (default: what the cores and memory allow)
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_MEMORY_PER_JOB_GIB = 4


def _default_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return cores
    return max(1, min(cores, int(memory_gib // CUDA_MEMORY_PER_JOB_GIB)))


def _want_cuda() -> bool:
    if os.environ.get("FASTATTN_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _sources(*patterns: str) -> list[str]:
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern)))
    return found


def _extension():
    with_cuda = _want_cuda()
    defines = [("FASTATTN_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden"]
    sources = _sources("*.cpp", "cpu/*.cpp")
    if not with_cuda:
        return cpp_extension.CppExtension(
            "fastattn._C", sources, define_macros=defines, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines += [("FASTATTN_WITH_CUDA", None), ("FASTATTN_CUDA_ARCHS", f'"{archs}"')]
    nvcc_flags = [
        "-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        f"--threads={os.environ.get('NVCC_THREADS', '1')}",
    ]
    return cpp_extension.CUDAExtension(
        "fastattn._C", sources + _sources("cuda/*.cpp", "cuda/*.cu"), define_macros=defines,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
    )


os.environ.setdefault("MAX_JOBS", str(_default_jobs()))

setup(
    name="fastattn",
    # fastattn/triton_kernels is a link to the top-level triton_kernels/, so the kernels install as the
    # subpackage fastattn.triton_kernels (the name triton_kernels alone belongs to Triton's own library).
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
