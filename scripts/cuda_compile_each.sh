#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu on its own with plain `nvcc -c` (no torch headers, no torch include
# path), for each architecture of TORCH_CUDA_ARCH_LIST, and reports per file: ok/FAILED, seconds, and
# ptxas register/spill figures. Needs nvcc, not a GPU. MAX_JOBS files compile at once (default 2).
set -uo pipefail
cd "$(dirname "$0")/.."
archs=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
jobs=${MAX_JOBS:-2}
out=${CUDA_COMPILE_OUT:-build-cuda/compile-each}
mkdir -p "$out"
gencode=()
for arch in ${archs//;/ }; do
  number=${arch//./}
  gencode+=("-gencode" "arch=compute_${number},code=sm_${number}")
done
compile_one() {
  local source=$1 name
  name=$(basename "$source" .cu)
  local start=$SECONDS
  if nvcc -c -O3 -std=c++20 --use_fast_math --expt-relaxed-constexpr -Xptxas -v "${gencode[@]}" -Icsrc/cuda \
      "$source" -o "$out/$name.o" >"$out/$name.log" 2>&1; then
    local spills
    spills=$(grep -o '[0-9]* bytes spill stores' "$out/$name.log" | awk '{s += $1} END {print s + 0}')
    local registers
    registers=$(grep -o 'Used [0-9]* registers' "$out/$name.log" | awk '{if ($2 > m) m = $2} END {print m + 0}')
    printf '%-40s ok     %4ds  max registers %3d  spill stores %d bytes\n' "$name" $((SECONDS - start)) "$registers" "$spills"
  else
    printf '%-40s FAILED %4ds  (see %s)\n' "$name" $((SECONDS - start)) "$out/$name.log"
    return 1
  fi
}
export -f compile_one
export out
export gencode_string="${gencode[*]}"
start=$SECONDS
status=0
ls csrc/cuda/*.cu | xargs -P "$jobs" -I{} bash -c 'gencode=($gencode_string); compile_one "$@"' _ {} || status=1
echo "compiled $(ls csrc/cuda/*.cu | wc -l) files for archs $archs in $((SECONDS - start)) s with $jobs jobs"
exit $status
