#!/usr/bin/env bash
# make gpu-check (DESIGN section 6): on a machine with an NVIDIA GPU, torch and Triton already installed
# and no network, build fastattn._C in place for this GPU only, run the GPU tests, run a short benchmark,
# and write logs, CSV and a summary under $OUT (default gpu-check-out/). Installs nothing.
# Exits 0 only when the build and the GPU tests pass; without a GPU it says so and exits 2.
#   PYTHON (default python3), MAX_JOBS (default: all cores), time limits BUILD_TIMEOUT, TEST_TIMEOUT,
#   BENCH_TIMEOUT in seconds (defaults 150, 150, 150: under 8 minutes in all); BENCH_N, BENCH_HEAD_DIM.
set -uo pipefail
# Triton compiles for the GPU here; the interpreter is only for machines without one.
export TRITON_INTERPRET=0
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-gpu-check-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
: >"$summary"
note() { echo "gpu-check: $*" | tee -a "$summary"; }

if ! "$python" -c "import torch" >"$out/torch-probe.log" 2>&1; then
  note "FAILED: $python cannot import torch (see $out/torch-probe.log); this check installs nothing"
  exit 2
fi
if ! "$python" - >"$out/device.txt" 2>>"$out/torch-probe.log" <<'PY'
import sys
import torch

if not torch.cuda.is_available():
    sys.exit(1)
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}")
print(torch.cuda.get_device_name())
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
then
  note "FAILED: no NVIDIA GPU visible to torch (torch.cuda.is_available() is False; torch $("$python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null)). make gpu-check needs a machine with an NVIDIA GPU."
  exit 2
fi
arch=$(sed -n 1p "$out/device.txt")
note "device: $(sed -n 2p "$out/device.txt") (sm ${arch}), $(sed -n 3p "$out/device.txt")"
if ! command -v nvcc >/dev/null; then
  note "FAILED: nvcc is not on PATH: the CUDA kernels cannot be built"
  exit 1
fi
export CUDA_HOME=${CUDA_HOME:-$(bash scripts/cuda_home.sh)}
# Headers that torch's CUDA headers include but a partial toolkit lacks come from torch's own nvidia
# wheels where present (CPATH is searched after the toolkit's -I paths).
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for include in "$site"/nvidia/cu*/include; do
  [ -d "$include" ] && export CPATH="${CPATH:+$CPATH:}$include"
done
export TORCH_CUDA_ARCH_LIST=$arch
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTATTN_CUDA=1
"$python" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null ||
  note "warning: ninja not found: torch builds the extension serially"

status=0
start=$SECONDS
if timeout "${BUILD_TIMEOUT:-150}" "$python" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  note "build: ok in $((SECONDS - start)) s (TORCH_CUDA_ARCH_LIST=$arch, MAX_JOBS=$MAX_JOBS, CUDA_HOME=$CUDA_HOME)"
else
  note "build: FAILED after $((SECONDS - start)) s (see $out/build.log)"
  tail -n 30 "$out/build.log"
  exit 1
fi
"$python" -m fastattn.info >"$out/info.txt" 2>&1 || note "warning: python -m fastattn.info failed (see $out/info.txt)"

start=$SECONDS
timeout "${TEST_TIMEOUT:-150}" "$python" -m pytest -m gpu -q -ra -p no:cacheprovider --junitxml="$out/pytest-gpu.xml" \
  tests >"$out/pytest-gpu.log" 2>&1
tests_status=$?
note "GPU tests: $(tail -n 1 "$out/pytest-gpu.log") (exit $tests_status, $((SECONDS - start)) s; see $out/pytest-gpu.log)"
[ "$tests_status" -eq 0 ] || status=1

start=$SECONDS
# The performance goals of the CUDA and Triton kernels: bf16, BigBird block 64, r=3, against compiled
# FlexAttention with the same block mask and dense SDPA, Linformer (kp=256) and causal Performer (m=256, Triton),
# forward and forward+backward.
bench_command=("$python" -m bench --device cuda --mechanism bigbird,linformer,performer-causal --dtype bfloat16 --batch 2 --heads 16
  --head-dim "${BENCH_HEAD_DIM:-64}" --n "${BENCH_N:-4096,16384}" --mode fwd --mode fwdbwd --min-run-time 0.2
  --no-quality --no-progress --out "$out/bench")
if timeout "${BENCH_TIMEOUT:-200}" "${bench_command[@]}" >"$out/bench.log" 2>&1; then
  note "benchmark: ok in $((SECONDS - start)) s (${bench_command[*]:1}; see $out/bench.log)"
else
  note "benchmark: FAILED or timed out after $((SECONDS - start)) s (see $out/bench.log); rows written so far are kept"
fi
if [ -f "$out/bench/summary.txt" ]; then
  cat "$out/bench/summary.txt" >>"$summary"
fi
[ "$tests_status" -eq 0 ] || note "the GPU tests failed: no speed-up above stands for an op whose tests fail"
note "overall: $([ "$status" -eq 0 ] && echo ok || echo FAILED); everything is under $out"
exit $status
