#!/usr/bin/env bash
# Prints the CUDA toolkit root of the nvcc on PATH, as nvcc itself reports it (TOP in its dry run), so
# that a wrapper script such as /usr/local/bin/nvcc -> /usr/local/cuda-X/bin/nvcc still gives the
# toolkit with its headers. Prints nothing and fails when there is no nvcc.
set -euo pipefail
command -v nvcc >/dev/null
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
: >"$scratch/empty.cu"
top=$(nvcc --dryrun -c "$scratch/empty.cu" -o "$scratch/empty.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
readlink -f "${top:-$(dirname "$(readlink -f "$(command -v nvcc)")")/..}"
