"""What one file can do to the process that reads and decodes it, and how the engine survives it.

- It can take too long (a stalled mount, a FIFO, a pathological image): `call_with_time_limit`
  gives up after the file's time limit. On a process's main thread a SIGALRM interrupts the read
  itself; SIGALRM can only be used there, so off the main thread the read runs in a helper thread
  that is abandoned, still blocked, when the time is up.
- It can kill the process (a native decoder that segfaults or aborts): each decode worker writes
  the index of the file it is reading into memory shared with the parent (`InFlightFiles`), so when
  a worker dies the file it left behind is known, and `crash_in_isolation` confirms it by decoding
  that one file in a process of its own and reading how that process ended.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from typing import Callable, TypeVar

from torch.utils.data import get_worker_info

T = TypeVar("T")

# Beyond the file's own time limit, how long a suspect may take to decode in isolation.
ISOLATION_GRACE_S = 30.0


class FileTimeout(TimeoutError):
    pass


def _expired_message(seconds: float) -> str:
    return f"gave up after {seconds:g} s (file blocked or too slow to decode)"


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise FileTimeout if the block runs longer than `seconds`. Main thread of a process only."""
    if not seconds:
        yield
        return

    def _expired(signum, frame):
        raise FileTimeout(_expired_message(seconds))

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call_with_time_limit(fn: Callable[[], T], seconds: float | None) -> T:
    """`fn()`, or FileTimeout once it has run `seconds`, on any thread.

    On the main thread SIGALRM interrupts `fn` itself. Elsewhere `fn` runs in a daemon thread and
    the caller stops waiting for it after `seconds`; a read blocked for good (a FIFO nobody writes
    to) leaves that thread behind, blocked, until the process ends.
    """
    if not seconds:
        return fn()
    if threading.current_thread() is threading.main_thread():
        with time_limit(seconds):
            return fn()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    helper = threading.Thread(target=run, name="clip-assets-file-read", daemon=True)
    helper.start()
    helper.join(seconds)
    if helper.is_alive():
        raise FileTimeout(_expired_message(seconds))
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


class InFlightFiles:
    """The index of the file each decode worker is reading, in memory the workers share with the parent.

    A worker sets its slot before it touches a file and clears it when the file is done, so after a
    worker dies its slot still names the file it died on. Outside a DataLoader worker (0 workers,
    or a process of its own) nothing is recorded.
    """

    IDLE = -1

    def __init__(self, workers: int):
        self._slots = multiprocessing.RawArray("q", [self.IDLE] * workers) if workers > 0 else None

    def start(self, index: int) -> None:
        self._set(index)

    def finish(self) -> None:
        self._set(self.IDLE)

    def _set(self, value: int) -> None:
        if self._slots is None:
            return
        info = get_worker_info()
        if info is not None:
            self._slots[info.id] = value

    def held(self) -> list[int]:
        """Indices some worker started and never finished."""
        return [] if self._slots is None else [i for i in self._slots if i != self.IDLE]

    def clear(self) -> None:
        if self._slots is not None:
            self._slots[:] = [self.IDLE] * len(self._slots)


def is_worker_death(exc: BaseException) -> bool:
    """The RuntimeError torch's DataLoader raises when a worker process died (signal or exit)."""
    return isinstance(exc, RuntimeError) and "DataLoader worker (pid" in str(exc)


def _read_one(dataset, index: int) -> None:
    dataset[index]


def crash_in_isolation(dataset, index: int, timeout_s: float | None) -> str | None:
    """Read `dataset[index]` in a process of its own; how that process ended, if it did not end well.

    Returns None when the item was read and the process exited normally (the dataset records a
    file's ordinary errors itself), else the reason to record against the file.
    """
    limit = (timeout_s or 0) + ISOLATION_GRACE_S
    process = multiprocessing.get_context().Process(target=_read_one, args=(dataset, index), daemon=True)
    process.start()
    process.join(limit)
    if process.is_alive():
        process.kill()
        process.join()
        return f"decoder hung the worker process (still running after {limit:g} s, killed)"
    code = process.exitcode
    if code is None or code == 0:
        return None
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"decoder crashed the worker process (signal {name})"
    return f"decoder ended the worker process (exit code {code})"
