"""Decoding: every format and mode to the right RGB pixels, and a reason for every failure."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from omni_cli.errors import DecodeError
from omni_cli.inputs.decode import Preprocess, load, to_rgb

EXACT = Preprocess(draft=False)


def save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


def test_alpha_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 300, 150))  # opaque blue top half
    views = load(save(tmp_path, img, "a.png"), EXACT).pixels[0]
    assert views.shape == (3, 224, 224)
    assert tuple(views[:, 200, 112]) == (255, 255, 255)
    assert tuple(views[:, 20, 112]) == (0, 0, 255)


def test_palette_with_transparency_and_gif_first_frame(tmp_path):
    frames = [Image.new("P", (64, 64), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], transparency=0)
    px = load(str(path), EXACT).pixels[0]
    assert tuple(px[:, 100, 100]) == (255, 0, 0)  # frame 0 is red, not frame 1's green


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((240, 240), 32768, dtype=np.uint16)
    path = save(tmp_path, Image.fromarray(arr), "deep.png")
    px = load(path, EXACT).pixels[0]
    assert abs(int(px[0, 100, 100]) - 128) <= 1
    assert len(set(px[:, 100, 100])) == 1


def test_cmyk_and_grayscale_jpegs(tmp_path):
    cmyk = Image.new("CMYK", (300, 300), (0, 255, 255, 0))  # red in CMYK
    px = load(save(tmp_path, cmyk, "c.jpg", quality=95), EXACT).pixels[0][:, 112, 112]
    assert px[0] > 200 and px[1] < 60 and px[2] < 60
    gray = Image.new("L", (300, 300), 90)
    px = load(save(tmp_path, gray, "g.jpg", quality=95), EXACT).pixels[0][:, 112, 112]
    assert all(abs(int(v) - 90) <= 2 for v in px)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (400, 200), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 200, 200))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path, img, "rot.jpg", exif=exif, quality=95)
    for spec in (EXACT, Preprocess(draft=True)):
        decoded = load(path, spec)
        assert (decoded.width, decoded.height) == (200, 400)
        top = decoded.pixels[0][:, 5, 112]  # after rotation the red half is on top
        assert top[0] > 200 and top[2] < 60


def test_draft_decoding_stays_close_to_exact(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((2048, 1536), Image.Resampling.BICUBIC)
    path = save(tmp_path, img, "big.jpg", quality=92)
    exact, fast = load(path, EXACT).pixels, load(path, Preprocess(draft=True)).pixels
    assert exact.shape == fast.shape == (1, 3, 224, 224)
    assert np.abs(exact.astype(int) - fast.astype(int)).mean() < 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not a picture", "not an image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "truncated JPEG"),
    ],
)
def test_broken_files_have_reasons(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(DecodeError) as info:
        load(str(path), EXACT)
    assert info.value.reason == reason


def test_truncated_png_and_pixel_cap(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (500, 500), (1, 2, 3)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(DecodeError, match="truncated PNG|corrupt"):
        load(str(tmp_path / "t.png"), EXACT)
    (tmp_path / "big.png").write_bytes(buf.getvalue())
    with pytest.raises(DecodeError, match="too many pixels"):
        load(str(tmp_path / "big.png"), Preprocess(max_pixels=100_000))


def test_vanished_file(tmp_path):
    with pytest.raises(DecodeError, match="file vanished"):
        load(str(tmp_path / "gone.jpg"), EXACT)


def test_to_rgb_handles_la_and_i_modes():
    la = Image.new("LA", (4, 4), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    i32 = Image.new("I", (4, 4), 200)
    assert to_rgb(i32).getpixel((0, 0)) == (200, 200, 200)
