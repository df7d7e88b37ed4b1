"""The one loader for the CUDA kernels in `cuda/*.cu`.

A kernel file is compiled by `nvcc` into a cubin for one architecture and loaded as a
`cupy.RawModule`. Compiled cubins are cached on disk; the cache key hashes everything that can change
the binary: the source, every header in `cuda/`, the defines, the architecture, the nvcc version and
the flags. Compilation needs no GPU (CI compiles every file for sm_90a); loading does.

    mod = load("rmsnorm")                    # cupy.RawModule for the current device
    fn = mod.get_function("add_rmsnorm_bf16")
    launch(fn, grid, block, (ptr, ...), stream=stream)

Kernels are `extern "C"` so their names are stable; scalar arguments must be numpy scalars of the exact
C type (`np.int32`, `np.float32`, `np.uint64`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr")


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    d = os.environ.get("TW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tw", "kernels")
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def nvcc() -> str:
    """Path of nvcc: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, or the PATH."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        raise KernelBuildError("nvcc not found: set CUDA_HOME or put the CUDA toolkit's bin/ on PATH "
                               "(tw compiles cuda/*.cu with nvcc at first use)")
    return found


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def source_path(name: str) -> Path:
    path = CUDA_DIR / f"{name}.cu"
    if not path.exists():
        known = sorted(p.stem for p in CUDA_DIR.glob("*.cu"))
        raise KernelBuildError(f"no kernel file cuda/{name}.cu; known: {known}")
    return path


def all_kernel_names() -> list[str]:
    return sorted(p.stem for p in CUDA_DIR.glob("*.cu"))


def _define_flags(defines: dict | None) -> list[str]:
    return [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]


def _gencode(arch: str) -> list[str]:
    """'sm_90a' -> the -gencode form (the -arch shorthand also runs a plain sm_90 pass that rejects
    sm_90a-only instructions)."""
    if not arch.startswith("sm_"):
        raise ValueError(f"arch must look like 'sm_90a', got {arch!r}")
    num = arch[3:]
    return [f"-gencode=arch=compute_{num},code={arch}"]


def cache_key(name: str, defines: dict | None, arch: str, kind: str) -> str:
    h = hashlib.sha256()
    h.update(source_path(name).read_bytes())
    for header in sorted(CUDA_DIR.glob("*.cuh")):
        h.update(header.name.encode())
        h.update(header.read_bytes())
    h.update(repr(sorted((defines or {}).items())).encode())
    h.update(f"{arch}|{kind}|{nvcc_version()}|{NVCC_FLAGS}".encode())
    return h.hexdigest()[:24]


def compile(name: str, arch: str = "sm_90a", defines: dict | None = None, kind: str = "cubin") -> Path:
    """Compile cuda/{name}.cu to a cubin (or 'ptx') for `arch`; return the cached file's path."""
    if kind not in ("cubin", "ptx"):
        raise ValueError(f"kind must be 'cubin' or 'ptx', got {kind!r}")
    key = cache_key(name, defines, arch, kind)
    out = cache_dir() / f"{name}-{arch}-{key}.{kind}"
    if out.exists():
        return out
    gencode = _gencode(arch) if kind == "cubin" else [f"-arch=compute_{arch[3:]}"]
    # Write to a private temp file, then rename: several MPI ranks may compile the same file at once.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=f".{kind}")
    os.close(fd)
    cmd = [nvcc(), f"-{kind}", *gencode, *NVCC_FLAGS, f"-I{CUDA_DIR}", *_define_flags(defines),
           "-o", tmp, str(source_path(name))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"nvcc failed on cuda/{name}.cu for {arch}:\n{' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, out)
    return out


def device_arch(device_id: int | None = None) -> str:
    """Architecture of the current CUDA device: sm_90a on Hopper (for wgmma/multimem), else sm_XY."""
    import cupy as cp
    dev = cp.cuda.Device(device_id) if device_id is not None else cp.cuda.Device()
    major, minor = dev.compute_capability[0], dev.compute_capability[1:]
    arch = f"sm_{major}{minor}"
    return arch + "a" if arch == "sm_90" else arch


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, defines_items: tuple, arch: str, device_id: int):
    import cupy as cp
    path = compile(name, arch, dict(defines_items))
    with cp.cuda.Device(device_id):
        return cp.RawModule(path=str(path))


def load(name: str, defines: dict | None = None):
    """cupy.RawModule of cuda/{name}.cu for the current device (compiled once, then cached)."""
    import cupy as cp
    device_id = cp.cuda.Device().id
    return _load_cached(name, tuple(sorted((defines or {}).items())), device_arch(device_id), device_id)


def function(name: str, kernel: str, defines: dict | None = None):
    """A kernel function by file and name, e.g. function('rmsnorm', 'add_rmsnorm_bf16')."""
    return load(name, defines).get_function(kernel)


@functools.lru_cache(maxsize=None)
def device_facts(device_id: int) -> tuple[str, int]:
    """(name, SM count) of CUDA device `device_id`: the one place that asks the driver for them."""
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return (name.decode() if isinstance(name, bytes) else str(name)), int(props["multiProcessorCount"])


def launch(fn, grid, block, args, shared_mem: int = 0, stream=None) -> None:
    """Launch `fn` on `stream` (a cupy Stream; None = the current stream)."""
    import cupy as cp
    grid = grid if isinstance(grid, tuple) else (int(grid),)
    block = block if isinstance(block, tuple) else (int(block),)
    if shared_mem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = shared_mem
    fn(grid, block, args, shared_mem=shared_mem, stream=stream or cp.cuda.get_current_stream())
