"""Compute slots: never more holders than slots, a killed holder frees its slot, and a waiter gets
the slot only once it is released, sleeping meanwhile.

Events are ordered by a counter shared by the processes (taken after a slot is acquired and
before it is released), not by clocks; every wait on another process has a generous bound that
only turns a hang (a leaked lock) into a failure."""

import multiprocessing as mp
import os
import queue
import signal
import time
import uuid

from population.slots import compute_slot

HANG_GUARD = 60  # seconds; only ever reached when something hangs


def tick(counter) -> int:
    with counter.get_lock():
        counter.value += 1
        return counter.value


def hold(key, slots, seconds, log, counter):
    with compute_slot(key, slots):
        log.put(("in", os.getpid(), tick(counter)))
        time.sleep(seconds)
        log.put(("out", os.getpid(), tick(counter)))


def wait_for_slot(key, log, counter):
    import resource

    log.put(("waiting", os.getpid(), tick(counter)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    with compute_slot(key, 1):
        log.put(("got", os.getpid(), tick(counter), resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before))


def expect(log, kind: str, why: str) -> tuple:
    try:
        event = log.get(timeout=HANG_GUARD)
    except queue.Empty:
        raise AssertionError(f"no {kind!r} event in {HANG_GUARD} s: {why}") from None
    assert event[0] == kind, (event, kind)
    return event


def stop(*processes):
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join(HANG_GUARD)


def test_at_most_slots_holders_at_once():
    key, ctx = uuid.uuid4().hex[:12], mp.get_context("fork")
    log, counter = ctx.Queue(), ctx.Value("l", 0)
    workers = [ctx.Process(target=hold, args=(key, 2, 0.3, log, counter)) for _ in range(5)]
    try:
        for w in workers:
            w.start()
        events = []
        for _ in range(10):
            try:
                events.append(log.get(timeout=HANG_GUARD))
            except queue.Empty:
                raise AssertionError(f"holders stuck after {events}") from None
    finally:
        stop(*workers)
    events.sort(key=lambda e: e[2])
    inside = peak = 0
    for kind, _, _ in events:
        inside += 1 if kind == "in" else -1
        peak = max(peak, inside)
    assert peak == 2, events  # both slots used, never a third holder
    # Each holder after the first two started only after another one had ended.
    ins = [e for e in events if e[0] == "in"]
    outs = [e for e in events if e[0] == "out"]
    for k, entered in enumerate(ins[2:]):
        assert sum(out[2] < entered[2] for out in outs) >= k + 1, events
    for pid in {e[1] for e in events}:
        (entered,), (left,) = ([e[2] for e in events if e[1] == pid and e[0] == kind] for kind in ("in", "out"))
        assert entered < left


def test_a_killed_holder_releases_its_slot():
    """The kernel releases a killed holder's lock: a process waiting for the only slot gets it
    after the kill (a leaked lock would leave it blocked: the hang guard fails the test)."""
    key, ctx = uuid.uuid4().hex[:12], mp.get_context("fork")
    log, counter = ctx.Queue(), ctx.Value("l", 0)
    holder = ctx.Process(target=hold, args=(key, 1, 600, log, counter))
    waiter = ctx.Process(target=wait_for_slot, args=(key, log, counter))
    try:
        holder.start()
        expect(log, "in", "the holder never got the free slot")
        waiter.start()
        expect(log, "waiting", "the waiter did not start")
        time.sleep(0.5)  # let the waiter block on the held slot (no assertion on time)
        killed = tick(counter)
        os.kill(holder.pid, signal.SIGKILL)
        got = expect(log, "got", "the killed holder's slot was never released")
    finally:
        stop(holder, waiter)
    assert got[2] > killed, "the waiter got the slot while its holder was alive"


def test_waiting_sleeps_until_a_slot_is_released():
    """The waiter gets the slot only after the holder released it, and blocks meanwhile (a
    handful of wake-ups in the holder's 2 s, not one every few milliseconds)."""
    key, ctx = uuid.uuid4().hex[:12], mp.get_context("fork")
    log, counter = ctx.Queue(), ctx.Value("l", 0)
    holder = ctx.Process(target=hold, args=(key, 1, 2.0, log, counter))
    waiter = ctx.Process(target=wait_for_slot, args=(key, log, counter))
    try:
        holder.start()
        expect(log, "in", "the holder never got the free slot")
        waiter.start()
        events = {}
        for _ in range(3):
            try:
                event = log.get(timeout=HANG_GUARD)
            except queue.Empty:
                raise AssertionError(f"stuck after {events}") from None
            events[event[0]] = event
    finally:
        stop(holder, waiter)
    assert set(events) == {"waiting", "out", "got"}, events
    assert events["waiting"][2] < events["out"][2], "the waiter started after the holder was done"
    assert events["got"][2] > events["out"][2], "the waiter got the slot before the holder released it"
    wakeups = events["got"][3]
    assert wakeups < 60, f"{wakeups} voluntary context switches while waiting for a slot held 2 s"
