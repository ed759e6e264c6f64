"""kvserve/heap.py: where glibc puts large allocations while the model loads and while it serves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvserve import heap

# Run in a fresh interpreter: the mmap threshold applies where malloc would grow the heap, and in a
# process that has run other tests, a free chunk in the heap may take an allocation of any size.
_CHECK = """
import ctypes
from kvserve import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mapped(nbytes):
    before = libc.mallinfo2().hblkhd
    pointer = libc.malloc(nbytes)
    result = libc.mallinfo2().hblkhd - before >= nbytes
    libc.free(pointer)
    return result

with heap.load_outside_the_heap():
    loading = mapped(2 * heap.LOAD_MMAP_THRESHOLD)
print(loading, mapped(heap.SERVE_MMAP_THRESHOLD // 4), mapped(2 * heap.SERVE_MMAP_THRESHOLD))
try:
    with heap.load_outside_the_heap():
        raise RuntimeError
except RuntimeError:
    print(mapped(2 * heap.LOAD_MMAP_THRESHOLD))
"""


def test_loading_maps_its_arrays_and_serving_maps_only_large_activations():
    if heap._glibc("mallinfo2") is None:
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, check=True).stdout.split()
    # While loading: a 128 KiB array is mapped (unmapped whole when freed). Serving: a step's 256 KiB
    # activation comes from the heap, a 2 MiB one is mapped (it never grows the heap). A failed load
    # leaves the serving thresholds too.
    assert out == ["True", "False", "True", "False"]
