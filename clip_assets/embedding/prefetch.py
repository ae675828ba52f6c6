"""Running an iterator ahead in a thread, so its producer and its consumer use two cores."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """The items of `items`, produced in a background thread at most `depth` ahead of the consumer.

    An exception in the producer is raised to the consumer where the item would have come; a consumer
    that stops early stops the producer at its next item.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((_DONE, exc))

    producer = threading.Thread(target=produce, name="clip-assets-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                pass
            producer.join(timeout=0.05)
