"""Compute slots: at most one organism per core computes at a time on a node.

With fractional CPUs (32 organisms on 2 cores) every organism's actor is alive at once and the
operating system time-slices them; each switch evicts the other organism's weights and state
from the core's caches. Measured on the 2-core development machine, four processes sharing two
cores did 18% less work than two processes (one per core). So each generation of an organism is
computed while holding one of the node's slot locks (``fcntl.flock`` on a file per core under the
temp dir, named by the Ray node): organisms take turns a whole generation at a time.

Waiting costs no CPU: waiters block on one gate lock; only the gate's holder looks for a free
slot (every few milliseconds), takes it and opens the gate for the next. Locks held by an actor
that dies are released by the kernel, so a crash never leaks a slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

POLL_SECONDS = 0.002


def slot_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def compute_slot(node_key: str, slots: int):
    """Hold one of ``slots`` locks shared by every process of this node with the same key.
    Yields the seconds spent waiting for it."""
    folder = Path(tempfile.gettempdir()) / f"gsnn-slots-{node_key}"
    folder.mkdir(parents=True, exist_ok=True)
    gate = open(folder / "gate", "a+")
    handles = [open(folder / f"slot-{k}", "a+") for k in range(slots)]
    start = time.perf_counter()
    held = None
    try:
        fcntl.flock(gate.fileno(), fcntl.LOCK_EX)  # blocks without spinning
        try:
            while held is None:
                for handle in handles:
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    held = handle
                    break
                else:
                    time.sleep(POLL_SECONDS)
        finally:
            fcntl.flock(gate.fileno(), fcntl.LOCK_UN)
        yield time.perf_counter() - start
    finally:
        if held is not None:
            fcntl.flock(held.fileno(), fcntl.LOCK_UN)
        for handle in (gate, *handles):
            handle.close()
