"""kvserve's native CPU kernels (kv_dequant.cpp), compiled on first use.

PyTorch has no int8 x float product, so attention over an int8 KV cache in plain PyTorch first
dequantizes every gathered block in passes over memory; kv_dequant.cpp reads the codes where they lie
instead (kv/quant.py has the format). It is built once per machine with torch.utils.cpp_extension (a
C++ compiler and ninja; ~15 s) into kvserve's cache folder, keyed by the source, the torch version and
the CPU (it is compiled for the machine's own vector instructions), and loaded as torch.ops.kvserve.

Without a compiler, or with KVSERVE_CPU_KERNELS=0, `cpu_ops()` is None and attention.py keeps its
plain PyTorch path: the same results up to float rounding, only slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from typing import Any

import torch

logger = logging.getLogger("kvserve")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kv_dequant.cpp")
# -ffast-math: lets the compiler vectorize the float sums and use the vector exp; the kernels keep
# no infinities or NaNs of their own (scores start at the lowest finite float).
# -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller (ATen/ParallelOpenMP.h), so
# without it the kernels run on one thread; the process's libgomp (torch's) is the one it binds to.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

_lock = threading.Lock()
_ops: Any = None
_tried = False


def cpu_ops() -> Any:
    """torch.ops.kvserve with `decode_attention` and `gather_dequant` (kv_dequant.cpp), building them on
    the first call; None when disabled or when they cannot be built (the reason is logged once)."""
    global _ops, _tried
    if os.environ.get("KVSERVE_CPU_KERNELS", "1") == "0":
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _ops = _build()
            except Exception as error:  # no compiler, no headers: the PyTorch path still works
                logger.warning("kvserve's CPU kernels could not be built (%s); int8 KV uses plain PyTorch", error)
    return _ops


def _build() -> Any:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the ninja wheel's binary, when its venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + torch.__version__.encode() + " ".join(CFLAGS).encode() + _cpu_id()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    build_dir = os.path.join(cache, "kvserve", "kernels", key)
    os.makedirs(build_dir, exist_ok=True)
    built = os.path.exists(os.path.join(build_dir, "kvserve_kernels.so"))
    if not built:
        logger.info("compiling kvserve's CPU kernels into %s (once per machine)", build_dir)
    start = time.perf_counter()
    cpp_extension.load(
        name="kvserve_kernels",
        sources=[SOURCE],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    if not built:
        logger.info("compiled kvserve's CPU kernels in %.1f s", time.perf_counter() - start)
    return torch.ops.kvserve


def _cpu_id() -> bytes:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [line for line in f.read().splitlines() if line.startswith((b"model name", b"flags"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return (platform.machine() + platform.processor()).encode()
