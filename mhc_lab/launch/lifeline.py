"""Processes that die with their parent, and a lock that outlives none of them.

Whatever ends the process that started a sweep (SIGKILL, the OOM killer, a closed SSH
session, `timeout`, a Slurm time limit), the processes it started to train runs must not
train on without it, nor outlive the lock it held on the results folder.

- `die_with_parent(parent_pid)`, called first thing in a child: on Linux the kernel's
  parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL) ends the child the moment its parent
  exits; everywhere (macOS too) a daemon thread also checks the parent process id every
  `POLL_S` seconds and ends the child once it changes (the child was re-parented). The
  kernel's signal fires when the parent's *thread* that started the child exits, so it is
  asked for only where that thread lives as long as the work (the worker pool: workers.py);
  torchrun's ranks rely on the thread alone.
- `InheritedFd(fd)`: a file descriptor handed to a spawned process through multiprocessing's
  own descriptor passing, which keeps it open for its whole life. The results folder's lock
  (a flock, store/files.py) belongs to the open file, so a worker holding a copy keeps the
  folder locked until it has exited, even if the parent is killed first.

Only the lock matters for correctness (nothing writes under a released lock); the death of
the children is what keeps them from training on, or hanging, unseen.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

POLL_S = 0.25  # how often a child checks that its parent is still there
PR_SET_PDEATHSIG = 1  # linux/prctl.h


_parent: Optional[int] = None  # the parent this process dies with, once die_with_parent ran


def die_with_parent(parent_pid: int, kernel_signal: bool = False) -> None:
    """End this process (SIGKILL) as soon as `parent_pid` is no longer its parent.

    `kernel_signal`: also ask Linux for PR_SET_PDEATHSIG (see the module docstring for when
    that is safe)."""
    global _parent
    _parent = parent_pid
    if kernel_signal and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):  # no libc symbol: the thread below still watches
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was asked for
        _die()
    threading.Thread(target=_watch, args=(parent_pid,), name="mhc-lab-lifeline", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent_pid:
            _die()


def orphaned() -> bool:
    """Whether this process's parent, the one it dies with, is gone (the watching thread may
    not have noticed yet). A rank whose peer died with torchrun asks this before it records
    the run as failed: the failure is the kill's, not the run's."""
    return _parent is not None and os.getppid() != _parent


def die_if_orphaned() -> None:
    """End this process now if its parent is gone (see `orphaned`)."""
    if orphaned():
        _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # like the kernel's signal: no cleanup, files stay atomic


class InheritedFd:
    """A file descriptor that a spawned child receives as the same open file (pickled while
    multiprocessing starts the child, as it passes pipes) and keeps open until it exits."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _adopt, (reduction.DupFd(self.fd),)


def _adopt(duplicate) -> InheritedFd:
    return InheritedFd(duplicate.detach())
