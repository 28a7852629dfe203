"""Compute slots: never more holders than slots, and a killed holder frees its slot."""

import multiprocessing as mp
import os
import signal
import time
import uuid

from population.slots import compute_slot


def hold(key, slots, seconds, log):
    with compute_slot(key, slots):
        log.put(("in", time.monotonic()))
        time.sleep(seconds)
        log.put(("out", time.monotonic()))


def test_at_most_slots_holders_at_once():
    key, ctx = uuid.uuid4().hex[:12], mp.get_context("fork")
    log = ctx.Queue()
    workers = [ctx.Process(target=hold, args=(key, 2, 0.3, log)) for _ in range(5)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    events = sorted((log.get(timeout=5) for _ in range(10)), key=lambda e: e[1])
    inside = peak = 0
    for kind, _ in events:
        inside += 1 if kind == "in" else -1
        peak = max(peak, inside)
    assert peak == 2
    assert events[-1][1] - events[0][1] >= 0.3 * 3 - 0.05  # five turns of 0.3 s on two slots


def test_a_killed_holder_releases_its_slot():
    key, ctx = uuid.uuid4().hex[:12], mp.get_context("fork")
    log = ctx.Queue()
    holder = ctx.Process(target=hold, args=(key, 1, 60, log))
    holder.start()
    assert log.get(timeout=10)[0] == "in"
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    start = time.monotonic()
    with compute_slot(key, 1) as waited:
        assert waited < 2
    assert time.monotonic() - start < 2


def wait_for_slot(key, log):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    with compute_slot(key, 1) as waited:
        log.put((waited, resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before))


def test_waiting_sleeps_until_a_slot_is_released():
    """The waiter blocks (a handful of wake-ups in 2 s, not one every few milliseconds) and gets the
    slot once the holder lets go."""
    key, ctx = uuid.uuid4().hex[:12], mp.get_context("fork")
    log = ctx.Queue()
    holder = ctx.Process(target=hold, args=(key, 1, 2.0, log))
    holder.start()
    assert log.get(timeout=10)[0] == "in"
    waiter = ctx.Process(target=wait_for_slot, args=(key, log))
    waiter.start()
    assert log.get(timeout=10)[0] == "out"
    waited, wakeups = log.get(timeout=10)
    holder.join(10)
    waiter.join(10)
    assert 1.0 < waited < 10
    assert wakeups < 60, f"{wakeups} voluntary context switches while waiting {waited:.1f} s"
