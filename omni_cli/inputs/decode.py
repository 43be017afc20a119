"""Decode: one file in, the model's input views out, as uint8 arrays.

Runs in DataLoader worker processes, so it touches neither torch nor the device. It opens the
file by its content with only the decoders omni allows (`FORMATS`: an EPS named `.jpg` never
reaches Ghostscript), checks the pixel cap from the header alone, asks for a reduced-scale
decode when the target is smaller (JPEG's draft mode: 1/2, 1/4 or 1/8 of the work; HEIF's
embedded thumbnails; camera RAW's embedded preview, raw.py), applies the EXIF orientation,
converts every mode to RGB (alpha is composited on white, 16-bit is scaled, CMYK and palettes
are converted), and cuts the views: the whole image resized and centre-cropped exactly as the
model's image processor does, plus the tiling views (tiling.py) when on. Every failure becomes a
`DecodeError` with a short reason; it never escapes as anything else.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DecodeError
from . import raw, tiling

Image.MAX_IMAGE_PIXELS = None  # the cap is ours (Preprocess.max_pixels), checked from the header

try:  # HEIC/HEIF (a default dependency); AVIF is Pillow's own plugin
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:  # pragma: no cover - a broken install: HEIC files become error rows
    pass

# Every format Pillow may open for omni, by Pillow's format name: reports, search and decoding
# all open files through `open_image`, so nothing else (EPS, which runs Ghostscript; PDF; the
# many exotic plugins) ever parses a file, whatever its name says. MPO is a JPEG with extra
# frames (phone cameras); DIB a BMP without its file header.
FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP", "DIB", "HEIF", "AVIF")
DRAFT_FORMATS = ("JPEG", "MPO", "HEIF")  # formats with a reduced-scale decode (JPEG's DCT
# scaling; HEIF's embedded thumbnails, used only when at least the needed size)


def allowed_formats() -> tuple[str, ...]:
    """FORMATS that this install can open (AVIF needs a Pillow built with libavif)."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def open_image(fp) -> Image.Image:
    """`Image.open` restricted to the allowed formats: the only way omni opens an image."""
    return Image.open(fp, formats=allowed_formats())


def open_to_look(path: str | os.PathLike) -> Image.Image:
    """A file opened to be looked at (the report's thumbnails): `open_image`, or for camera
    RAW its embedded preview (else a half-size demosaic), already oriented."""
    if _is_raw(sniff(path), str(path)):
        rgb, *_ = raw.load(str(path), Preprocess.max_pixels, lambda width, height: 0.0)
        return rgb
    return open_image(path)


@dataclass(frozen=True)
class Preprocess:
    """What the model's image processor does, plus how omni decodes. Picklable for workers."""

    size: int = 224  # the model's square input
    shortest_edge: int | None = (
        224  # resize the short side to this, then centre-crop; None = squash
    )
    resample: int = Image.Resampling.BICUBIC
    draft: bool = True  # JPEG reduced-scale decoding; False = exactly the reference path
    tiles: str = "off"  # off | auto | RxC
    tile_overlap: float = 0.5
    max_pixels: int = 200_000_000


@dataclass
class Decoded:
    pixels: np.ndarray  # (views, 3, size, size) uint8
    width: int  # after EXIF orientation
    height: int


@dataclass
class RawJpeg:
    """A JPEG read but not decoded: its bytes go to the device's decoder (devdecode.py)."""

    data: np.ndarray  # the file's bytes, uint8
    width: int  # after EXIF orientation
    height: int
    orientation: int  # EXIF orientation tag, 1 = as stored


def read_jpeg(path: str, spec: Preprocess) -> RawJpeg | None:
    """The file's bytes and header facts if a device JPEG decoder can take it, else None.

    Reads the file once and parses only its header (no pixel decode). Taken: baseline JPEGs in
    YCbCr (PIL mode RGB) that end with an end-of-image marker. Everything else (other formats,
    CMYK/YCCK, greyscale, progressive, truncated or trailing data, over the pixel cap) returns
    None and takes the CPU path, which gives it pixels or the usual error row.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
                if img.format != "JPEG" or img.mode != "RGB" or img.info.get("progressive"):
                    return None
                width, height = img.size
                if width * height > spec.max_pixels or min(width, height) < 1:
                    return None
                orientation = img.getexif().get(0x0112, 1)
    except Exception:  # anything odd: let the CPU path say what is wrong with it
        return None
    if orientation not in range(1, 9):
        orientation = 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return RawJpeg(np.frombuffer(data, np.uint8), width, height, orientation)


def load(path: str, spec: Preprocess) -> Decoded:
    """Open `path` and cut its views, or raise DecodeError with a short reason."""
    try:
        return _load(path, spec)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("file vanished") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except UnidentifiedImageError:
        fmt = sniff(path)  # a known signature that PIL cannot parse is a cut-off file
        raise DecodeError(f"truncated {fmt}" if fmt else "not an image") from None
    except Image.DecompressionBombError:
        raise DecodeError("too many pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        if (
            "truncated" in text.lower()
            or "end of file" in text.lower()
            or isinstance(exc, EOFError)
        ):
            raise DecodeError(f"truncated {_format_name(path)}") from None
        raise DecodeError(f"corrupt image: {text[:120]}") from None
    except MemoryError:
        raise DecodeError("out of memory decoding") from None
    except Exception as exc:  # a decoder bug must not kill the run; the row says what happened
        raise DecodeError(f"decoder error: {type(exc).__name__}: {str(exc)[:100]}") from None


def _load(path: str, spec: Preprocess) -> Decoded:
    if os.path.getsize(path) == 0:
        raise DecodeError("empty file")
    with open(path, "rb") as f:
        kind = sniff_bytes(f.read(16))
        f.seek(0)
        if _is_raw(kind, path):
            return _raw(path, spec)
        if kind in UNSUPPORTED:
            raise DecodeError(f"unsupported format ({kind})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF and palette chatter is not for the user
            try:
                img = open_image(f)
            except UnidentifiedImageError:
                if kind == "TIFF" and raw.available():  # a DNG (or other TIFF RAW) named .tif
                    return _raw(path, spec)
                raise
            with img:
                rgb, width, height = _pillow(img, spec)
    return cut_views(rgb, width, height, spec)


def _pillow(img: Image.Image, spec: Preprocess) -> tuple[Image.Image, int, int]:
    """(oriented RGB image, width, height after orientation); the image may be drafted."""
    raw_w, raw_h = img.size
    orientation = img.getexif().get(0x0112, 1)
    if raw_w * raw_h > spec.max_pixels:
        raise DecodeError(f"too many pixels ({raw_w}x{raw_h} > {spec.max_pixels:,})")
    if img.format in DRAFT_FORMATS and spec.draft:
        # EXIF orientation swaps axes after decoding; the scale does not depend on it
        scale = needed_scale(raw_w, raw_h, spec)
        if scale < 1.0:
            img.draft("RGB", (math.ceil(raw_w * scale), math.ceil(raw_h * scale)))
    img.load()
    rgb = to_rgb(ImageOps.exif_transpose(img))
    # EXIF orientations 5-8 swap the axes; the drafted image is the same shape, smaller.
    width, height = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
    return rgb, width, height


def _raw(path: str, spec: Preprocess) -> Decoded:
    def scale(width: int, height: int) -> float:
        return needed_scale(width, height, spec) if spec.draft else 1.0

    rgb, width, height, _ = raw.load(path, spec.max_pixels, scale)
    return cut_views(rgb, width, height, spec)


def cut_views(rgb: Image.Image, width: int, height: int, spec: Preprocess) -> Decoded:
    """The global view and, with tiling, the tiles, from an oriented RGB image of the file.

    `rgb` may be smaller than `width` x `height` (drafted, a preview): boxes are scaled to it.
    """
    views = [resize_crop(rgb, spec)]
    grid = tiling.grid_for(width, height, spec.tiles, spec.tile_overlap, spec.size)
    if grid:  # tiled: the whole-image squares, then the tiles (see tiling.py)
        sx, sy = rgb.width / width, rgb.height / height
        for left, top, right, bottom in tiling.whole_boxes(width, height) + grid:
            box = (left * sx, top * sy, right * sx, bottom * sy)
            tile = rgb.resize(
                (spec.size, spec.size), _filter(spec), box=box, reducing_gap=_gap(spec)
            )
            views.append(np.asarray(tile))
    pixels = np.stack(views).transpose(0, 3, 1, 2)  # (views, 3, size, size)
    return Decoded(np.ascontiguousarray(pixels), width, height)


def needed_scale(width: int, height: int, spec: Preprocess) -> float:
    """The smallest scale of the full image that still serves every view at full quality."""
    short = spec.shortest_edge or spec.size
    scale = short / min(width, height)
    tile = tiling.tile_side(width, height, spec.tiles, spec.tile_overlap, spec.size)
    if tile:
        scale = max(scale, spec.size / tile)
    return scale


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha over white, 16-bit scaled down, palettes expanded."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resized(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after the processor's resize: short side to `shortest_edge`, the long
    side scaled and truncated as CLIPImageProcessor does."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_box(width: int, height: int, spec: Preprocess) -> tuple[float, ...] | None:
    """The global view's source box (left, top, right, bottom) in the image's own pixels.

    The model's processor resizes the short side to `shortest_edge` (truncating the long side
    as it does) and centre-crops `size`; resampling that box straight to size x size gives the
    same view without computing what the crop throws away. None when the processor squashes
    (no shortest edge) or its crop is larger than its resize (it pads).
    """
    if spec.shortest_edge is None:
        return None
    new_w, new_h = resized(width, height, spec.shortest_edge)
    top, left = (new_h - spec.size) // 2, (new_w - spec.size) // 2
    if top < 0 or left < 0:
        return None
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)


def resize_crop(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """The global view, as CLIPImageProcessor makes it: short side to N (bicubic), centre crop."""
    if spec.shortest_edge is None:
        out = img.resize((spec.size, spec.size), _filter(spec), reducing_gap=_gap(spec))
        return np.asarray(out)
    box = crop_box(img.width, img.height, spec)
    if spec.draft and box is not None:
        # Resample only the crop's source box, straight to size x size: the same filter and
        # pixel centres as resize-then-crop, without computing the columns or rows the crop
        # throws away. 1024x768 JPEG: 3.1 -> 2.5 ms per image on one EPYC core.
        size = (spec.size, spec.size)
        return np.asarray(img.resize(size, _filter(spec), box=box, reducing_gap=_gap(spec)))
    new_w, new_h = resized(img.width, img.height, spec.shortest_edge)
    top, left = (new_h - spec.size) // 2, (new_w - spec.size) // 2
    out = np.asarray(img.resize((new_w, new_h), _filter(spec), reducing_gap=_gap(spec)))
    if top < 0 or left < 0:  # a processor whose resize is smaller than its crop: pad like it does
        padded = np.zeros((max(new_h, spec.size), max(new_w, spec.size), 3), np.uint8)
        pt, pl = max(-top, 0), max(-left, 0)
        padded[pt : pt + new_h, pl : pl + new_w] = out
        out, top, left = padded, max(top, 0), max(left, 0)
    return out[top : top + spec.size, left : left + spec.size]


def _filter(spec: Preprocess) -> int:
    # The fast path resamples bilinearly (PIL's filters are antialiased at any scale): 0.8 vs
    # 1.2 ms per 224 px view on one EPYC core, which lifted `tag` from 83% to 89% of the ViT-B/32
    # encoder on 2 cores; benchmarks/fidelity.py: still 100% top-1 agreement with the reference,
    # mean |similarity difference| 1.4e-3 (bicubic: 5.9e-4). --exact keeps the model's filter.
    return Image.Resampling.BILINEAR if spec.draft else spec.resample


def _gap(spec: Preprocess) -> float | None:
    # reducing_gap box-filters large downscales first: much faster, not bit-exact.
    return 3.0 if spec.draft else None


SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"FUJIFILMCCD-RAW", "RAF"),
    (b"IIRO", "ORF"),
    (b"IIRS", "ORF"),
    (b"MMOR", "ORF"),
    (b"IIU\x00", "RW2"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "PostScript"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
)
# ISO base media brands (bytes 8-12 after `ftyp`)
BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"heim": "HEIF", b"heis": "HEIF", b"hevc": "HEIF",
          b"hevx": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF",
          b"crx ": "CR3"}  # fmt: skip
RAW_KINDS = frozenset(["CR2", "CR3", "RAF", "ORF", "RW2"])  # DNG, NEF, ARW: TIFF + extension
UNSUPPORTED = frozenset(["PostScript", "PDF", "PSD"])  # recognised, never opened


def sniff_bytes(head: bytes) -> str | None:
    """The format a file's first 16 bytes announce, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":
        return BRANDS.get(head[8:12])
    if head.startswith(b"II*\x00") and head[8:10] == b"CR":
        return "CR2"
    return next((name for magic, name in SIGNATURES if head.startswith(magic)), None)


def sniff(path: str) -> str | None:
    """The image format a file's first bytes announce, if any."""
    try:
        with open(path, "rb") as f:
            return sniff_bytes(f.read(16))
    except OSError:
        return None


def _is_raw(kind: str | None, path: str) -> bool:
    """Camera RAW by content; TIFF-based RAW (DNG, NEF, ARW) by content and extension."""
    ext = os.path.splitext(path)[1].lower()
    return kind in RAW_KINDS or (kind == "TIFF" and ext in raw.RAW_EXTENSIONS)


def _format_name(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    names = {"jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "jfif": "JPEG", "tif": "TIFF",
             "heic": "HEIF", "hif": "HEIF"}  # fmt: skip
    return sniff(path) or names.get(ext, ext.upper() or "image")
