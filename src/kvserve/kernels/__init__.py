"""kvserve's native CPU kernels, compiled on first use.

Two builds, each once per machine with torch.utils.cpp_extension (a C++ compiler and ninja) into
kvserve's cache folder, keyed by the sources, the flags, the torch version and the CPU:

- `cpu_ops()`: kv_dequant.cpp, the int8 KV cache's attention and gather (kv/quant.py has the
  format), loaded as torch.ops.kvserve. PyTorch has no int8 x float product, so attention over an
  int8 cache in plain PyTorch first dequantizes every gathered block in passes over memory.
- `compute_ops()`: linear.cpp, paged_attention.cpp, fused.cpp and decoder.cpp, the forward pass's
  matrix products on quantized and fp32 weights, decode attention over a plain fp32 cache, the fused
  norm / activation / rotary operations, and a stack of Llama layers run in one call for decode
  steps, as a Python module. It is
  built for one instruction set, chosen at run time from the CPU's flags: `avx512` (AVX-512 F/BW/VL,
  with VNNI where present: -march=native) or `avx2` (AVX2 + FMA + F16C, the baseline). Tests build
  both on a machine that has AVX-512.

Without a compiler, on a CPU without AVX2, or with KVSERVE_CPU_KERNELS=0, both return None and the
callers keep their plain PyTorch paths: the same results up to float rounding, only slower.
KVSERVE_CPU_KERNELS=avx2 (or avx512) picks that build on a CPU that runs both, to measure one kind
of machine's path on the other. The variable is the one setting read from the environment, since it
selects an implementation, not a behaviour.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from types import ModuleType
from typing import Any

import torch

logger = logging.getLogger("kvserve")

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "kv_dequant.cpp")
COMPUTE_SOURCES = [
    os.path.join(HERE, name) for name in ("linear.cpp", "paged_attention.cpp", "fused.cpp", "decoder.cpp")
]
# -ffast-math: lets the compiler vectorize the float sums and use the vector exp; the kernels keep
# no infinities or NaNs of their own (scores start at the lowest finite float).
# -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller (ATen/ParallelOpenMP.h), so
# without it the kernels run on one thread; the process's libgomp (torch's) is the one it binds to.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
ISA_FLAGS = {
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffast-math", "-fopenmp"],
    "avx512": ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
}
ISA_NEEDS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}}

# A build takes ~1 minute on 2 cores; a lock file older than this was left by a killed one.
STALE_LOCK_SECONDS = 600
_lock = threading.Lock()
_ops: Any = None
_tried = False
_compute: dict[str, ModuleType | None] = {}


KERNELS_SETTINGS = ("0", "1", "avx2", "avx512")


def _setting() -> str:
    """KVSERVE_CPU_KERNELS: 0 (off), 1 (the default: the best build for this CPU), avx2 or avx512."""
    value = os.environ.get("KVSERVE_CPU_KERNELS", "1")
    if value not in KERNELS_SETTINGS:
        raise ValueError(f"KVSERVE_CPU_KERNELS={value!r}: expected one of {', '.join(KERNELS_SETTINGS)}")
    return value


def enabled() -> bool:
    return _setting() != "0"


def cpu_ops() -> Any:
    """torch.ops.kvserve with `decode_attention` and `gather_dequant` (kv_dequant.cpp), building them on
    the first call; None when disabled or when they cannot be built (the reason is logged once)."""
    global _ops, _tried
    if not enabled():
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _ops = _build("kvserve_kernels", [SOURCE], CFLAGS, python_module=False)
            except Exception as error:  # no compiler, no headers: the PyTorch path still works
                logger.warning("kvserve's CPU kernels could not be built (%s); int8 KV uses plain PyTorch", error)
    return _ops


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_isa() -> str | None:
    """The one KVSERVE_CPU_KERNELS names (avx2 or avx512), else avx512 where the CPU has it, else avx2,
    else None (no compiled compute kernels)."""
    chosen = _setting()
    if chosen in ISA_NEEDS:
        return chosen  # compute_ops raises if this CPU lacks it
    flags = cpu_flags()
    for isa in ("avx512", "avx2"):
        if ISA_NEEDS[isa] <= flags:
            return isa
    return None


def available_isas() -> list[str]:
    flags = cpu_flags()
    return [isa for isa in ("avx2", "avx512") if ISA_NEEDS[isa] <= flags]


def compute_ops(isa: str | None = None) -> ModuleType | None:
    """The compute kernels (linear.cpp, paged_attention.cpp, fused.cpp, decoder.cpp) built for `isa` (default: the best this CPU runs),
    building them on the first call; None when disabled, when the CPU lacks AVX2, or when they
    cannot be built (logged once)."""
    if not enabled():
        return None
    isa = isa or best_isa()
    if isa is None:
        return None
    with _lock:
        if isa not in _compute:
            if not ISA_NEEDS[isa] <= cpu_flags():  # asked again, it raises again
                raise ValueError(f"this CPU lacks {sorted(ISA_NEEDS[isa] - cpu_flags())} for the {isa} kernels")
            _compute[isa] = None
            try:
                _compute[isa] = _build(f"kvserve_compute_{isa}", COMPUTE_SOURCES, ISA_FLAGS[isa], python_module=True)
            except Exception as error:
                logger.warning("kvserve's %s compute kernels could not be built (%s); using PyTorch", isa, error)
    return _compute[isa]


def _build(name: str, sources: list[str], cflags: list[str], python_module: bool) -> Any:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    digest = hashlib.sha256(torch.__version__.encode() + " ".join(cflags).encode() + _cpu_id())
    # the headers beside the sources (what they may include): a header's change rebuilds every build here
    headers = sorted(glob.glob(os.path.join(os.path.dirname(sources[0]), "*.h")))
    for source in [*sources, *headers]:
        with open(source, "rb") as f:
            digest.update(f.read())
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    build_dir = os.path.join(cache, "kvserve", "kernels", digest.hexdigest()[:16])
    os.makedirs(build_dir, exist_ok=True)
    library = os.path.join(build_dir, f"{name}.so")
    if os.path.exists(library):
        # The folder's name is the hash of the sources, flags, torch and CPU: its library is theirs.
        # Loading it directly skips ninja, which would rebuild whenever the sources' path differs (a
        # second checkout of the same code) and wait forever on a lock a killed build left behind.
        try:
            return _load_library(name, library, python_module)
        except (ImportError, OSError) as error:  # a build killed while linking: build it again
            logger.warning("kvserve's kernel library %s did not load (%s); rebuilding it", library, error)
            os.unlink(library)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
        logger.warning("removing %s, left by a build that did not finish", lock)
        os.unlink(lock)
    logger.info("compiling kvserve's CPU kernels %s into %s (once per machine)", name, build_dir)
    start = time.perf_counter()
    module = cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
        is_python_module=python_module,
        verbose=False,
    )
    logger.info("compiled %s in %.1f s", name, time.perf_counter() - start)
    return module if python_module else torch.ops.kvserve


def _load_library(name: str, library: str, python_module: bool) -> Any:
    if not python_module:
        torch.ops.load_library(library)
        return torch.ops.kvserve
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_id() -> bytes:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [line for line in f.read().splitlines() if line.startswith((b"model name", b"flags"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return (platform.machine() + platform.processor()).encode()
