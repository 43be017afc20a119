"""A minimal DNG writer for the tests: a Bayer mosaic of an RGB picture, with an optional
embedded JPEG preview, readable by LibRaw (rawpy).

Layout: IFD0 is the raw image (16-bit RGGB CFA, uncompressed, the DNG tags LibRaw needs, the
colour matrix of linear sRGB so that the demosaiced colours come back), chained to IFD1, the
preview (NewSubFileType 1, an old-style JPEG given by JPEGInterchangeFormat). A preview tag in
the raw IFD itself would redirect LibRaw's raw data offset to the JPEG: hence two IFDs.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

WHITE = 4095
# XYZ (D65) -> linear sRGB, the DNG ColorMatrix1 of a camera that sees linear sRGB
XYZ_TO_SRGB = ((3.2406, -1.5372, -0.4986), (-0.9689, 1.8758, 0.0415), (0.0557, -0.2040, 1.0570))
_PACK = {1: "B", 3: "H", 4: "I", 5: "II", 10: "ii"}


def _ifd(entries: list[tuple], offset: int, next_ifd: int = 0) -> bytes:
    """One IFD at `offset`, its values that do not fit in 4 bytes right after it."""
    entries = sorted(entries, key=lambda e: e[0])
    data_at = offset + 2 + 12 * len(entries) + 4
    head, extra = struct.pack("<H", len(entries)), b""
    for tag, kind, values in entries:
        if kind == 2:
            raw, count = values.encode() + b"\0", len(values) + 1
        elif kind in (5, 10):
            raw = b"".join(struct.pack("<" + _PACK[kind], *v) for v in values)
            count = len(values)
        else:
            raw, count = struct.pack(f"<{len(values)}{_PACK[kind]}", *values), len(values)
        if len(raw) <= 4:
            head += struct.pack("<HHI", tag, kind, count) + raw.ljust(4, b"\0")
        else:
            head += struct.pack("<HHII", tag, kind, count, data_at + len(extra))
            extra += raw + b"\0" * (len(raw) % 2)
    return head + struct.pack("<I", next_ifd) + extra


def mosaic(rgb: np.ndarray) -> bytes:
    """(h, w, 3) uint8 sRGB -> RGGB Bayer samples, linear, 12-bit, little-endian uint16."""
    lin = (rgb.astype(np.float64) / 255.0) ** 2.2 * WHITE
    cfa = np.empty(rgb.shape[:2], np.uint16)
    cfa[0::2, 0::2] = lin[0::2, 0::2, 0]
    cfa[0::2, 1::2] = lin[0::2, 1::2, 1]
    cfa[1::2, 0::2] = lin[1::2, 0::2, 1]
    cfa[1::2, 1::2] = lin[1::2, 1::2, 2]
    return cfa.astype("<u2").tobytes()


def make_dng(image: Image.Image, preview: Image.Image | None = None, orientation: int = 1) -> bytes:
    """DNG bytes of `image` (as stored, before `orientation`), with `preview` as its JPEG."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    samples = mosaic(rgb)
    jpeg = b""
    if preview is not None:
        buffer = io.BytesIO()
        preview.convert("RGB").save(buffer, "JPEG", quality=92)
        jpeg = buffer.getvalue()
    matrix = [(round(v * 10000), 10000) for row in XYZ_TO_SRGB for v in row]
    raw_tags = [
        (254, 4, [0]), (256, 4, [width]), (257, 4, [height]), (258, 3, [16]), (259, 3, [1]),
        (262, 3, [32803]), (271, 2, "Omni"), (272, 2, "Test camera"), (274, 3, [orientation]),
        (277, 3, [1]), (278, 4, [height]), (284, 3, [1]), (33421, 3, [2, 2]),
        (33422, 1, [0, 1, 1, 2]), (50706, 1, [1, 4, 0, 0]), (50707, 1, [1, 1, 0, 0]),
        (50708, 2, "Omni Test camera"), (50717, 4, [WHITE]), (50721, 10, matrix),
        (50728, 5, [(1, 1)] * 3), (50778, 3, [21]),
    ]  # fmt: skip

    def build(strip: int, ifd1: int, at: int) -> tuple[bytes, bytes]:
        first = _ifd([*raw_tags, (273, 4, [strip]), (279, 4, [len(samples)])], 8,
                     ifd1 if jpeg else 0)  # fmt: skip
        if not jpeg:
            return first, b""
        w, h = preview.size
        second = [(254, 4, [1]), (256, 4, [w]), (257, 4, [h]), (258, 3, [8, 8, 8]),
                  (259, 3, [6]), (262, 3, [6]), (277, 3, [3]), (513, 4, [at]),
                  (514, 4, [len(jpeg)])]  # fmt: skip
        return first, _ifd(second, ifd1)

    first, second = build(0, 0, 0)  # sizes only: offsets do not change them
    strip = 8 + len(first)
    ifd1 = strip + len(samples)
    first, second = build(strip, ifd1, ifd1 + len(second))
    return b"II*\0" + struct.pack("<I", 8) + first + samples + second + jpeg
