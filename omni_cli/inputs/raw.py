"""Camera RAW: the embedded JPEG preview when it is large enough, a half-size demosaic otherwise.

Every modern camera embeds a full- or near-full-size JPEG preview in its RAW files; decoding it
is several times faster than demosaicing the sensor data, and the model needs at most the
resolution that the views (global view and tiles) ask for. So the preview is used when its
scale of the full image reaches what `decode.needed_scale` asks and it shows the same frame
(aspect ratio within 2%); else LibRaw demosaics, at half size when half is enough. `rawpy` is
the optional extra `omni-cli[raw]`: without it a RAW file is an error row that says so.

Orientation: LibRaw's `flip` (from the RAW's own metadata) rotates the demosaiced image; the
preview is rotated by its own EXIF orientation (LibRaw writes `flip` into the JPEG preview's
EXIF when it has none), else, for a bitmap preview, by `flip` if it is stored unrotated (its
aspect matches the sensor's), else taken as it is.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from ..errors import DecodeError

RAW_EXTENSIONS = frozenset([".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2"])
INSTALL_HINT = "camera RAW needs: pip install 'omni-cli[raw]'"
ASPECT_TOLERANCE = 0.02
# LibRaw's flip: 3 = 180 degrees, 5 = 90 counter-clockwise, 6 = 90 clockwise.
_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90,
         6: Image.Transpose.ROTATE_270}  # fmt: skip


def available() -> bool:
    try:
        import rawpy  # noqa: F401
    except ImportError:
        return False
    return True


def load(
    path: str, max_pixels: int, needed_scale: Callable[[int, int], float]
) -> tuple[Image.Image, int, int, str]:
    """(RGB image, full width, full height, how) for a RAW file, oriented.

    The image may be smaller than the full size (a preview or a half-size demosaic); `how` is
    `preview` or `demosaic`. Raises DecodeError for a missing extra or a file LibRaw rejects.
    """
    try:
        import rawpy
    except ImportError:
        raise DecodeError(INSTALL_HINT) from None
    try:
        with rawpy.imread(path) as raw:
            sizes = raw.sizes
            flip = sizes.flip if sizes.flip in _FLIP else 0
            sensor = (sizes.width, sizes.height)  # as stored
            width, height = (sensor[1], sensor[0]) if flip in (5, 6) else sensor
            if min(width, height) < 1:
                raise DecodeError("corrupt image: camera RAW without pixels")
            if width * height > max_pixels:
                raise DecodeError(f"too many pixels ({width}x{height} > {max_pixels:,})")
            scale = needed_scale(width, height)
            preview = _preview(raw, rawpy, sensor, flip, (width, height), scale)
            if preview is not None:
                return preview, width, height, "preview"
            pixels = raw.postprocess(half_size=scale <= 0.5, use_camera_wb=True, output_bps=8)
            return Image.fromarray(np.ascontiguousarray(pixels), "RGB"), width, height, "demosaic"
    except DecodeError:
        raise
    except rawpy.LibRawFileUnsupportedError:
        raise DecodeError("not an image (camera RAW that LibRaw does not read)") from None
    except (rawpy.LibRawIOError, rawpy.LibRawDataError) as exc:
        raise DecodeError(f"truncated camera RAW ({_text(exc)})") from None
    except rawpy.LibRawError as exc:
        raise DecodeError(f"corrupt image: camera RAW: {_text(exc)}") from None


def _preview(raw, rawpy, sensor, flip, full, scale) -> Image.Image | None:
    """The embedded preview, oriented, if it covers the needed scale of the same frame."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    except rawpy.LibRawError:
        return None  # a broken preview: the sensor data may still be fine
    try:
        if thumb.format == rawpy.ThumbFormat.JPEG:
            from .decode import open_image

            img = open_image(io.BytesIO(thumb.data))
            if img.format not in ("JPEG", "MPO"):
                return None
            own = img.getexif().get(0x0112, 1)
            if own in range(2, 9):
                img = ImageOps.exif_transpose(img)
                flip = 0
            img = img.convert("RGB")  # decodes it
        elif thumb.format == rawpy.ThumbFormat.BITMAP:
            img = Image.fromarray(np.ascontiguousarray(thumb.data)).convert("RGB")
        else:
            return None
    except Exception:  # a preview Pillow cannot read: demosaic instead
        return None
    if _same_aspect(img.size, sensor) and flip:
        img = img.transpose(_FLIP[flip])
    elif not _same_aspect(img.size, full):
        return None  # another frame (cropped, letterboxed): not the image's views
    if img.width < scale * full[0] * (1 - ASPECT_TOLERANCE):
        return None  # too small for the views: demosaic
    return img


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) <= ASPECT_TOLERANCE * a[1] * b[1]


def _text(exc: Exception) -> str:
    msg = exc.args[0] if exc.args else type(exc).__name__
    return (msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg))[:80]
