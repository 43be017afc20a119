"""Loader: a Dataset over file entries, and the DataLoader that batches their views.

Workers run `decode.load` and hand back uint8 arrays; a file that fails becomes an error
record in the batch instead of an exception, so one bad file never costs its batch-mates.
`collate` concatenates the views of all good images into one uint8 tensor (pinned when the
encoder is on CUDA) and keeps, per image, how many views it brought.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import decode
from .errors import DecodeError
from .sources import FileEntry


@dataclass
class Batch:
    """One batch. `entries` holds every file; `ok` picks the ones that have pixels."""

    entries: list[FileEntry]
    ok: list[int]  # positions in `entries` that decoded
    errors: dict[int, str]  # position -> reason
    sizes: list[tuple[int, int]]  # (width, height) per ok entry
    views: list[int]  # views per ok entry
    pixels: torch.Tensor  # (sum(views), 3, size, size) uint8

    def pin_memory(self) -> Batch:
        self.pixels = self.pixels.pin_memory()
        return self


class ImageDataset(Dataset):
    def __init__(self, entries: Sequence[FileEntry], spec: decode.Preprocess):
        self.entries = entries
        self.spec = spec

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        entry = self.entries[index]
        if entry.error:
            return entry, entry.error
        try:
            return entry, decode.load(entry.path, self.spec)
        except DecodeError as exc:
            return entry, exc.reason


def collate(items: list) -> Batch:
    entries, ok, errors, sizes, views, arrays = [], [], {}, [], [], []
    for position, (entry, result) in enumerate(items):
        entries.append(entry)
        if isinstance(result, str):
            errors[position] = result
            continue
        ok.append(position)
        sizes.append((result.width, result.height))
        views.append(len(result.pixels))
        arrays.append(result.pixels)
    pixels = (
        torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(0, dtype=torch.uint8)
    )
    return Batch(entries, ok, errors, sizes, views, pixels)


def default_workers(device: str = "cuda") -> int:
    """Decode workers when --workers is not given.

    On a GPU the CPU decode is the bound (design.md section 6): one worker per core, at most 8.
    On the CPU the encoder is the bound and its threads already use every core. A worker process
    then preempts one of them, and the others wait for it at the next barrier, so a worker's
    decode time costs every core: on the 2-core EPYC (random ViT-B/32 bf16 at ~72 images/s,
    1024x768 JPEGs, `omni bench --repeat 3`, four alternating runs) `tag` reached 83-87% of the
    encoder alone with 0 workers (decode in the encoding process, ~2.8 ms per image, taking
    turns with the encoder) and only 71-82% with 1 worker; 2 workers were no faster and held
    ~1 GiB more RSS. So small CPUs decode in-process. From 8 cores up (not measured here), one
    worker per 8 cores keeps a fast encoder fed.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device == "cpu":
        return cores // 8
    return max(1, min(8, cores))


def make_loader(
    entries: Sequence[FileEntry],
    spec: decode.Preprocess,
    *,
    batch: int,
    workers: int,
    pin: bool = False,
) -> DataLoader:
    """Batches of `batch` files, decoded by `workers` processes (0 = in this process)."""
    return DataLoader(
        ImageDataset(entries, spec),
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=_ignore_sigint if workers else None,
    )


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: let the main process stop the workers, after it
    # has flushed what is finished, instead of each worker dying mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
