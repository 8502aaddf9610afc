"""A worker process dies with the front end that started it: never an orphan computing for nobody.

Two mechanisms, because either alone has a gap: the parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`: the
kernel sends SIGKILL when the thread that started this process exits, whatever killed it, `kill -9` included) and
a watchdog thread that polls the parent's pid (other systems, and a parent gone before the prctl call ran).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger("logitserve.workers")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_INTERVAL_S = 0.5


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent thread exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc with prctl
        return False


def _watch(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # reparented: the front end is gone
        threading.Event().wait(WATCHDOG_INTERVAL_S)


def die_with_parent(parent_pid: int) -> None:
    """Call first thing in a worker: it ends as soon as `parent_pid` (the front end) does."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:  # gone before the signal was asked for
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watchdog", daemon=True).start()
