"""prefetch: runs ahead in a thread, keeps order, hands errors to the consumer, stops cleanly."""

from __future__ import annotations

import threading
import time

import pytest

from hfbatch.jobs.core import prefetch


def test_order_and_completeness() -> None:
    assert list(prefetch(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(prefetch(iter([]))) == []


def test_producer_runs_ahead_while_the_consumer_works() -> None:
    produced: list[int] = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    stream = prefetch(items(), depth=2)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:  # the consumer is busy elsewhere...
        time.sleep(0.01)
    assert len(produced) == 3  # ...and items 1 and 2 were made meanwhile, but no more than depth ahead
    assert list(stream) == [1, 2, 3, 4]


def test_errors_reach_the_consumer_in_place() -> None:
    def items():
        yield 1
        yield 2
        raise ValueError("row 3 is bad")

    stream = prefetch(items())
    assert next(stream) == 1 and next(stream) == 2
    with pytest.raises(ValueError, match="row 3 is bad"):
        next(stream)


def test_consumer_stopping_early_stops_the_producer() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    for i in prefetch(endless(), depth=2):
        if i == 10:
            break
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before  # the prefetch thread ended
