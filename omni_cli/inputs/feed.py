"""Feed: from loader batches to views on the encoder's device, decoded wherever is faster.

The feeder gathers loader batches until they hold a forward's worth of views, then hands the
encoder one `Fed` group: every file's views as one uint8 tensor on the device, in file order.
Views decoded by CPU workers travel from pinned memory on a side stream, overlapping the
encoder's work. JPEGs sent to the device are decoded there in batched calls (devdecode.py),
each bounded by pixels (read from the JPEG headers, `DECODE_PIXELS`), not by file count; a
device out-of-memory error halves the budget and retries, and a file that does not fit alone
goes to the CPU. A batch the device decoder rejects is retried file by file, and a file it
still rejects (or returns None for) is decoded on the CPU, in a process of its own (a file
the device rejects may crash a native decoder too), which gives it pixels or the same error
row as ever. With a decoder that releases the GIL (nvImageCodec) groups are made on a
thread of their own, one group ahead of the encoder.

Hybrid decoding: on a GPU host both the CPU workers and the device can decode, and the right
share for each depends on the model, the GPU and the cores. `SplitControl` measures both while
the run goes: the workers' CPU capacity C (images/s, from their own decode times) and the
seconds t the feeder spends per image it decodes on the device (the decoder's blocking call
and the views, under whatever load the encoder puts on the device). Both paths finish together
when the CPU share s satisfies s / C = (1 - s) t, so s = C t / (1 + C t). No threshold is
tuned to a machine: on an H200 with 15 workers (C ~ 1,350/s of 1080p JPEGs) and nvJPEG under a
ViT-L/14 (t ~ 0.5 ms) it gives s ~ 0.4.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DecodeError, UsageError
from . import decode, isolate, tiling
from .devdecode import JpegDecoder, device_decoder, device_views, is_out_of_memory, orient
from .isolate import DEFAULT_TIMEOUT
from .loader import Batch, Item, Split

WINDOW = 16  # loader batches between updates of the split
SMOOTHING = 0.5  # weight of a new estimate of the best share
MAX_SHARE = 0.95  # keep measuring the device path, however slow it looks
START_SHARE = 0.5  # CPU share of batches when the run starts, in hybrid mode
# Feed on a separate thread: by default where the device decoder releases the GIL (nvImageCodec).
# Not for torchvision's nvJPEG: on an H200 its call did not overlap with the main thread
# (ViT-L/14 tag 1,313/s with the thread, 1,463/s without; gpu_bench --ab-thread).
# OMNI_FEED_THREAD=1 or 0 forces it on or off.
THREAD = {"1": True, "0": False}.get(os.environ.get("OMNI_FEED_THREAD", ""))
# Pixels decoded on the device at once (2^29: 1.5 GiB of RGB, ~250 1080p JPEGs or five
# 100-megapixel photos), from the JPEG headers; halved after an out-of-memory error.
DECODE_PIXELS = 1 << 29
_DONE = object()


@dataclass
class Fed:
    """Files ready to encode: `pixels` holds the views of the items without an error, in order."""

    items: list[Item]
    pixels: torch.Tensor  # (sum of views, 3, size, size) uint8, on the encoder's device


class SplitControl:
    """Sets a `Split` so that CPU workers and the device decoder finish their shares together.

    `cpu(images, seconds)`: a worker decoded a batch on the CPU in `seconds` of its time.
    `device(images, seconds)`: the feeder spent `seconds` decoding and cutting a group on the
    device. Every WINDOW loader batches, the share moves towards C t / (1 + C t).
    """

    def __init__(self, split: Split, workers: int):
        self.split, self.workers = split, workers
        self.cpu_images = self.device_images = 0
        self.cpu_seconds = self.device_seconds = 0.0
        self.per_cpu_image: float | None = None  # one worker's seconds per image
        self.per_device_image: float | None = None  # the feeder's seconds per device image
        self.seen = 0

    def cpu(self, images: int, seconds: float) -> None:
        self.cpu_images += images
        self.cpu_seconds += seconds

    def device(self, images: int, seconds: float) -> None:
        self.device_images += images
        self.device_seconds += seconds

    def batch_seen(self) -> None:
        self.seen += 1
        if self.seen < WINDOW:
            return
        self.seen = 0
        if self.cpu_images:
            self.per_cpu_image = self.cpu_seconds / self.cpu_images
        if self.device_images:
            self.per_device_image = self.device_seconds / self.device_images
        self.cpu_images = self.device_images = 0
        self.cpu_seconds = self.device_seconds = 0.0
        if not (self.per_cpu_image and self.per_device_image):
            return
        capacity = self.workers / self.per_cpu_image  # images/s the CPU workers can decode
        ct = capacity * self.per_device_image
        best = min(MAX_SHARE, ct / (1 + ct))
        self.split.share += SMOOTHING * (best - self.split.share)


class Feeder:
    """Iterates `Fed` groups of at least `views_per_forward` views (the last may hold fewer)."""

    def __init__(
        self,
        batches: Iterable[Batch],
        spec: decode.Preprocess,
        device: torch.device,
        views_per_forward: int,
        *,
        decoder: JpegDecoder | None = None,
        split: Split | None = None,
        adapt: bool = True,
        thread: bool | None = None,
        decode_pixels: int | None = None,
    ):
        self.batches, self.spec, self.device = batches, spec, device
        self.views_per_forward = views_per_forward
        self.decoder = decoder
        workers = getattr(batches, "num_workers", 0)
        adapt = adapt and split is not None and workers > 0  # in-process decoding: no parallel CPU
        self.control = SplitControl(split, workers) if adapt else None
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        if thread is None:  # a decoder that releases the GIL decodes on a thread of its own
            thread = THREAD if THREAD is not None else getattr(decoder, "releases_gil", False)
        self.threaded = bool(thread)
        self.decode_pixels = decode_pixels or DECODE_PIXELS  # per device decode group
        self.decode_backoffs = 0  # groups made smaller after the device ran out of memory
        self.device_decoded = self.fallbacks = 0  # files decoded by the device / sent back
        self.times = {"wait for loader": 0.0, "device decode": 0.0, "cut views": 0.0}

    def __iter__(self) -> Iterator[Fed]:
        """Groups in the order they are ready; with `thread`, made on a feeding thread.

        The thread waits for loader batches and for the device decoder, one group ahead, while
        this one launches forwards and builds rows (on where the decoder releases the GIL; see
        THREAD).
        """
        if not self.threaded:
            yield from self._groups()
            return
        ready: queue.Queue = queue.Queue(maxsize=1)  # the thread works one group ahead
        stop = threading.Event()

        def offer(item) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ready.put(item, timeout=0.1)
                    return True
            return False

        def produce() -> None:
            try:
                for fed in self._groups():
                    if not offer(fed):
                        return
                offer(_DONE)
            except BaseException as exc:  # raised again in the consumer
                offer(exc)

        thread = threading.Thread(target=produce, name="omni-feed", daemon=True)
        thread.start()
        try:
            while (fed := ready.get()) is not _DONE:
                if isinstance(fed, BaseException):
                    raise fed
                yield fed
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    ready.get_nowait()
            thread.join()

    def _groups(self) -> Iterator[Fed]:
        group: list[Batch] = []
        views = 0
        batches = iter(self.batches)
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            now = time.perf_counter()
            self.times["wait for loader"] += now - asked
            if batch is None:
                break
            if self.control is not None:
                if batch.cpu_seconds:
                    done = sum(1 for item in batch.items if item.views)
                    self.control.cpu(done, batch.cpu_seconds)
                self.control.batch_seen()
            group.append(batch)
            views += sum(self._views(item) for item in batch.items)
            if views >= self.views_per_forward:
                yield self.feed(group)
                group, views = [], 0
        if group:
            yield self.feed(group)

    def _views(self, item: Item) -> int:
        if item.jpeg is None:
            return item.views
        spec = self.spec
        return tiling.view_count(item.width, item.height, spec.tiles, spec.tile_overlap, spec.size)

    def feed(self, batches: list[Batch]) -> Fed:
        """One group of loader batches -> its items and all their views on the device.

        On CUDA all of it (copies, decoding, resampling) runs on a side stream, overlapping
        the encoder's forwards queued before it; the encoder's stream waits for it here.
        """
        if not self.cuda:
            return self._feed(batches)
        with torch.cuda.stream(self.side):
            fed = self._feed(batches)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.side)
        fed.pixels.record_stream(current)  # made on the side stream, used on the encoder's
        return fed

    def _feed(self, batches: list[Batch]) -> Fed:
        items: list[Item] = []
        parts: dict[int, torch.Tensor] = {}  # item position -> its views on the device
        jpegs: list[tuple[int, Item, torch.Tensor]] = []
        for batch in batches:
            host = self._to_device(batch.pixels)
            start = 0
            for item in batch.items:
                position = len(items)
                items.append(item)
                if item.jpeg is not None:
                    offset, length = item.jpeg
                    jpegs.append((position, item, batch.jpegs[offset : offset + length]))
                elif item.error is None:
                    parts[position] = host[start : start + item.views]
                    start += item.views
        if jpegs:
            parts.update(self._decode_jpegs(jpegs))
        order = [parts[i] for i in range(len(items)) if i in parts]
        pixels = (
            torch.cat(order) if order else torch.empty(0, dtype=torch.uint8, device=self.device)
        )
        return Fed(items, pixels)

    def _decode_jpegs(self, jpegs: list[tuple[int, Item, torch.Tensor]]) -> dict:
        """Decode on the device in groups bounded by pixels, orient, cut views; files the
        device rejects, or that do not fit in its memory even alone, go the CPU way."""
        started = time.perf_counter()
        parts: dict[int, torch.Tensor | None] = {}
        back: list[tuple[int, Item]] = []  # files for the CPU
        pending = list(jpegs)
        while pending:
            chunk = _take(pending, self.decode_pixels)
            pending = pending[len(chunk) :]
            try:
                done, rejected = self._decode_chunk(chunk)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release()
                if len(chunk) == 1:  # alone it does not fit: the CPU decodes it
                    back.append(chunk[0][:2])
                    continue
                # a smaller group from now on: half of what failed (halving down to one file)
                self.decode_pixels = max(1, _pixels(chunk) // 2)
                self.decode_backoffs += 1
                pending = chunk + pending
                continue
            parts.update(done)
            back += rejected
        for position, item in sorted(back, key=lambda pair: pair[0]):
            item.jpeg = None
            self.fallbacks += 1
            parts[position] = self._cpu_fallback(item)
        if self.control is not None:
            self.control.device(len(jpegs), time.perf_counter() - started)
        return {k: v for k, v in parts.items() if v is not None}

    def _decode_chunk(self, chunk) -> tuple[dict, list]:
        """One group within the pixel budget, decoded and cut on the device (or it raises):
        ({position: views}, [(position, item) the device rejected])."""
        started = time.perf_counter()
        images = self._device_decode([data for _, _, data in chunk])
        decoded = time.perf_counter()
        self.times["device decode"] += decoded - started
        good, oriented, back, parts = [], [], [], {}
        for (position, item, _), image in zip(chunk, images, strict=True):
            if image is not None:
                image = orient(image, item.orientation)
                if (image.shape[-1], image.shape[-2]) != (item.width, item.height) or (
                    image.shape[0] != 3
                ):
                    image = None  # the header and the decoded stream disagree: trust the CPU
            if image is None:
                back.append((position, item))
                continue
            good.append((position, item))
            oriented.append(image)
        views = device_views(oriented, self.spec) if oriented else []
        del oriented, images
        for (position, item), item_views in zip(good, views, strict=True):
            item.jpeg = None
            item.views = len(item_views)
            parts[position] = item_views
        self.device_decoded += len(good)
        self.times["cut views"] += time.perf_counter() - decoded
        return parts, back

    def _device_decode(self, files: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The whole list in one call; if that fails, file by file, None for each failure.

        An out-of-memory error is raised, not retried here: the caller makes the group smaller.
        """
        try:
            return list(self.decoder(files, self.device))
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
        out: list[torch.Tensor | None] = []
        for data in files:
            try:
                out.append(self.decoder([data], self.device)[0])
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                out.append(None)
        return out

    def _release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def _cpu_fallback(self, item: Item) -> torch.Tensor | None:
        """Decode one file on the CPU, as a worker would; an error sticks to the item.

        In a process of its own (isolate.run_alone): the device rejected this file, so it is
        the kind that may crash a native decoder, and this is the main process.
        """
        path, spec = item.entry.path, self.spec

        def load() -> decode.Decoded | str:
            try:
                return decode.load(path, spec)
            except DecodeError as exc:
                return exc.reason

        timeout = getattr(getattr(self.batches, "dataset", None), "timeout", DEFAULT_TIMEOUT)
        ok, decoded = isolate.run_alone(load, timeout)
        if not isinstance(decoded, decode.Decoded):
            item.error = decoded  # the reason, or how its process died
            return None
        item.width, item.height, item.views = decoded.width, decoded.height, len(decoded.pixels)
        return self._to_device(torch.from_numpy(np.ascontiguousarray(decoded.pixels)))

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """Host views to the device (from pinned memory: without waiting)."""
        return pixels.to(self.device, non_blocking=self.cuda)


def _pixels(jpegs) -> int:
    return sum(item.width * item.height for _, item, _ in jpegs)


def _take(jpegs: list, budget: int) -> list:
    """The first files of `jpegs` whose pixels (from their headers) fit `budget`; at least one."""
    total = 0
    for n, (_, item, _) in enumerate(jpegs):
        total += item.width * item.height
        if n and total > budget:
            return jpegs[:n]
    return jpegs


def choose_decoder(
    mode: str,
    device: torch.device,
    exact: bool,
    injected: JpegDecoder | None = None,
    backend: str = "auto",
) -> tuple[JpegDecoder | None, Split | None, bool]:
    """Where JPEGs are decoded: (device decoder or None, split, whether the split adapts).

    `cpu`, `--exact` and devices other than CUDA: every file on the CPU. `gpu`: every JPEG
    the device decoder takes goes to it. `auto`: on CUDA with a device decoder (nvImageCodec,
    else torchvision's nvJPEG: devdecode.device_decoder; `backend` names one), hybrid, the CPU
    workers' share tuned by `SplitControl`; without one, the CPU. `injected` replaces the device
    decoder (tests, or a library user's own), on any device.
    """
    if mode == "cpu" or exact:
        return None, None, False
    decoder = injected
    if decoder is None and device.type == "cuda":
        decoder = device_decoder(device, backend)
    if decoder is None:
        if mode == "gpu":
            where = "a CUDA device" if device.type != "cuda" else "a GPU JPEG decoder"
            raise UsageError(
                f"--decode gpu needs {where}: pip install nvidia-nvimgcodec-cu13 (or cu12), or "
                "torchvision built for this PyTorch; --decode cpu or auto decode on the CPU"
            )
        return None, None, False
    if mode == "gpu":
        return decoder, Split(0.0), False
    return decoder, Split(START_SHARE), True
