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

A worker that dies (a file that segfaults a native decoder, the OOM killer, a decode past the
time limit: isolate.py) does not end the run: `CrashSafeLoader` starts fresh workers for the
files not yet delivered, decodes the file the dead worker held alone in a fresh process, and
makes it an error row (`crashed the decoder (...)`, `decoder timed out (...)`) if it kills that
one too. Without workers, one helper process decodes each batch while the main process waits
(`helper`, the default on small CPUs); an explicit 0 decodes in the main process, where a crash
cannot be caught.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DecodeError
from . import decode, isolate, tiling
from .sources import FileEntry

PREFETCH = 2  # batches each worker prepares ahead
IN_FLIGHT_BYTES = 1 << 30  # decoded views held by all workers' prefetched batches, at most
MAX_FILES_PER_BATCH = 16
SHARED_BYTES = 64 << 20  # the helper's shared mapping for a batch's views (more: pickled)


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
    indices: tuple[int, ...] = ()  # the dataset's indices of `items`

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
    def __init__(
        self,
        entries: Sequence[FileEntry],
        spec: decode.Preprocess,
        split=None,
        timeout: float | None = None,
    ):
        self.entries = entries
        self.spec = spec
        self.split = split  # None: every file is decoded on the CPU
        self.timeout = timeout  # seconds per file, in worker processes (isolate.arm)
        self.busy: isolate.Busy | None = None  # set by CrashSafeLoader for its workers

    def __len__(self) -> int:
        return len(self.entries)

    def __getitems__(self, indices: list[int]) -> list:
        device = self.split is not None and not self.split.cpu()
        started = time.perf_counter()
        results = _Results(self.guarded(i, device) for i in indices)
        results.cpu_seconds = 0.0 if device else time.perf_counter() - started
        results.indices = tuple(indices)
        return results

    def __getitem__(self, index: int):
        return self.item(index, device=False)

    def guarded(self, index: int, device: bool = False):
        """`item`, with the worker's slot in `busy` naming the file and its clock running."""
        slot = isolate.slot() if self.busy is not None else None
        if slot is not None:
            self.busy.set(slot, index)
        isolate.arm(self.timeout)
        try:
            return self.item(index, device)
        finally:
            isolate.disarm()
            if slot is not None:
                self.busy.set(slot, -1)

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

    def alone(self, index: int) -> list:
        """One file decoded on the CPU in a fresh process: its result, or why it died there."""
        entry = self.entries[index]
        ok, result = isolate.run_alone(lambda: self.item(index), self.timeout)
        results = _Results([result if ok else (entry, result)])
        results.indices = (index,)
        return results


class _Results(list):
    """A batch's results, how long the worker spent decoding them on the CPU, their indices."""

    cpu_seconds = 0.0
    indices: tuple[int, ...] = ()


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
    return Batch(items, pixels, jpegs, getattr(results, "cpu_seconds", 0.0),
                 getattr(results, "indices", ()))  # fmt: skip


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
    timeout: float | None = isolate.DEFAULT_TIMEOUT,
    helper: bool = False,
) -> CrashSafeLoader:
    """Batches of `files` files, decoded by `workers` processes (0 = in this process, or with
    `helper` in one helper process while this one waits).

    With workers, batches are handed over as they finish (not in listing order), so a slow
    file never holds up the batches behind it; rows carry their own keys. A worker's death
    costs only the file it was decoding (`CrashSafeLoader`); `timeout` bounds each file's
    decode in a worker or the helper, in seconds.
    """
    dataset = ImageDataset(entries, spec, split, timeout)
    return CrashSafeLoader(dataset, files, workers, pin, helper=helper)


class CrashSafeLoader:
    """Iterates `Batch`es like a DataLoader, and survives the death of its workers.

    After a death: the file the dead worker held is decoded alone in a fresh process (an error
    row if it dies there too), the other files not yet delivered go to fresh workers, and the
    run goes on. Files are never delivered twice. Without workers, files are decoded in this
    process (a crash there ends the run), or with `helper` in one helper process that decodes
    a batch while this one waits (the same use of the cores, and a crash costs one file).
    """

    def __init__(
        self, dataset: ImageDataset, files: int, workers: int, pin: bool, helper: bool = False
    ):
        self.dataset, self.files, self.num_workers, self.pin = dataset, files, workers, pin
        self.helper = helper and not workers
        self.restarts = 0  # worker deaths survived

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.files)

    def __iter__(self):
        if self.helper:
            yield from self._lockstep(self._chunks(range(len(self.dataset))))
            return
        if not self.num_workers:  # in this process: nothing to survive
            yield from self._loader(self._chunks(range(len(self.dataset))), [])
            return
        pending = self._chunks(range(len(self.dataset)))
        while pending:
            dispatched: list[list[int]] = []
            delivered: set[int] = set()
            self.dataset.busy = isolate.Busy(self.num_workers)
            batches = None
            try:
                batches = _start(self._loader(pending, dispatched))
                for batch in _until_death(batches):
                    delivered.update(batch.indices)
                    yield batch
                return
            except _WorkerDied:
                held = _held_by_dead(batches, self.dataset.busy)
                self.restarts += 1
            finally:
                _shut_down(batches)
                del batches
            lost = [i for chunk in dispatched for i in chunk if i not in delivered]
            if not held & set(lost):  # died between files: suspect the first one it lost
                held = set(lost[:1])
            for index in (i for i in lost if i in held):
                yield self._pinned(collate(self.dataset.alone(index)))
            pending = self._chunks([i for i in lost if i not in held]) + pending[len(dispatched) :]

    def _lockstep(self, chunks: list[list[int]]):
        """Each batch decoded by the helper process while this one waits for it."""
        busy = self.dataset.busy = isolate.Busy(1)
        dataset = self.dataset

        def decode_batch(chunk: list[int]) -> list:  # runs in the helper
            return _to_shared(dataset.__getitems__(chunk), helper.shared)

        helper = isolate.Helper(decode_batch, dataset.timeout, SHARED_BYTES)
        queue = collections.deque(chunks)
        try:
            while queue:
                chunk = queue.popleft()
                busy.set(0, -1)
                try:
                    results = helper.run(chunk)
                except isolate.HelperDied:
                    self.restarts += 1
                    held = busy.get(0) if busy.get(0) in chunk else chunk[0]
                    yield self._pinned(collate(self.dataset.alone(held)))
                    done = chunk.index(held)  # the files before it were decoded: once more
                    if len(chunk) > 1:
                        queue.appendleft(chunk[:done] + chunk[done + 1 :])
                    continue
                yield self._pinned(collate(_from_shared(results, helper.shared)))
        finally:
            helper.close()

    def _chunks(self, indices) -> list[list[int]]:
        indices = list(indices)
        return [indices[i : i + self.files] for i in range(0, len(indices), self.files)]

    def _loader(self, chunks: list[list[int]], dispatched: list[list[int]]) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=_Recorded(chunks, dispatched),
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin,
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=False,
            worker_init_fn=isolate.child_init if workers else None,
            in_order=not workers,
        )

    def _pinned(self, batch: Batch) -> Batch:
        return batch.pin_memory() if self.pin else batch


@dataclass
class _Shared:
    """Decoded views left in the helper's shared mapping: where, and the file's size."""

    offset: int
    shape: tuple[int, ...]
    width: int
    height: int


def _to_shared(results: list, shared) -> list:
    """In the helper: move decoded views into `shared` (those that fit), to spare the pipe."""
    offset = 0
    for k, (entry, result) in enumerate(results):
        if isinstance(result, decode.Decoded) and offset + result.pixels.nbytes <= len(shared):
            size = result.pixels.nbytes
            np.frombuffer(shared, np.uint8, size, offset)[:] = result.pixels.reshape(-1)
            results[k] = (entry, _Shared(offset, result.pixels.shape, result.width, result.height))
            offset += size
    return results


def _from_shared(results: list, shared) -> list:
    """In the main process: views on `shared` again (collate copies them out)."""
    for k, (entry, result) in enumerate(results):
        if isinstance(result, _Shared):
            size = int(np.prod(result.shape))
            pixels = np.frombuffer(shared, np.uint8, size, result.offset).reshape(result.shape)
            results[k] = (entry, decode.Decoded(pixels, result.width, result.height))
    return results


class _Recorded:
    """A batch sampler over fixed chunks that records those the DataLoader has sent out."""

    def __init__(self, chunks: list[list[int]], dispatched: list[list[int]]):
        self.chunks, self.dispatched = chunks, dispatched

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        for chunk in self.chunks:
            self.dispatched.append(chunk)
            yield chunk


class _WorkerDied(Exception):
    pass


def _start(loader: DataLoader):
    """The loader's iterator, its workers never on PyTorch's SIGCHLD watch.

    PyTorch registers the workers for its SIGCHLD handler before it hands them their first
    files, and that handler raises a death wherever the main thread is, even inside the
    iterator's own start (where the half-made iterator cannot be shut down cleanly). So the
    registration is skipped while the iterator starts (private API, like `_own_worker_deaths`,
    its fallback): deaths surface in the wait for the next batch.
    """
    try:
        from torch.utils.data._utils import signal_handling
    except ImportError:  # pragma: no cover - another PyTorch
        signal_handling = None
    real = getattr(signal_handling, "_set_worker_pids", None)
    if real is not None:
        signal_handling._set_worker_pids = lambda *args: None
    try:
        batches = iter(loader)
    except RuntimeError as exc:
        _raise_if_death(exc)
        raise
    finally:
        if real is not None:
            signal_handling._set_worker_pids = real
    if real is not None:
        batches._worker_pids_set = False  # nothing registered, nothing to remove
    _own_worker_deaths(batches)
    return batches


def _until_death(batches):
    """The DataLoader's batches; a worker's death becomes `_WorkerDied`."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            _raise_if_death(exc)
            raise
        yield batch


def _raise_if_death(exc: RuntimeError) -> None:
    text = str(exc)
    if "DataLoader worker" in text and ("exited unexpectedly" in text or "killed" in text):
        raise _WorkerDied(text) from None


def _shut_down(batches) -> None:
    """Stop a DataLoader iterator's workers now, not whenever it is collected."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _own_worker_deaths(batches) -> None:
    """Take this iterator's workers off PyTorch's SIGCHLD watch.

    PyTorch raises a worker's death from a SIGCHLD handler, i.e. wherever the main thread
    happens to be (an encoder forward, a Parquet write); without it the death is raised where
    it can be handled, in the wait for the next batch (checked every 5 s). Private API: if it
    changes, deaths are still caught when they surface in that wait.
    """
    try:
        from torch.utils.data._utils.signal_handling import _remove_worker_pids

        if getattr(batches, "_worker_pids_set", False):
            _remove_worker_pids(id(batches))
            batches._worker_pids_set = False
    except Exception:  # pragma: no cover - another PyTorch
        pass


def _held_by_dead(batches, busy: isolate.Busy) -> set[int]:
    """The files the dead workers were decoding (all workers' if they cannot be told apart)."""
    workers = getattr(batches, "_workers", None)
    if workers:
        dead = [k for k, w in enumerate(workers) if not w.is_alive() and w.exitcode != 0]
        if dead:
            return {busy.get(k) for k in dead if busy.get(k) >= 0}
    return set(busy.all())
