"""Sources: walk the input paths and stat every image file, cheaply and deterministically.

Only names with an image extension become rows (a text file called `x.jpg` does, and fails
later as `not an image`); hidden files and folders are skipped. Symlinks are followed, with
each real folder visited once so that a loop in the tree cannot hang a run. Every real file
appears once, whatever the inputs: `omni tag photos photos/scans` lists a scan under `photos`
only, and a file reached again through a symlink or a hard link is listed where it was first
found. A symlink that points nowhere, or a file that cannot be stat'ed, is still a row,
carrying its error.

Listing is what decides which rows an output may drop, so it never guesses: an input folder
that cannot be listed stops the run (`InputUnreadable`), and a sub-folder that cannot be listed
is recorded in `unlisted` so that the rows it held are kept rather than dropped. Roots are
recorded as given, with bytes that are not UTF-8 escaped as `\\xNN` like every file name.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputNotFound, InputUnreadable

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp", ".dib",
     ".heic", ".heif", ".hif", ".avif",
     ".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2"]  # camera RAW: omni-cli[raw]
)  # fmt: skip


@dataclass(frozen=True)
class FileEntry:
    """One input file: where it was found, what stat said, or why stat failed."""

    root: str  # the PATH argument it was found under, as given
    rel: str  # relative to root, '/' separators, printable (undecodable bytes escaped)
    path: str  # what to open
    bytes: int = 0
    mtime_ns: int = 0
    error: str | None = None
    # device << 64 | inode: one int, not a tuple, since a run over a million files holds
    # every one of them in a set while it lists
    identity: int | None = field(default=None, compare=False)


def printable(name: str) -> str:
    """A file name as valid UTF-8: bytes that are not UTF-8 become `\\xNN` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_inputs(inputs: Sequence[Path]) -> None:
    """Fail before any work if an input PATH does not exist."""
    for path in inputs:
        if not os.path.exists(path):
            raise InputNotFound(f"input not found: {path}")


@dataclass(frozen=True)
class Unlisted:
    """A sub-folder that exists but could not be listed: its rows are kept, not dropped."""

    root: str  # as recorded in the output's `root` column
    rel: str  # the folder, relative to root, '/' separators, ending in '/'
    reason: str


def discover(
    inputs: Sequence[Path], *, recursive: bool = True, unlisted: list[Unlisted] | None = None
) -> Iterator[FileEntry]:
    """Every image file under the inputs, in sorted order, each stat'ed once, each real file
    once (the first time it is reached). Sub-folders that cannot be listed are appended to
    `unlisted`; an input folder that cannot be listed raises `InputUnreadable`."""
    check_inputs(inputs)
    folders: set = set()  # (device, inode) of every folder walked, across the inputs
    files: set = set()  # `identity` of every file listed
    problems = unlisted if unlisted is not None else []
    for arg in inputs:
        given = str(arg)
        if os.path.isdir(given):
            found = _walk(printable(given), given, "", recursive, folders, problems)
        else:
            folder = printable(os.path.dirname(given) or ".")
            found = iter([_entry(folder, os.path.basename(given), given)])
        for entry in found:
            if entry.identity is None or entry.identity not in files:
                files.add(entry.identity)
                yield entry


def _walk(
    root: str, folder: str, prefix: str, recursive: bool, seen: set, unlisted: list[Unlisted]
) -> Iterator[FileEntry]:
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            return  # a symlink loop, or a folder reached twice
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:  # its rows are kept: a folder we cannot read is not an empty one
        if not prefix:
            raise InputUnreadable(
                f"cannot list input folder {printable(folder)}: {exc.strerror}; nothing was touched"
            ) from None
        unlisted.append(Unlisted(root, printable(prefix), f"cannot list folder: {exc.strerror}"))
        return
    for child in children:
        if child.name.startswith("."):
            continue
        rel = prefix + child.name
        try:
            is_dir = child.is_dir()  # follows symlinks
        except OSError:
            is_dir = False
        if is_dir:
            if recursive:
                yield from _walk(root, child.path, rel + "/", recursive, seen, unlisted)
        elif is_image_name(child.name):
            yield _entry(root, rel, child.path)


def _entry(root: str, rel: str, path: str) -> FileEntry:
    rel = printable(rel)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        reason = "broken symlink" if os.path.islink(path) else "file vanished"
        return FileEntry(root, rel, path, error=reason)
    except OSError as exc:
        return FileEntry(root, rel, path, error=f"cannot stat: {exc.strerror}")
    identity = info.st_dev << 64 | info.st_ino
    if not stat.S_ISREG(info.st_mode):
        return FileEntry(root, rel, path, info.st_size, info.st_mtime_ns, "not a regular file",
                         identity)  # fmt: skip
    return FileEntry(root, rel, path, info.st_size, info.st_mtime_ns, identity=identity)
