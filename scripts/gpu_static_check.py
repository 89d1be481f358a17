"""GPU compile check on a machine without a GPU (``make gpu-static-check``; DESIGN.md section 3).

Triton: every kernel variant the wrappers can launch is compiled with the pinned Triton (3.6, the GPU
machines' version) for ``GPUTarget("cuda", 90, 32)`` and ``GPUTarget("cuda", 80, 32)`` through
``triton.compile(ASTSource(...))``, with exactly the signature, constexprs, specialisation attributes
and options the launcher would pass. CUDA: every ``csrc/cuda/*.cu`` is compiled with ``nvcc -Xptxas -v``
for sm_80 and sm_90, and the dynamic shared memory of every launch is read by running the launch
templates against a stand-in CUDA runtime that records launches instead of making them.

Fails on a compile error, on shared memory above a target's limit (227 KB sm_90, 163 KB sm_80; for
CUDA static plus the dynamic request of the launch), or on register spills in a Triton variant the
wrappers choose by default (CUDA spills are reported). Prints one table per
section: shared memory, registers, spills and, for Triton, whether the main loop is pipelined (read
from the TTGIR: asynchronous copies into shared memory inside the loop that holds the dots, waited on
with loads still in flight, i.e. ``ttg.async_wait {num > 0}``), with the number of shared buffers.

Results are cached in ``.gpu-static-cache/`` by a hash of everything that goes into a compile (kernel
source and the sources it calls, signature, constexprs, options, target, compiler version), and the
compiles run in parallel processes (``--jobs``, default: the number of cores).

Contract for Triton kernel modules (``triton_kernels/<mechanism>.py``)
----------------------------------------------------------------------
A module that launches kernels defines ``static_check_variants()``, an iterable of
``(label, launch, is_default)``:

- ``label``: a short readable name of the variant (``block64-D128-float16-causal``);
- ``launch``: a callable with no arguments that calls the module's own launch wrapper(s) on small CPU
  tensors, exactly as a GPU call would (same wrapper code, tile choice and flags). The checker replaces
  every ``triton.jit`` kernel that is a module-level attribute by a recorder while ``launch()`` runs:
  ``kernel[grid](*args, **kwargs)`` records the arguments and launches nothing, so outputs stay
  unwritten. Use sizes > 1 and multiples of 16 for lengths, heads and batch (B = H = 2, N = two tiles):
  the launcher specialises integers equal to 1 and pointers/integers divisible by 16, and the check
  should see the specialisation real calls get;
- ``is_default``: True when the wrappers choose this variant by default (register spills fail the
  check), False for a variant they can launch but do not choose by default (spills are reported only).

Cover every tile config x dtype x head dim x causal/padding flag the wrappers can launch on a GPU.
Launches are deduplicated, so a kernel that several variants launch identically compiles once.
Kernels must be launched by name from module globals (``my_kernel[grid](...)``), not through
``triton.autotune`` (choose tiles in Python, as ``block_sparse._tiles`` does).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".gpu-static-cache"
# Shared memory a block may use (opt-in maximum): 227 KB on sm_90, 163 KB on sm_80.
SHARED_LIMITS = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)
# Cached results depend on how this script reads the compilers' output too.
CHECKER_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- Triton

def _record_launches(module, launch) -> list:
    """Runs launch() with every module-level Triton kernel of ``module`` replaced by a recorder."""
    from triton.runtime.jit import JITFunction

    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launches.append((self.name, self.kernel, args, kwargs))
            return record

    kernels = {name: value for name, value in vars(module).items() if isinstance(value, JITFunction)}
    try:
        for name, kernel in kernels.items():
            setattr(module, name, Recorder(name, kernel))
        launch()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


def _compile_spec(kernel, args, kwargs, arch):
    """Signature, constexprs, attributes and options as JITFunction.run computes them for this target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _triton_jobs(selected: str | None = None) -> list[dict]:
    import triton

    jobs, seen = [], {}
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"fastattn.triton_kernels.{path.stem}")
        variants = getattr(module, "static_check_variants", None)
        if variants is None:
            continue
        for label, launch, is_default in variants():
            if selected and not re.search(selected, label):
                continue
            for name, kernel, args, kwargs in _record_launches(module, launch):
                for arch in ARCHS:
                    signature, constexprs, attrs, options = _compile_spec(kernel, args, kwargs, arch)
                    key_text = repr((CHECKER_HASH, triton.__version__, kernel.cache_key, sorted(signature.items()),
                                     sorted((k, repr(v)) for k, v in constexprs.items()),
                                     sorted((k, repr(v)) for k, v in attrs.items()),
                                     sorted((k, repr(v)) for k, v in options.items()), arch))
                    key = hashlib.sha256(key_text.encode()).hexdigest()
                    if key in seen:
                        seen[key]["default"] |= is_default
                        continue
                    job = dict(module=module.__name__, kernel=name, variant=label, arch=arch, key=key,
                               signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                               default=is_default, num_warps=options["num_warps"], num_stages=options["num_stages"])
                    seen[key] = job
                    jobs.append(job)
    return jobs


def _loop_regions(ttgir: str) -> list[list[str]]:
    """The bodies (lines) of every scf.for in the TTGIR, nested loops included in their parents."""
    regions, stack = [], []
    for line in ttgir.splitlines():
        for body in stack:
            body.append(line)
        opens, closes = line.count("{"), line.count("}")
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append([])
            opens -= 1
        depth_change = opens - closes
        if depth_change < 0:
            for _ in range(-depth_change):
                if stack:
                    regions.append(stack.pop())
        elif depth_change > 0:
            # Other regions (scf.if, reductions) open and close inside a loop body: track them as
            # throw-away bodies so that their closing braces do not end the loop.
            stack.extend([] for _ in range(depth_change))
    return [region for region in regions if region]


def pipelining(ttgir: str) -> tuple[bool, int]:
    """(pipelined, shared buffers) of the main loop: the loop whose body holds the dots.

    Pipelined means the loop issues asynchronous copies into shared memory (cp.async or TMA) and
    waits with copies still in flight (``async_wait {num > 0}`` or multi-buffered TMA barriers), so
    loads of a later iteration overlap this iteration's compute.
    """
    dot = re.compile(r"\btt\.dot\b|ttng\.warp_group_dot\b")
    best = (False, 0)
    for body in _loop_regions(ttgir):
        text = "\n".join(body)
        if not dot.search(text):
            continue
        copies = len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", text))
        waits = [int(n) for n in re.findall(r"async_wait[^{]*\{num = (\d+)", text)]
        tma_waits = len(re.findall(r"ttng\.wait_barrier", text))
        overlapped = copies > 0 and (any(n > 0 for n in waits) or (tma_waits > 0 and not waits))
        buffers = [int(n) for n in re.findall(r"!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
        best = max(best, (overlapped, max(buffers, default=1) if overlapped else 1))
    return best


def _compile_triton(job: dict) -> dict:
    cached = CACHE / "triton" / f"{job['key']}.json"
    if cached.exists():
        # Whether a variant is default is the module's word now, not that of the run that cached it.
        return {**json.loads(cached.read_text()), "default": job["default"]}
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.time()
    result = dict(kernel=job["kernel"], variant=job["variant"], arch=job["arch"], default=job["default"],
                  num_warps=job["num_warps"], num_stages=job["num_stages"])
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"]),
                                      target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as error:  # a compile error is a result to report, with its message
        result.update(error=f"{type(error).__name__}: {str(error)[-2000:]}")
        return result
    ptxas = log.getvalue()
    registers = re.findall(r"Used (\d+) registers", ptxas)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)]
    pipelined, buffers = pipelining(compiled.asm["ttgir"])
    result.update(shared=compiled.metadata.shared, registers=max(map(int, registers), default=-1),
                  spills=sum(spills), pipelined=pipelined, buffers=buffers, seconds=round(time.time() - start, 1))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def _triton_section(jobs_count: int, selected: str | None) -> list[str]:
    start = time.time()
    jobs = _triton_jobs(selected)
    print(f"Triton {__import__('triton').__version__}: {len(jobs)} compiles (kernel x variant x target)", flush=True)
    # Forked workers inherit the imported modules; each job is one compile.
    with concurrent.futures.ProcessPoolExecutor(jobs_count, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_triton, jobs))
    failures = []
    rows = {}
    for result in results:
        row = rows.setdefault((result["kernel"], result["variant"]), {"default": result["default"]})
        row[result["arch"]] = result
        row["default"] |= result["default"]
    header = (f"{'kernel':<36} {'variant':<34} {'warps':>5} {'stg':>3} | "
              + " | ".join(f"sm_{a}: {'smem KB':>7} {'regs':>4} {'spill':>5} {'pipelined':>9}" for a in ARCHS))
    print(header)
    print("-" * len(header))
    for (kernel, variant), row in sorted(rows.items()):
        cells = []
        first = row[ARCHS[0]]
        for arch in ARCHS:
            r = row[arch]
            if "error" in r:
                cells.append(f"sm_{arch}: COMPILE ERROR")
                failures.append(f"{kernel} {variant} sm_{arch}: {r['error']}")
                continue
            pipe = f"yes x{r['buffers']}" if r["pipelined"] else "no"
            cells.append(f"sm_{arch}: {r['shared'] / 1024:7.1f} {r['registers']:>4} {r['spills']:>5} {pipe:>9}")
            if r["shared"] > SHARED_LIMITS[arch]:
                failures.append(f"{kernel} {variant} sm_{arch}: shared memory {r['shared']} B above the "
                                f"{SHARED_LIMITS[arch]} B limit")
            if r["spills"] and row["default"]:
                failures.append(f"{kernel} {variant} sm_{arch}: {r['spills']} bytes of register spills in a "
                                f"variant the wrappers choose by default")
        mark = "" if row["default"] else " (non-default)"
        print(f"{kernel:<36} {variant + mark:<34} {first['num_warps']:>5} {first['num_stages']:>3} | "
              + " | ".join(cells))
    ok = [r for r in results if "error" not in r]
    for arch in ARCHS:
        at = [r for r in ok if r["arch"] == arch]
        if at:
            print(f"sm_{arch}: {len(at)} compiled, max shared {max(r['shared'] for r in at) / 1024:.1f} KB, "
                  f"max registers {max(r['registers'] for r in at)}, spilling {sum(1 for r in at if r['spills'])}, "
                  f"main loop pipelined in {sum(1 for r in at if r['pipelined'])}")
    print(f"Triton section took {time.time() - start:.0f} s", flush=True)
    return failures


# ---------------------------------------------------------------------------------------------- CUDA

def _nvcc() -> str:
    cuda_home = os.environ.get("CUDA_HOME") or subprocess.run(
        ["bash", str(ROOT / "scripts" / "cuda_home.sh")], capture_output=True, text=True).stdout.strip()
    nvcc = Path(cuda_home or "/usr/local/cuda") / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else (shutil.which("nvcc") or "")


NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-Icsrc/cuda"]


def _sources_hash(*extra: str) -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc" / "cuda").glob("*")):
        if path.suffix in (".cu", ".cuh", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()


def _compile_cu(job: tuple[str, int, str, str]) -> dict:
    source, arch, nvcc, key = job
    cached = CACHE / "cuda" / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    name = Path(source).stem
    out_dir = CACHE / "cuda" / "objects"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    proc = subprocess.run([nvcc, "-c", *NVCC_FLAGS, "-Xptxas", "-v", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
                           source, "-o", str(out_dir / f"{name}.sm{arch}.o")],
                          cwd=ROOT, capture_output=True, text=True)
    result = dict(source=name, arch=arch, seconds=round(time.time() - start, 1))
    if proc.returncode:
        result["error"] = proc.stderr[-3000:]
        return result
    kernels = []
    current = None
    for line in proc.stderr.splitlines():
        match = re.search(r"Compiling entry function '(\w+)' for 'sm_\d+'", line)
        if match:
            current = dict(name=match.group(1), registers=0, spills=0, shared=0)
            kernels.append(current)
        elif current is not None:
            if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
                current["spills"] = int(m.group(1)) + int(m.group(2))
            if m := re.search(r"Used (\d+) registers", line):
                current["registers"] = int(m.group(1))
            if m := re.search(r"(\d+) bytes smem", line):
                current["shared"] = int(m.group(1))
    names = subprocess.run(["c++filt"], input="\n".join(k["name"] for k in kernels), capture_output=True,
                           text=True).stdout.splitlines()
    for kernel, readable in zip(kernels, names):
        kernel["name"] = _short_kernel_name(readable)
    result["kernels"] = kernels
    cached.write_text(json.dumps(result))
    return result


def _short_kernel_name(demangled: str) -> str:
    """fastattn::cuda::block_sparse_fwd_kernel<fastattn::cuda::TensorCoreTraits<__half, 64, 64> >(...) ->
    block_sparse_fwd_kernel<TensorCoreTraits<__half, 64, 64>>"""
    name = demangled.split("(")[0].replace("fastattn::cuda::", "").replace("> >", ">>")
    return name.removeprefix("void ")


# The stand-in CUDA runtime: the launch templates' kernel<<<...>>> and cudaFuncSetAttribute land here and
# are printed (kernel name, threads, dynamic shared memory) instead of reaching a GPU.
LAUNCH_RECORDER = r"""
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <cuda_runtime.h>

static std::map<const void*, std::string> names;
static dim3 pushed_grid, pushed_block;
static size_t pushed_shared;
static int current_block_size;

extern "C" {
void** __cudaRegisterFatBinary(void*) { static void* handle; return &handle; }
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char* host, char* device, const char*, int, uint3*, uint3*, dim3*, dim3*,
                            int*) { names[host] = device; }
void __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
unsigned __cudaPushCallConfiguration(dim3 grid, dim3 block, size_t shared, struct CUstream_st*) {
  pushed_grid = grid, pushed_block = block, pushed_shared = shared;
  return 0;
}
cudaError_t __cudaPopCallConfiguration(dim3* grid, dim3* block, size_t* shared, void*) {
  *grid = pushed_grid, *block = pushed_block, *shared = pushed_shared;
  return cudaSuccess;
}
cudaError_t cudaLaunchKernel(const void* func, dim3, dim3 block, void**, size_t shared, cudaStream_t) {
  std::printf("launch %s block_size=%d threads=%u dynamic_shared=%zu\n", names[func].c_str(), current_block_size,
              block.x * block.y * block.z, shared);
  return cudaSuccess;
}
// CUDA 13's launch path: a kernel handle per host stub, then __cudaLaunchKernel.
cudaError_t __cudaGetKernel(cudaKernel_t* kernel, const void* func) {
  *kernel = reinterpret_cast<cudaKernel_t>(const_cast<void*>(func));
  return cudaSuccess;
}
cudaError_t __cudaLaunchKernel(cudaKernel_t kernel, dim3 grid, dim3 block, void** args, size_t shared,
                               cudaStream_t stream) {
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, args, shared, stream);
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
}

#include "block_sparse_launch.h"
#include "linformer_launch.h"
#include "performer_launch.h"

namespace fc = fastattn::cuda;

template <typename Element, int HeadDim>
void record(int block_size) {
  current_block_size = block_size;
  fc::BlockSparseBwdParams params{};
  params.batch = 2, params.heads = 2, params.query_len = params.key_len = 4 * block_size;
  params.head_dim = HeadDim, params.block_size = block_size;
  params.num_query_blocks = params.num_key_blocks = 4;
  fc::run_block_sparse_fwd<Element, HeadDim>(params, nullptr);
  fc::run_block_sparse_bwd<Element, HeadDim>(params, nullptr);
}

// The Linformer projection (two key splits, so the fixed-order reduce launches too); block_size=0 in its lines.
template <typename Element, int HeadDim>
void record_projection() {
  current_block_size = 0;
  fc::LinformerProjectionParams params{};
  params.batch = 2, params.heads = 2, params.key_len = 256, params.head_dim = HeadDim, params.projected_len = 256;
  params.splits = 2, params.keys_per_split = 128;
  fc::run_linformer_projection<Element, HeadDim>(params, nullptr);
}

// Performer softmax (the kernel "relu" launches a subset), non-causal and causal: the largest m (the query kernels'
// shared memory grows with it) and two splits of the keys and queries, so the fixed-order sums launch too;
// block_size=0.
template <typename Element, int HeadDim>
void record_performer() {
  current_block_size = 0;
  fc::PerformerParams params{};
  params.batch = 2, params.heads = 2, params.query_len = params.key_len = 256, params.head_dim = HeadDim;
  params.features = fc::kPerformerMaxFeatures, params.softmax = true;
  params.key_splits = params.query_splits = 2, params.keys_per_split = params.queries_per_split = 128;
  fc::run_performer_fwd<Element, HeadDim>(params, nullptr);
  fc::run_performer_bwd<Element, HeadDim>(params, nullptr);
  params.causal = true;
  fc::run_performer_fwd<Element, HeadDim>(params, nullptr);
  fc::run_performer_bwd<Element, HeadDim>(params, nullptr);
}

int main() {
  record_performer<__half, 32>(), record_performer<__half, 64>(), record_performer<__half, 128>();
  record_performer<__nv_bfloat16, 32>(), record_performer<__nv_bfloat16, 64>(), record_performer<__nv_bfloat16, 128>();
  record_performer<float, 32>(), record_performer<float, 64>(), record_performer<float, 128>();
  record_projection<__half, 32>(), record_projection<__half, 64>(), record_projection<__half, 128>();
  record_projection<__nv_bfloat16, 32>(), record_projection<__nv_bfloat16, 64>(), record_projection<__nv_bfloat16, 128>();
  record_projection<float, 32>(), record_projection<float, 64>(), record_projection<float, 128>();
  for (int block_size : {32, 64, 128}) {
    record<__half, 32>(block_size), record<__half, 64>(block_size), record<__half, 128>(block_size);
    record<__nv_bfloat16, 32>(block_size), record<__nv_bfloat16, 64>(block_size), record<__nv_bfloat16, 128>(block_size);
    record<float, 32>(block_size), record<float, 64>(block_size), record<float, 128>(block_size);
  }
}
"""


def _launch_requests(nvcc: str, objects: list[Path], key: str) -> dict:
    """Dynamic shared memory each launch requests: {demangled kernel: max bytes over block sizes}."""
    cached = CACHE / "cuda" / f"launches-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Path(tmp) / "recorder.cpp"
        recorder.write_text(LAUNCH_RECORDER)
        binary = Path(tmp) / "recorder"
        # Host code only: the objects' device code is never loaded, so no CUDA runtime is linked.
        for command in ([nvcc, "-std=c++20", "-Icsrc/cuda", "-x", "c++", "-c", str(recorder), "-o", f"{binary}.o"],
                        [nvcc, f"{binary}.o", *map(str, objects), "-cudart", "none", "-o", str(binary)]):
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"building the launch recorder failed:\n{proc.stderr[-3000:]}")
        run = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
    requests = {}
    for line in run.stdout.splitlines():
        m = re.match(r"launch (\S+) block_size=(\d+) threads=(\d+) dynamic_shared=(\d+)", line)
        if m:
            readable = subprocess.run(["c++filt"], input=m.group(1), capture_output=True, text=True).stdout.strip()
            name = _short_kernel_name(readable)
            requests[name] = max(requests.get(name, 0), int(m.group(4)))
    cached.write_text(json.dumps(requests))
    return requests


def _cuda_section(jobs_count: int) -> list[str]:
    start = time.time()
    nvcc = _nvcc()
    if not nvcc:
        return ["nvcc not found (set CUDA_HOME): the CUDA section needs it"]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = _sources_hash(version, repr(NVCC_FLAGS), CHECKER_HASH)
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    (CACHE / "cuda").mkdir(parents=True, exist_ok=True)
    jobs = [(source, arch, nvcc, hashlib.sha256(f"{key}{source}{arch}".encode()).hexdigest())
            for source in sources for arch in ARCHS]
    print(f"CUDA ({version.strip().splitlines()[-1]}): {len(jobs)} compiles (file x target)", flush=True)
    with concurrent.futures.ThreadPoolExecutor(jobs_count) as pool:
        results = list(pool.map(_compile_cu, jobs))
    failures = [f"{r['source']} sm_{r['arch']}: compile error\n{r['error']}" for r in results if "error" in r]
    if failures:
        return failures
    objects = [CACHE / "cuda" / "objects" / f"{Path(s).stem}.sm{ARCHS[0]}.o" for s in sources]
    if not all(o.exists() for o in objects):
        # Cached results without objects (a cleaned object folder): recompile them.
        for path in (CACHE / "cuda").glob("*.json"):
            path.unlink()
        return _cuda_section(jobs_count)
    requests = _launch_requests(nvcc, objects, key)
    header = (f"{'kernel':<66} {'dyn smem KB':>11} | "
              + " | ".join(f"sm_{a}: {'static KB':>9} {'regs':>4} {'spill':>5}" for a in ARCHS))
    print(header)
    print("-" * len(header))
    kernels, spilling = {}, []
    for result in results:
        for kernel in result["kernels"]:
            kernels.setdefault(kernel["name"], {})[result["arch"]] = kernel
    for name, per_arch in sorted(kernels.items()):
        dynamic = requests.get(name)
        cells = []
        for arch in ARCHS:
            k = per_arch.get(arch)
            if k is None:
                cells.append(f"sm_{arch}: {'-':>9} {'-':>4} {'-':>5}")
                continue
            cells.append(f"sm_{arch}: {k['shared'] / 1024:9.1f} {k['registers']:>4} {k['spills']:>5}")
            total = k["shared"] + (dynamic or 0)
            if total > SHARED_LIMITS[arch]:
                failures.append(f"{name} sm_{arch}: requests {total} B of shared memory, above the "
                                f"{SHARED_LIMITS[arch]} B limit")
            if k["spills"]:
                spilling.append(f"{name} sm_{arch}")
        shown = "-" if dynamic is None else f"{dynamic / 1024:.1f}"
        print(f"{name:<66} {shown:>11} | " + " | ".join(cells))
    if spilling:
        # Reported, not failed: the CUDA kernels' register budget is their own (DESIGN: no spills in main
        # loops); the Triton section fails on spills in default variants.
        print(f"register spills (reported, not failed) in {len(spilling)}: {', '.join(spilling)}")
    never_launched = sorted(name for name in kernels if name not in requests)
    if never_launched:
        print(f"(not launched by the recorded calls: {', '.join(never_launched)})")
    print(f"CUDA section took {time.time() - start:.0f} s", flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", choices=("triton", "cuda"), help="run one section")
    parser.add_argument("--variants", metavar="REGEX", help="Triton: only the variants whose label matches")
    args = parser.parse_args()
    start = time.time()
    os.environ.pop("TRITON_INTERPRET", None)
    # Triton's own cache would skip ptxas (and its register report) on a hit; results are cached here.
    # Removed however the run ends: a fresh run leaves several hundred MB of compiled kernels in it.
    with tempfile.TemporaryDirectory(prefix="gpu-static-check-triton-") as triton_cache:
        os.environ["TRITON_CACHE_DIR"] = triton_cache
        failures = []
        if args.only in (None, "triton"):
            failures += _triton_section(args.jobs, args.variants)
        if args.only in (None, "cuda"):
            failures += _cuda_section(args.jobs)
    print(f"gpu-static-check took {time.time() - start:.0f} s")
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print("gpu-static-check passed")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
