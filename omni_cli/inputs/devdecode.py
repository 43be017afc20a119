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

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import tiling
from .decode import Preprocess, crop_box, resized

# (list of 1-D uint8 CPU tensors holding JPEG files, device) -> list of (3, H, W) uint8 tensors
JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]

RESIZE_FLOATS = 1 << 27  # floats per resampling call (512 MiB): bounds a batch's temporaries


def nvjpeg_decoder() -> JpegDecoder | None:
    """torchvision's batched GPU JPEG decoder, or None where torchvision cannot provide it."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # not installed, or built for another torch (PyPI's beside a CPU torch)
        return None

    def decode(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)

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
