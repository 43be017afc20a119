"""Isolation: a file that crashes or hangs its decoder costs its own row, not the run.

Decoders are native code (libjpeg, libheif, libavif, LibRaw): a malformed file can segfault a
decode worker, get it killed by the OOM killer, or never return. Three pieces make that one
error row:

- `arm`/`disarm` bound each file's decode in a worker process: SIGALRM, left at its default
  action, ends the process after `timeout` seconds even inside native code that never returns
  to Python. A hang is thus a death like a crash.
- `Busy` is a shared array in which each worker writes the index of the file it is decoding, so
  after a worker's death the file it held is known (its batch-mates are simply decoded again).
- `run_alone` decodes one file in a fresh forked process and returns its result, or the reason
  the process died: `crashed the decoder (signal 11, SIGSEGV)`, `decoder timed out (60 s)`.
- `Helper` is the decode process of runs without workers (the default on small CPUs): it
  decodes a batch while the main process waits, so the two never compete for the cores (as
  decoding in the main process would not), and a crash ends the helper, not the run.

The loader (loader.py) restarts its workers after a death, retries the files the dead worker
held alone, and keeps the error rows of those that kill their process again.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import signal
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT = 60.0  # seconds per file: a 200-megapixel PNG decodes in a few
GRACE = 5.0  # the parent's wait beyond the child's own alarm, for a process stuck in the kernel
CRASHED = "crashed the decoder"
TIMED_OUT = "decoder timed out"

_armed = False  # in a process where a decode may be killed by its alarm (a worker or a child)
_slot: int | None = None  # this worker's slot in `Busy` (None: the main process)


def child_init(worker_id: int = 0) -> None:
    """In a decode worker or child: SIGALRM ends the process; Ctrl-C is the parent's business.

    Ctrl-C reaches the whole process group: let the main process stop the workers, after it has
    flushed what is finished, instead of each worker dying mid-batch.
    """
    global _armed, _slot
    _armed, _slot = True, worker_id
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def arm(timeout: float | None) -> None:
    """Start this file's clock (only in worker processes: never kill the main process)."""
    if _armed and timeout:
        signal.setitimer(signal.ITIMER_REAL, timeout)


def disarm() -> None:
    if _armed:
        signal.setitimer(signal.ITIMER_REAL, 0)


def slot() -> int | None:
    """This decode process's slot in `Busy`; None in the main process."""
    return _slot


class Busy:
    """Which file each worker is decoding (-1: none), shared with the workers by fork."""

    def __init__(self, workers: int):
        self._slots = mp.Array("q", [-1] * max(1, workers), lock=False)

    def set(self, worker: int, index: int) -> None:
        self._slots[worker] = index

    def get(self, worker: int) -> int:
        return self._slots[worker]

    def all(self) -> list[int]:
        return [i for i in self._slots if i >= 0]


def death_reason(exitcode: int | None, timeout: float | None) -> str:
    """Why a decode process ended without an answer, as an error row says it."""
    if exitcode is None:
        return f"{TIMED_OUT} ({_seconds(timeout)})"
    if exitcode == -signal.SIGALRM:
        return f"{TIMED_OUT} ({_seconds(timeout)})"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"{CRASHED} (signal {-exitcode}, {name})"
    return f"{CRASHED} (exit code {exitcode})"


def run_alone(fn: Callable[[], Any], timeout: float | None) -> tuple[bool, Any]:
    """fn() in a fresh forked process: (True, its result) or (False, why the process died)."""
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        child_init()
        arm(timeout)
        result = fn()
        disarm()
        send.send(result)

    process = ctx.Process(target=child, daemon=True)
    process.start()
    send.close()
    try:
        if receive.poll(timeout + GRACE if timeout else None):
            try:
                return True, receive.recv()
            except (EOFError, OSError):
                pass  # died before it could answer
        process.join(1.0 if timeout else None)
        if process.is_alive():  # stuck past its own alarm (e.g. in uninterruptible I/O)
            process.kill()
            process.join()
            return False, death_reason(None, timeout)
        return False, death_reason(process.exitcode, timeout)
    finally:
        receive.close()
        if process.is_alive():
            process.kill()
        process.join()


def _seconds(timeout: float | None) -> str:
    return f"after {timeout:g} s" if timeout else "no answer"


class HelperDied(Exception):
    """The helper process ended while it held a batch."""


class Helper:
    """A forked process that runs `fn(batch)` for the main process, one batch at a time.

    `shared` is an anonymous shared mapping of `shared_bytes`, the same pages in both
    processes: `fn` may put bulky results there (the pipe then carries only their place), since
    the main process reads them before it sends the next batch.
    """

    def __init__(self, fn: Callable[[Any], Any], timeout: float | None, shared_bytes: int = 0):
        self.fn, self.timeout = fn, timeout
        self.shared = mmap.mmap(-1, shared_bytes) if shared_bytes else None
        self.process = None
        self.conn = None

    def run(self, batch: list[int]) -> Any:
        """fn(batch) in the helper; raises HelperDied (and forgets the helper) if it dies."""
        if self.process is None:
            self._start()
        try:
            self.conn.send(batch)
            wait = self.timeout * len(batch) + GRACE if self.timeout else None
            if self.conn.poll(wait):
                return self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            pass
        self.close()
        raise HelperDied

    def _start(self) -> None:
        ctx = mp.get_context("fork")
        self.conn, theirs = ctx.Pipe()
        fn, mine = self.fn, self.conn

        def serve() -> None:
            child_init()
            mine.close()  # this process's copy of the parent's end: else no EOF when it closes
            while True:
                try:
                    batch = theirs.recv()
                except EOFError:
                    return
                if batch is None:
                    return
                theirs.send(fn(batch))

        self.process = ctx.Process(target=serve, daemon=True)
        self.process.start()
        theirs.close()

    def close(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.conn.close()
        self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.process = self.conn = None
