"""prefetch(): run an iterator ahead in a background thread, a bounded number of items ahead.

Reading and validating chunk N+1 then overlaps the model's work on chunk N: torch releases the
GIL while it computes, so the two really run at once, and memory stays bounded: `depth` items
queued, one being made, one being used.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield what `items` yields, in order; its exceptions are raised here, in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return  # the consumer stopped early
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's own cleanup (open files) runs here, in its thread

    thread = threading.Thread(target=produce, name="hfbatch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = q.get()
            if value is _DONE:
                return
            if isinstance(value, _Failed):
                raise value.exc
            yield value
    finally:
        # The producer stops at its next hand-over; a read already under way finishes first
        # (it cannot be interrupted), in a daemon thread, without anyone waiting for it.
        stop.set()
        thread.join(timeout=0.5)
