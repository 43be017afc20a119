"""Loader: a Dataset over file entries, and the DataLoader that brings them in small batches.

A worker turns each file into one `Item`: views decoded on the CPU (`decode.load`), or, when
the run decodes JPEGs on the device, the file's bytes and header facts (`decode.read_jpeg`),
or the reason it has neither; one bad file never costs its batch-mates. Which way a batch goes
is decided per batch by a shared `Split`, which the feeder (feed.py) tunes while the run goes.
`collate` puts a batch's views into one uint8 tensor and its JPEG bytes into another, so both
cross from worker to main process through shared memory, not pickles.

Batches are small and counted in files (`files_per_batch`): the encoder gathers views from as
many batches as its forward takes. Host memory in flight is bounded in bytes (`IN_FLIGHT_BYTES`
over all workers' prefetched batches), whatever the tiling makes of each file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DecodeError
from . import decode, tiling
from .sources import FileEntry

PREFETCH = 2  # batches each worker prepares ahead
IN_FLIGHT_BYTES = 1 << 30  # decoded views held by all workers' prefetched batches, at most
MAX_FILES_PER_BATCH = 16


@dataclass
class Item:
    """One file of a batch: CPU-decoded views, a JPEG for the device decoder, or an error."""

    entry: FileEntry
    error: str | None = None
    width: int = 0  # after EXIF orientation
    height: int = 0
    views: int = 0  # its views in the batch's `pixels` (once decoded)
    jpeg: tuple[int, int] | None = None  # (offset, length) of its bytes in the batch's `jpegs`
    orientation: int = 1  # EXIF orientation to apply after a device decode


@dataclass
class Batch:
    """A loader batch. `pixels` holds the CPU-decoded views of `items`, in order."""

    items: list[Item]
    pixels: torch.Tensor  # (sum of views, 3, size, size) uint8
    jpegs: torch.Tensor  # (bytes,) uint8: the JPEG files for the device, end to end
    cpu_seconds: float = 0.0  # the worker's time decoding this batch on the CPU

    def pin_memory(self) -> Batch:
        self.pixels = self.pixels.pin_memory()
        return self


class Split:
    """The share of loader batches that workers decode on the CPU; the rest go to the device.

    Shared between the main process, which sets `share`, and the workers, which ask `cpu()`
    once per batch: a running credit makes the split exact over any run of batches.
    """

    def __init__(self, share: float):
        self._share = mp.Value("d", float(share), lock=False)
        self._credit = mp.Value("d", 0.0)

    @property
    def share(self) -> float:
        return self._share.value

    @share.setter
    def share(self, value: float) -> None:
        self._share.value = min(1.0, max(0.0, value))

    def cpu(self) -> bool:
        with self._credit.get_lock():
            self._credit.value += self._share.value
            if self._credit.value >= 1.0 - 1e-9:
                self._credit.value -= 1.0
                return True
            return False


class ImageDataset(Dataset):
    def __init__(self, entries: Sequence[FileEntry], spec: decode.Preprocess, split=None):
        self.entries = entries
        self.spec = spec
        self.split = split  # None: every file is decoded on the CPU

    def __len__(self) -> int:
        return len(self.entries)

    def __getitems__(self, indices: list[int]) -> list:
        device = self.split is not None and not self.split.cpu()
        started = time.perf_counter()
        results = _Results(self.item(i, device) for i in indices)
        results.cpu_seconds = 0.0 if device else time.perf_counter() - started
        return results

    def __getitem__(self, index: int):
        return self.item(index, device=False)

    def item(self, index: int, device: bool = False):
        """(entry, Decoded | RawJpeg | reason) for one file."""
        entry = self.entries[index]
        if entry.error:
            return entry, entry.error
        if device:
            raw = decode.read_jpeg(entry.path, self.spec)
            if raw is not None:
                return entry, raw
        try:
            return entry, decode.load(entry.path, self.spec)
        except DecodeError as exc:
            return entry, exc.reason


class _Results(list):
    """A batch's results, and how long the worker spent decoding them on the CPU."""

    cpu_seconds = 0.0


def collate(results: list) -> Batch:
    items, arrays, files, offset = [], [], [], 0
    for entry, result in results:
        if isinstance(result, str):
            items.append(Item(entry, error=result))
        elif isinstance(result, decode.RawJpeg):
            span = (offset, len(result.data))
            offset += len(result.data)
            files.append(result.data)
            items.append(Item(entry, None, result.width, result.height, 0, span,
                              result.orientation))  # fmt: skip
        else:
            arrays.append(result.pixels)
            items.append(Item(entry, None, result.width, result.height, len(result.pixels)))
    pixels = (
        torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(0, dtype=torch.uint8)
    )
    jpegs = torch.from_numpy(np.concatenate(files)) if files else torch.empty(0, dtype=torch.uint8)
    return Batch(items, pixels, jpegs, getattr(results, "cpu_seconds", 0.0))


def default_workers(device: str = "cuda") -> int:
    """Decode workers when --workers is not given.

    On a GPU the host's decoding is the bound (design.md section 6): a worker per core, less
    one for the main process, which feeds the device. On the CPU the encoder is the bound and
    its threads already use every core. A worker process then preempts one of them, and the
    others wait for it at the next barrier, so a worker's decode time costs every core: on the
    2-core EPYC (random ViT-B/32 bf16 at ~72 images/s, 1024x768 JPEGs, `omni bench --repeat 3`,
    four alternating runs) `tag` reached 83-87% of the encoder alone with 0 workers (decode in
    the encoding process, ~2.8 ms per image, taking turns with the encoder) and only 71-82%
    with 1 worker; 2 workers were no faster and held ~1 GiB more RSS. So small CPUs decode
    in-process. From 8 cores up (not measured here), one worker per 8 cores keeps a fast
    encoder fed.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device == "cpu":
        return cores // 8
    return max(1, cores - 1)


def views_per_file(spec: decode.Preprocess, size: tuple[int, int] = (3840, 2160)) -> int:
    """Views a large photo makes under this run's tiling: what a batch's memory is sized for."""
    return tiling.view_count(size[0], size[1], spec.tiles, spec.tile_overlap, spec.size)


def files_per_batch(views_per_forward: int, spec: decode.Preprocess, workers: int) -> int:
    """Files per loader batch: small, and bounded so that prefetched views fit IN_FLIGHT_BYTES.

    A batch never needs more files than one forward takes; workers x PREFETCH batches are in
    flight at once, each of at most files x views x (3 x size^2) bytes.
    """
    views = views_per_file(spec)
    by_memory = IN_FLIGHT_BYTES // (max(1, workers) * PREFETCH * views * 3 * spec.size**2)
    by_forward = -(-views_per_forward // views)
    return max(1, min(MAX_FILES_PER_BATCH, by_memory, by_forward))


def make_loader(
    entries: Sequence[FileEntry],
    spec: decode.Preprocess,
    *,
    files: int,
    workers: int,
    pin: bool = False,
    split: Split | None = None,
) -> DataLoader:
    """Batches of `files` files, decoded by `workers` processes (0 = in this process).

    With workers, batches are handed over as they finish (not in listing order), so a slow
    file never holds up the batches behind it; rows carry their own keys.
    """
    return DataLoader(
        ImageDataset(entries, spec, split),
        batch_size=files,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=PREFETCH if workers else None,
        persistent_workers=False,
        worker_init_fn=_ignore_sigint if workers else None,
        in_order=not workers,
    )


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: let the main process stop the workers, after it
    # has flushed what is finished, instead of each worker dying mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
