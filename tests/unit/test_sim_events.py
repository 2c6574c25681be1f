import math

import pytest

from fleetserve.sim.events import VirtualClock, WakeupQueue


def test_wakeups_pop_in_time_order_with_key_ties():
    queue = WakeupQueue(4)
    queue.schedule(2, 1.0)
    queue.schedule(0, 0.5)
    queue.schedule(1, 1.0)
    queue.schedule(3, 9.0)
    assert queue.pop_due(1.0) == [0, 1, 2]
    assert queue.next_time() == 9.0
    assert queue.pop_due(8.9) == []


def test_rescheduling_supersedes_the_old_time():
    queue = WakeupQueue(2)
    queue.schedule(0, 5.0)
    queue.schedule(0, 2.0)
    queue.schedule(1, 3.0)
    queue.schedule(1, 7.0)
    assert queue.pending(1) == 7.0
    assert queue.pop_due(5.0) == [0]
    assert queue.next_time() == 7.0
    queue.schedule(1, None)
    assert not queue
    assert queue.next_time() == math.inf


def test_a_popped_key_is_no_longer_pending():
    queue = WakeupQueue(1)
    queue.schedule(0, 1.0)
    assert queue.pop_due(1.0) == [0]
    assert queue.pending(0) == math.inf
    queue.schedule(0, 1.0)  # the same time again is a new wake-up, not a duplicate
    assert queue.pop_due(2.0) == [0]


def test_virtual_clock_never_goes_back():
    clock = VirtualClock(1.0)
    clock.advance_to(2.5)
    assert clock.now == 2.5
    with pytest.raises(RuntimeError):
        clock.advance_to(2.0)
