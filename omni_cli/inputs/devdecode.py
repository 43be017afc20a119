"""Device decode: JPEG batches decoded on the GPU, and every view cut and resized there.

On a fast GPU the CPU's JPEG decoding bounds end-to-end throughput (design.md section 6), so
decode workers only read a JPEG's bytes and header (`decode.read_jpeg`) and the main process
decodes them in batches on the device with torchvision's nvJPEG binding, which uses the
hardware JPEG engines of A100/H100-class GPUs. The decoder is injected (`JpegDecoder`): tests
pass a PIL-backed fake returning the same CHW uint8 tensors, so batching, fallback and error
rows are exercised on the CPU. torchvision is imported only when a device decoder is asked for.

`device_views` is device-agnostic torch: the EXIF orientation, the global view (the crop box of
the model's resize-and-centre-crop, resampled straight to size x size), the whole-image squares
and the tiles of `tiling.py` (cut from the image resized once per scale). Images of the same
size are resampled together. Resampling is bilinear with antialiasing, as the CPU fast path's.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError
from . import tiling
from .decode import Preprocess, crop_box, resized

# (list of 1-D uint8 CPU tensors holding JPEG files, device) -> one (3, H, W) uint8 tensor per
# file, or None for a file it cannot decode (a decoder may also raise for the whole list).
JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor | None]]

RESIZE_FLOATS = 1 << 27  # floats per resampling call (512 MiB): bounds a batch's temporaries
BACKENDS = ("nvimgcodec", "torchvision")  # device JPEG decoders, preferred first
# What a device allocation failure says when it surfaces from cuBLAS, cuDNN or a decoder library
# instead of PyTorch's allocator (a RuntimeError, not a torch.OutOfMemoryError).
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                 "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")  # fmt: skip


def is_out_of_memory(exc: BaseException) -> bool:
    """True for every way a device reports that an allocation failed."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def device_decoder(device: torch.device, backend: str = "auto") -> JpegDecoder | None:
    """The device JPEG decoder to use: nvImageCodec where installed, else torchvision's nvJPEG.

    `backend` (or, for `auto`, $OMNI_JPEG_DECODER) names one of BACKENDS to use only that one.
    None where none loads.
    """
    if backend == "auto":
        backend = os.environ.get("OMNI_JPEG_DECODER", "auto")
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"OMNI_JPEG_DECODER must be one of {', '.join(BACKENDS)}, not {backend}")
    makers = {"nvimgcodec": nvimgcodec_decoder, "torchvision": nvjpeg_decoder}
    for name in BACKENDS if backend == "auto" else (backend,):
        decoder = makers[name](device)
        if decoder is not None:
            return decoder
    return None


class NvImageCodec:
    """nvImageCodec's batched decoder (`nvidia.nvimgcodec`, wheel nvidia-nvimgcodec-cu13).

    One `Decoder.decode(list)` call decodes a whole group with the GPU's hardware JPEG engine
    where it has one (else CUDA, else the CPU backends, chosen per image), releasing the GIL while
    it works, and returns None for a file it cannot decode instead of failing the call. Releases
    that drop failed files from the list instead are decoded again file by file. EXIF orientation
    is left to `orient`, as for the other decoders; images come back HWC and are viewed as CHW.
    """

    name = "nvimgcodec"
    releases_gil = True  # the feeder then decodes on a thread of its own (feed.Feeder)

    def __init__(self, module, device: torch.device):
        self.nv = module
        index = device.index if device.index is not None else 0
        if device.type == "cuda" and device.index is None:
            index = torch.cuda.current_device()
        self.decoder = module.Decoder(device_id=index)
        self.params = module.DecodeParams(apply_exif_orientation=False,
                                          color_spec=module.ColorSpec.RGB,
                                          allow_any_depth=False)  # fmt: skip

    def __call__(self, files: list[torch.Tensor], device: torch.device) -> list:
        arrays = [f.numpy() for f in files]
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        images = self.decoder.decode(arrays, params=self.params, cuda_stream=stream)
        if len(images) != len(arrays):  # an older release dropped the failures: ask one by one
            images = [self.decoder.decode(a, params=self.params, cuda_stream=stream)
                      for a in arrays]  # fmt: skip
        return [None if img is None else _chw(img, device) for img in images]


def _chw(image, device: torch.device) -> torch.Tensor:
    """A decoded (H, W, 3) image (DLPack) -> a (3, H, W) uint8 view on `device`."""
    hwc = torch.from_dlpack(image)
    return hwc.permute(2, 0, 1).to(device, non_blocking=True)


def nvimgcodec_decoder(device: torch.device) -> JpegDecoder | None:
    """nvImageCodec's decoder on `device`, or None where it is not installed or cannot start."""
    with _stderr_silenced():  # its extensions for other formats complain when their libraries
        try:  # are missing (nvJPEG2000, nvTIFF): omni asks it for JPEGs only
            from nvidia import nvimgcodec

            return NvImageCodec(nvimgcodec, device)
        except Exception:  # not installed, or no usable device or library: the next backend
            return None


@contextlib.contextmanager
def _stderr_silenced():
    """Send what native code writes to stderr (file descriptor 2) to /dev/null for a while."""
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def nvjpeg_decoder(device: torch.device | None = None) -> JpegDecoder | None:
    """torchvision's batched GPU JPEG decoder, or None where torchvision cannot provide it.

    Its batched call blocks the calling thread until its stream syncs, holds a process-wide
    lock, and fails as a whole for one bad file (the feeder then retries file by file).
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # not installed, or built for another torch (PyPI's beside a CPU torch)
        return None

    def decode(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)

    decode.name = "torchvision"  # type: ignore[attr-defined]
    return decode


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) as stored -> as displayed, for EXIF orientations 1-8 (PIL's exif_transpose)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def device_views(images: list[torch.Tensor], spec: Preprocess) -> list[torch.Tensor]:
    """Oriented (3, H, W) uint8 images -> each one's (views, 3, size, size) uint8 views.

    Views come in the CPU path's order: global, whole-image squares, tiles (see tiling.py).
    """
    out: list[list[torch.Tensor]] = [[] for _ in images]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        by_size[(img.shape[-2], img.shape[-1])].append(i)
    for (height, width), members in by_size.items():
        group = [images[i] for i in members]
        for i, view in zip(members, _global_views(group, width, height, spec), strict=True):
            out[i].append(view[None])
        grid = tiling.grid_for(width, height, spec.tiles, spec.tile_overlap, spec.size)
        if not grid:
            continue
        stack = torch.stack(group)  # (n, 3, H, W)
        squares = tiling.whole_boxes(width, height)
        for boxes in (squares, grid):
            if boxes:
                cut = _boxes(stack, width, height, boxes, spec.size)  # (n, boxes, 3, S, S)
                for j, i in enumerate(members):
                    out[i].append(cut[j])
    return [torch.cat(views) for views in out]


def _global_views(group: list[torch.Tensor], width: int, height: int, spec: Preprocess):
    """Images of one size, (3, H, W) each -> (n, 3, S, S): the model's resize and centre crop.

    Only the crop's source box is copied and resampled, not the rest of each image.
    """
    size = spec.size
    if spec.shortest_edge is None:  # squash the whole image
        return resize(torch.stack(group), size, size)
    box = crop_box(width, height, spec)
    if box is not None:
        left, top, right, bottom = (round(v) for v in box)
        return resize(torch.stack([img[:, top:bottom, left:right] for img in group]), size, size)
    stack = torch.stack(group)
    # A processor whose crop is larger than its resize pads, as decode.resize_crop does.
    new_w, new_h = resized(width, height, spec.shortest_edge)
    small = resize(stack, new_h, new_w)
    padded = small.new_zeros(len(stack), 3, max(new_h, size), max(new_w, size))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    pt, pl = max(-top, 0), max(-left, 0)
    padded[..., pt : pt + new_h, pl : pl + new_w] = small
    top, left = max(top, 0), max(left, 0)
    return padded[..., top : top + size, left : left + size]


def _boxes(stack: torch.Tensor, width: int, height: int, boxes, size: int) -> torch.Tensor:
    """Square boxes of one side, cut from the images resized once: (n, boxes, 3, size, size)."""
    side = boxes[0][2] - boxes[0][0]
    scale = size / side
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    small = resize(stack, new_h, new_w)  # (n, 3, h', w')
    cuts = []
    for left, top, _, _ in boxes:
        x = min(max(0, round(left * scale)), new_w - size)
        y = min(max(0, round(top * scale)), new_h - size)
        cuts.append(small[..., y : y + size, x : x + size])
    return torch.stack(cuts, dim=1)


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 3, h, w) uint8 -> (n, 3, height, width) uint8, bilinear with antialiasing."""
    if x.shape[-2:] == (height, width):
        return x.contiguous()
    per = max(1, RESIZE_FLOATS // max(1, 3 * x.shape[-1] * x.shape[-2]))
    parts = []
    for start in range(0, len(x), per):
        y = F.interpolate(x[start : start + per].float(), size=(height, width), mode="bilinear",
                          antialias=True, align_corners=False)  # fmt: skip
        parts.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
