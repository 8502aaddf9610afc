"""A worker dies with its front end (service/workers/lifeline.py), even one that never reads its pipe again (busy
in a long forward): the parent-death signal, and the watchdog where the signal is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

PARENT = """
import multiprocessing as mp, os, sys, time
from tests.service.test_lifeline import busy_child
if __name__ == "__main__":
    p = mp.get_context("spawn").Process(target=busy_child, args=(os.getpid(), sys.argv[1]))
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


def busy_child(parent_pid: int, how: str) -> None:
    from service.workers import lifeline

    if how == "signal":
        lifeline.die_with_parent(parent_pid)
    elif how == "watchdog":  # as on a system without prctl
        lifeline.set_parent_death_signal = lambda sig=None: False
        lifeline.die_with_parent(parent_pid)
    while True:  # busy, never reading a pipe: only the lifeline can end it
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("how", ["signal", "watchdog"])
def test_a_busy_worker_dies_within_5s_of_a_kill_9_of_its_parent(how):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the child has started its lifeline
        assert _alive(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"child {child} outlived its parent ({how})"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
