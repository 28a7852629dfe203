"""Compute slots: at most one organism per core computes at a time on a node.

With fractional CPUs (32 organisms on 2 cores) every organism's actor is alive at once and the
operating system time-slices them; each switch evicts the other organism's weights and state
from the core's caches. Measured on the 2-core development machine, four processes sharing two
cores did 18% less work than two processes (one per core). So each generation of an organism is
computed while holding one of the node's slot locks (``fcntl.flock`` on a file per core under the
temp dir, named by the Ray node): organisms take turns a whole generation at a time.

Waiting costs no CPU: waiters block on one gate lock; the gate's holder takes a free slot, or
sleeps in ``select`` on a named pipe into which every releasing holder writes a byte, and looks
again when woken. Locks held by an actor that dies are released by the kernel, so a crash never
leaks a slot; a holder that dies writes no byte, so the gate's holder also looks every
``WAKE_TIMEOUT_SECONDS``. (An earlier version polled every 2 ms: those wake-ups preempted the
organisms computing on both cores and cost the population about 5% of its throughput.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import tempfile
import time
from pathlib import Path

WAKE_TIMEOUT_SECONDS = 0.1


def slot_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _wake_pipe(folder: Path) -> int:
    """The node's wake-up pipe, open for reading and writing (a FIFO opened O_RDWR never blocks
    on open, and its writes never block: a full pipe already wakes its reader)."""
    path = folder / "released"
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _take_free(handles):
    for handle in handles:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        return handle
    return None


@contextlib.contextmanager
def compute_slot(node_key: str, slots: int):
    """Hold one of ``slots`` locks shared by every process of this node with the same key.
    Yields the seconds spent waiting for it."""
    folder = Path(tempfile.gettempdir()) / f"gsnn-slots-{node_key}"
    folder.mkdir(parents=True, exist_ok=True)
    gate = open(folder / "gate", "a+")
    handles = [open(folder / f"slot-{k}", "a+") for k in range(slots)]
    wake = _wake_pipe(folder)
    start = time.perf_counter()
    held = None
    try:
        fcntl.flock(gate.fileno(), fcntl.LOCK_EX)  # blocks without spinning
        try:
            while held is None:
                # A release writes its byte after unlocking, so a byte that arrives after this
                # drain either finds a free slot below or wakes the select.
                _drain(wake)
                held = _take_free(handles)
                if held is None:
                    select.select([wake], [], [], WAKE_TIMEOUT_SECONDS)
        finally:
            fcntl.flock(gate.fileno(), fcntl.LOCK_UN)
        yield time.perf_counter() - start
    finally:
        if held is not None:
            fcntl.flock(held.fileno(), fcntl.LOCK_UN)
            with contextlib.suppress(BlockingIOError):
                os.write(wake, b"r")
        os.close(wake)
        for handle in (gate, *handles):
            handle.close()
