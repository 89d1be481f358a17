#!/usr/bin/env bash
# make gpu-static-check: the GPU compile check on a machine without a GPU (scripts/gpu_static_check.py).
# Sets up a venv of its own with the GPU machines' Triton (TRITON_STATIC_SPEC, default triton==3.6.0) and a
# CPU torch, then compiles every Triton variant and CUDA file for sm_80 and sm_90. Needs nvcc for the CUDA part.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TRITON_STATIC_VENV:-.venv-triton36}
spec=${TRITON_STATIC_SPEC:-triton==3.6.0}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp="$venv/.fastattn-static-check"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$spec $torch_spec" ]; then
  test -x "$venv/bin/python" || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$torch_spec" "$spec" numpy
  echo "$spec $torch_spec" > "$stamp"
fi
export CUDA_HOME=${CUDA_HOME:-$(bash scripts/cuda_home.sh || true)}
exec "$venv/bin/python" scripts/gpu_static_check.py "$@"
