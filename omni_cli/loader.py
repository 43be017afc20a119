"""Loader: a Dataset over file entries, and the DataLoader that batches their views.

Workers run `decode.load` and hand back uint8 arrays; a file that fails becomes an error
record in the batch instead of an exception, so one bad file never costs its batch-mates.
`collate` concatenates the views of all good images into one uint8 tensor (pinned when the
encoder is on CUDA) and keeps, per image, how many views it brought.
"""

from __future__ import annotations

import os
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
    pixels = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(0, dtype=torch.uint8)
    return Batch(entries, ok, errors, sizes, views, pixels)


def default_workers() -> int:
    """One decode worker per core, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))  # fmt: skip


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
    )
