#!/usr/bin/env bash
# Builds fastattn._C with its CUDA kernels against a CUDA build of torch (CUDA_TORCH_SPEC, default
# torch==2.14.1) in a venv of its own, then loads it and checks that the CUDA kernels registered.
# Needs nvcc, not a GPU. Output goes to build-cuda/, never over the in-place CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CUDA_VENV:-.venv-cuda}
spec=${CUDA_TORCH_SPEC:-torch==2.14.1}
test -x "$venv/bin/python" || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "$spec" numpy ninja pybind11 setuptools wheel
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="/usr/local/cuda/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_HOME=${CUDA_HOME:-$(bash scripts/cuda_home.sh)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export FASTATTN_CUDA=1
start=$(date +%s)
"$venv/bin/python" setup.py -q build_ext --build-lib build-cuda/lib --build-temp build-cuda/temp
echo "CUDA build took $(( $(date +%s) - start )) s"
so=$(ls build-cuda/lib/fastattn/_C*.so)
# grep reads all of nm's output: with -q it would stop early, and pipefail would turn nm's SIGPIPE into a failure.
if ! nm -D --undefined-only "$so" | grep cudaLaunchKernel >/dev/null; then
  echo "error: $so references no cudaLaunchKernel: the CUDA kernels were not linked in" >&2
  exit 1
fi
# -P: not the source tree's fastattn/ (no _C there), but build-cuda/lib/fastattn, which holds the fresh _C.
PYTHONPATH="$PWD/build-cuda/lib" "$venv/bin/python" -P - <<'PY'
import torch
import fastattn._C as built

assert "cuda" in built.compiled_backends, built.compiled_backends
print("fastattn._C (CUDA build) loads; backends:", built.compiled_backends, "archs:", built.cuda_archs)
missing = []
for op in ("block_sparse_fwd", "block_sparse_bwd", "linformer_fwd", "linformer_bwd", "performer_fwd", "performer_bwd"):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", "CUDA")
    print(f"fastattn::{op} CUDA kernel registered: {has}")
    if not has:
        missing.append(op)
assert not missing, f"no CUDA kernel registered for fastattn::{', '.join(missing)}"
PY
