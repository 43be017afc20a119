"""An exclusive lock on an output file (`OUT.lock`), so two cron runs never write one output.

It is an advisory `flock` held on an open file: the kernel drops it when the process dies, so a
lock left by a killed run is never mistaken for a live one. The file records the holder's pid
for the message a refused run prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import LockedError, OutputError


class OutputLock:
    def __init__(self, output: Path):
        self.path = Path(output).with_name(Path(output).name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create lock {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(
                    f"another omni tag (pid {holder}) is writing {self.path.with_suffix('')}; "
                    "nothing was touched"
                ) from None
            # The holder before us may have unlinked the file between our open and flock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
