"""What the processes kvserve starts share (`serve --data-parallel-size` replicas, tensor-parallel ranks)."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent(sig: signal.Signals) -> None:
    """In a child: `sig` when the parent dies, however it dies (Linux' PR_SET_PDEATHSIG, even when the parent
    is SIGKILLed), so that no child outlives its launcher holding a port, memory or cores. Per thread: the
    signal comes when the thread that started the child ends. Without Linux / glibc it does nothing, and
    the launcher's own shutdown is what stops its children."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
