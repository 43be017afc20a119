"""Synthetic "colour shape" images for tests and for training the tiny CLIP fixture model.

Each image shows a single red, green or blue circle, square or triangle on a light background,
either a flat near-white/pastel colour with mild noise ("light") or a low-contrast greyish texture
made of gradients, soft blobs and noise ("textured"); textures never contain saturated colours, so
the only strongly coloured objects are the labelled shapes. ``draw_scene`` puts several shapes of
different labels on one canvas, for measuring multi-label tagging. Drawing uses numpy for the
background and PIL ``ImageDraw`` for the shapes, so even 4K frames take a few tens of
milliseconds. Everything is driven by an explicit ``numpy.random.Generator`` so results are
reproducible. The module depends on numpy and Pillow only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
LABELS: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)

BACKGROUNDS: tuple[str, ...] = ("light", "textured")

_FORMATS: dict[str, tuple[str, str]] = {
    "jpeg": ("JPEG", ".jpg"),
    "jpg": ("JPEG", ".jpg"),
    "png": ("PNG", ".png"),
    "webp": ("WEBP", ".webp"),
    "bmp": ("BMP", ".bmp"),
    "tiff": ("TIFF", ".tiff"),
}

_NOISE_TILE = 128  # fine noise is a random tile repeated over the frame (fast at 4K)


def parse_label(label: str) -> tuple[str, str]:
    """Split ``"red circle"`` into ``("red", "circle")``; raise ``ValueError`` if unknown."""
    parts = label.strip().lower().split()
    if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(LABELS)}")
    return parts[0], parts[1]


def _add_noise(rng: np.random.Generator, img: np.ndarray, amp: int) -> np.ndarray:
    """Add grey noise in ``[-amp, amp]`` to a uint8 (h, w, 3) image in place (tiled, fast)."""
    h, w = img.shape[:2]
    t = _NOISE_TILE
    tile = rng.integers(0, 2 * amp + 1, size=(t, t, 1), dtype=np.uint8)
    reps = (h // t + 2, w // t + 2, 1)
    oy, ox = (int(v) for v in rng.integers(0, t, size=2))
    noise = np.tile(tile, reps)[oy : oy + h, ox : ox + w]
    np.clip(img, amp, 255 - amp, out=img)
    img -= np.uint8(amp)
    img += noise
    return img


def _light_colour(rng: np.random.Generator) -> np.ndarray:
    """A random near-white or pale pastel colour (low saturation, high value)."""
    base = rng.uniform(215.0, 250.0)
    tint = rng.uniform(-12.0, 12.0, size=3)
    return np.clip(base + tint, 195.0, 255.0).astype(np.float32)


def _light_background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Flat light colour with mild noise, as a uint8 (h, w, 3) array."""
    col = _light_colour(rng).astype(np.uint8)
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[...] = col
    return _add_noise(rng, img, int(rng.integers(2, 7)))


def _textured_background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Light, low-contrast, greyish texture (gradient + soft blobs + noise), uint8 (h, w, 3)."""
    # A low-resolution field upscaled with bilinear filtering keeps the cost independent of size.
    lw, lh = max(4, w // 16), max(4, h // 16)
    ys, xs = np.mgrid[0:lh, 0:lw].astype(np.float32)
    ys /= max(lh - 1, 1)
    xs /= max(lw - 1, 1)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    field = (xs * math.cos(angle) + ys * math.sin(angle)) * rng.uniform(-30.0, 30.0)
    for _ in range(int(rng.integers(3, 12))):
        cy, cx = rng.uniform(0.0, 1.0, size=2)
        r = rng.uniform(0.05, 0.35)
        blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2.0 * r * r))
        field += blob.astype(np.float32) * rng.uniform(-35.0, 35.0)
    # Coarse per-cell noise for a mottled look.
    field += rng.uniform(-10.0, 10.0, size=(lh, lw)).astype(np.float32)
    col = _light_colour(rng) - rng.uniform(0.0, 25.0)
    # A faint greyish/brownish tint per channel keeps the texture unsaturated.
    tint = rng.uniform(0.85, 1.0, size=3).astype(np.float32)
    low = np.clip(col + field[..., None] * tint, 0.0, 255.0).astype(np.uint8)
    up = Image.fromarray(low, mode="RGB").resize((w, h), Image.BILINEAR)
    img = np.array(up, dtype=np.uint8)
    return _add_noise(rng, img, int(rng.integers(4, 13)))


def _shape_polygon(
    shape: str, cx: float, cy: float, width: float, angle: float
) -> list[tuple[float, float]]:
    """Vertices of a square or equilateral triangle of the given width, rotated by ``angle``."""
    if shape == "square":
        s = width / 2.0
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    else:  # triangle: base ``width``, centred on its bounding box
        hh = width * math.sqrt(3.0) / 2.0
        pts = [(0.0, -hh / 2.0), (width / 2.0, hh / 2.0), (-width / 2.0, hh / 2.0)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _canvas(rng: np.random.Generator, size, background: str) -> Image.Image:
    """An empty ``size`` canvas with a ``"light"`` or ``"textured"`` background."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ValueError(f"invalid size {size!r}")
    if background == "light":
        arr = _light_background(rng, w, h)
    elif background == "textured":
        arr = _textured_background(rng, w, h)
    else:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    return Image.fromarray(arr, mode="RGB")


def draw(
    label: str,
    size: tuple[int, int] = (224, 224),
    *,
    rng: np.random.Generator,
    shape_frac: float | None = None,
    center: tuple[float, float] | None = None,
    background: str = "light",
) -> Image.Image:
    """Draw one RGB image of ``label`` (e.g. ``"red circle"``).

    ``size`` is ``(width, height)``. ``shape_frac`` is the shape's width as a fraction of the image
    width (``None``: random, 0.35-0.8 of the shorter side). ``center`` is the shape centre in
    fractional ``(x, y)`` coordinates (``None``: random with the shape fully inside the frame).
    ``background`` is ``"light"`` or ``"textured"``.
    """
    colour, shape = parse_label(label)
    img = _canvas(rng, size, background)
    w, h = img.size

    width_px = rng.uniform(0.35, 0.8) * min(w, h) if shape_frac is None else float(shape_frac) * w
    width_px = max(width_px, 2.0)
    height_px = width_px * math.sqrt(3.0) / 2.0 if shape == "triangle" else width_px
    angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-15.0, 15.0))
    # Half-extent allowance for the rotated bounding box (generous, keeps shapes inside).
    ext = max(width_px, height_px) * (1.0 if angle == 0.0 else 1.12) / 2.0
    if center is None:
        lo_x, hi_x = ext, w - ext
        lo_y, hi_y = ext, h - ext
        cx = rng.uniform(lo_x, hi_x) if hi_x > lo_x else w / 2.0
        cy = rng.uniform(lo_y, hi_y) if hi_y > lo_y else h / 2.0
    else:
        cx, cy = float(center[0]) * w, float(center[1]) * h

    _paint(ImageDraw.Draw(img), rng, colour, shape, (cx, cy), width_px, angle)
    return img


def _paint(d, rng, colour: str, shape: str, centre, width_px: float, angle: float) -> None:
    """Fill one shape, its colour jittered around the named one."""
    cx, cy = centre
    base = np.asarray(COLORS[colour], dtype=np.float32)
    fill = tuple(int(v) for v in np.clip(base + rng.uniform(-18.0, 18.0, size=3), 0, 255))
    if shape == "circle":
        r = width_px / 2.0
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon(_shape_polygon(shape, cx, cy, width_px, angle), fill=fill)


def draw_scene(
    labels: tuple[str, ...] | list[str],
    size: tuple[int, int] = (448, 448),
    *,
    rng: np.random.Generator,
    shape_frac: tuple[float, float] = (0.15, 0.3),
    background: str = "light",
    gap: float = 0.03,
    tries: int = 200,
) -> Image.Image:
    """Draw several shapes (one per label, e.g. ``["red circle", "blue square"]``) on one canvas.

    Each shape's width is drawn uniformly from ``shape_frac`` (fractions of the shorter side); the
    shapes sit at random positions, fully inside the frame, with at least ``gap`` of the shorter
    side between their bounding circles, so no two overlap. Raises ``ValueError`` when they cannot
    be placed in ``tries`` attempts (too many or too large shapes for the canvas).
    """
    parsed = [parse_label(label) for label in labels]
    img = _canvas(rng, size, background)
    w, h = img.size
    d = ImageDraw.Draw(img)
    short = min(w, h)
    placed: list[tuple[float, float, float]] = []  # centre x, centre y, bounding radius
    for colour, shape in parsed:
        width_px = max(float(rng.uniform(*shape_frac)) * short, 2.0)
        angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-15.0, 15.0))
        # Radius of a circle around the shape whatever its rotation: half the square's diagonal;
        # the triangle's base corners are sqrt(7)/4 of its width from the point it turns about.
        radius = width_px * {"circle": 0.5, "square": math.sqrt(0.5), "triangle": 0.662}[shape]
        for _ in range(tries):
            cx = float(rng.uniform(radius, max(radius, w - radius)))
            cy = float(rng.uniform(radius, max(radius, h - radius)))
            if all(math.hypot(cx - x, cy - y) >= radius + r + gap * short for x, y, r in placed):
                break
        else:
            raise ValueError(f"cannot place {len(parsed)} shapes of {shape_frac} on {w}x{h}")
        placed.append((cx, cy, radius))
        _paint(d, rng, colour, shape, (cx, cy), width_px, angle)
    return img


def write_dataset(
    folder: str | Path,
    n: int,
    *,
    size: tuple[int, int] = (224, 224),
    rng: np.random.Generator,
    fmt: str = "jpeg",
    small: bool = False,
    background: str = "light",
    labels: tuple[str, ...] = LABELS,
) -> list[tuple[Path, str]]:
    """Write ``n`` images to ``folder`` with labels cycling through ``labels``.

    ``small=True`` draws shapes 0.2-0.3 of the image width; otherwise the default random size.
    ``background`` is ``"light"``, ``"textured"`` or ``"mixed"`` (alternating). Files are named
    ``{index:04d}_{colour}_{shape}{ext}``. Returns ``(path, label)`` pairs in writing order.
    """
    key = fmt.lower().lstrip(".")
    if key not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(_FORMATS)}")
    pil_fmt, ext = _FORMATS[key]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    items: list[tuple[Path, str]] = []
    for i in range(n):
        label = labels[i % len(labels)]
        bg = background if background != "mixed" else BACKGROUNDS[i % len(BACKGROUNDS)]
        frac = float(rng.uniform(0.2, 0.3)) if small else None
        img = draw(label, size, rng=rng, shape_frac=frac, background=bg)
        path = out / f"{i:04d}_{label.replace(' ', '_')}{ext}"
        img.save(path, format=pil_fmt)
        items.append((path, label))
    return items
