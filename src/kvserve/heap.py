"""How the process uses glibc's malloc heap, which holds everything PyTorch allocates on the CPU.

Resident memory is what the heap has touched and not handed back, not what is live: glibc returns a
free chunk's pages only from the top of the heap (past M_TRIM_THRESHOLD) or when malloc_trim asks,
and chunks that fall free between live ones stay holes in the address space. A hole whose pages went
back to the OS costs nothing until an allocation lands in it again; then its pages are resident once
more, for good. So a serving process's resident memory is set by where its allocations land, and
this module decides that:

- `load_outside_the_heap()`: while the model loads, an allocation of 64 KiB or more never grows the
  heap: it takes free heap space where some fits, else a mapping of its own, unmapped whole when
  freed. Loading makes hundreds of MB of short-lived arrays (the file's blocks, repacked codes, the
  parts a fused projection concatenates) among the weights and the KV cache it keeps; in the heap
  they left a ~210 MB hole under the KV cache (the default model), in which every step's activations
  then landed, touching fresh pages: the server's resident memory crept up by ~50 MiB over a
  benchmark. With them mapped, the heap after loading holds small objects
  only; serving keeps its large activations out of it the same way (SERVE_MMAP_THRESHOLD), or in
  buffers it reuses (models/layers.py's Workspace).
- `share_one_heap()`: the server's threads allocate from one heap, not an arena each.
- `return_freed_memory()` / `settle_heap()`: free pages back to the OS, after loading and whenever
  the engine falls idle.

Each is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# While loading: allocations this large or larger are mapped when the heap would have to grow for them
# (glibc's mmap threshold, which applies where free heap space does not fit; its default starts at
# 128 KiB and rises with every mapped chunk freed, up to 32 MiB: after the first large free, loading's
# arrays all went to the heap).
LOAD_MMAP_THRESHOLD = 64 << 10
# While serving: a step's activations of 1 MiB or more (a decode batch's logits) never grow the heap
# either, so they never leave holes in it under what a step keeps; smaller ones come from the heap's
# top, reused step after step, kept (up to SERVE_TRIM_THRESHOLD free) for the next step and handed back
# when the engine falls idle. Measured on the default model serving (Zen 4, 256-token steps): peak RSS
# 658-661 MiB against 662-671 with glibc's own rule, which raises the threshold to 32 MiB and lets
# every activation grow the heap. A mapping's pages are faulted in again, zeroed, each time: ~1,500
# faults for a 32-row decode's 6 MB of logits, ~1 ms of the step; but ~34,000 for a 256-token prefill
# step's MLP intermediates (~75 ms of system CPU time a step, ~10% of its CPU time), which therefore
# live in models/layers.py's Workspace instead (peak RSS 663-664 MiB). (The eighth session found 1, 4
# and 32 MiB equally fast interleaved in one process: there the heap, once grown at 32 MiB, kept
# serving the large tensors at 1 MiB too.) Setting a threshold turns glibc's rule off, so both are set.
SERVE_MMAP_THRESHOLD = 1 << 20
SERVE_TRIM_THRESHOLD = 64 << 20


def _glibc(name: str) -> Callable[..., int] | None:
    """glibc's function `name`, or None where the C library is another (or not loadable through ctypes)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return None


def _mallopt(param: int, value: int) -> None:
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(param, value)


@contextmanager
def load_outside_the_heap() -> Iterator[None]:
    """Allocations of LOAD_MMAP_THRESHOLD or more made inside never grow the heap (see the module's
    docstring); after, the serving thresholds hold, whether the load succeeded or not."""
    _mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)
        _mallopt(_M_TRIM_THRESHOLD, SERVE_TRIM_THRESHOLD)


def share_one_heap() -> None:
    """Makes every thread allocate from glibc's one main heap (mallopt M_ARENA_MAX = 1) instead of an arena per
    thread. A server's engine thread and HTTP thread would each keep their own arena, each holding the freed
    memory of its own busiest moment; one heap shares it. Measured on the default model serving 32 streams at
    once: peak RSS ~8 MiB lower, throughput unchanged (the engine thread's kernels do not allocate while
    they run). Called before the threads start."""
    _mallopt(_M_ARENA_MAX, 1)


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the OS (glibc's malloc_trim, ~1 ms), holes included: what a busy
    spell or the load freed would otherwise stay resident."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def settle_heap() -> None:
    """After loading: collects the garbage of the load, then freezes every object alive (gc.freeze):
    the objects of torch, the server's libraries and the tokenizer move out of the collector's sight, so
    a full collection, which took ~124 ms on the loaded default model and stalls every stream when
    it comes, now walks only what the serving itself creates. Then hands freed memory back to the OS."""
    gc.collect()
    gc.freeze()
    return_freed_memory()
