"""A child process's life tied to its parent's (Linux ``PR_SET_PDEATHSIG``): when the parent dies,
even by ``kill -9`` or the out-of-memory killer, the kernel sends the child ``sig``. Used by the
training process and the temporary Prefect server a run starts; elsewhere it does nothing."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask for ``sig`` when the parent dies; False where Linux cannot be asked (other systems).
    Safe between fork and exec (``preexec_fn``)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, sig)
    return True


def parent_gone() -> bool:
    """The parent died before :func:`die_with_parent` was asked (we were handed to init)."""
    return os.getppid() == 1
