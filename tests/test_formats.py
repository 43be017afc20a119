"""Phone and camera formats: HEIC, AVIF and camera RAW tagged like JPEG, on every path, and the
allow-list that keeps every other Pillow plugin (EPS and its Ghostscript) away from the files.

Every file is made at test time from the fixture's shapes: pillow-heif writes HEIC, Pillow
writes AVIF, tests/dng.py writes a DNG that LibRaw reads (with and without its JPEG preview).
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import EpsImagePlugin, Image, features

from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
from omni_cli.errors import DecodeError
from omni_cli.inputs import decode, raw
from omni_cli.inputs.loader import ImageDataset, Split
from omni_cli.inputs.sources import discover
from omni_cli.look.report import thumbnail
from omni_cli.pipeline import tag

from .conftest import LABELS, MODEL, shape_image
from .dng import make_dng

needs_avif = pytest.mark.skipif(not features.check("avif"), reason="Pillow without AVIF")
needs_rawpy = pytest.mark.skipif(not raw.available(), reason="rawpy not installed")
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"


def heic(img: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "HEIF", quality=90, **kw)
    return buffer.getvalue()


def avif(img: Image.Image, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "AVIF", quality=90, **kw)
    return buffer.getvalue()


def rotated(img: Image.Image, orientation: int) -> tuple[Image.Image, bytes]:
    """`img` stored so that EXIF `orientation` displays it as `img`: (stored, EXIF bytes)."""
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
            3: Image.Transpose.ROTATE_180}  # fmt: skip
    exif = Image.Exif()
    exif[0x0112] = orientation
    return img.transpose(undo[orientation]), exif.tobytes()


def two_colours(size=(320, 240)) -> Image.Image:
    """Left half red, right half blue: a wrong rotation or a double one is plain to see."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return img


def run(folder, out, **kw) -> dict[str, dict]:
    cfg = TagConfig(inputs=(folder,), labels_file=kw.pop("labels"), output=out, workers=0,
                    model=ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=8),
                    **kw)  # fmt: skip
    tag(cfg)
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def first_view(path) -> np.ndarray:
    return decode.load(str(path), decode.Preprocess(draft=False)).pixels[0].astype(int)


@pytest.fixture
def phone_folder(tmp_path):
    """One shape per label, as HEIC, AVIF (if this Pillow has it), and a JPEG named `.heic`."""
    folder = tmp_path / "phone"
    folder.mkdir()
    truth = {}
    writers = [("heic", heic)] + ([("avif", avif)] if features.check("avif") else [])
    for i, label in enumerate(LABELS):
        ext, write = writers[i % len(writers)]
        name = f"{label.replace(' ', '_')}.{ext}"
        (folder / name).write_bytes(write(shape_image(label, seed=i)))
        truth[name] = label
    buffer = io.BytesIO()
    shape_image(LABELS[0], seed=40).save(buffer, "JPEG", quality=90)
    (folder / "really_a_jpeg.heic").write_bytes(buffer.getvalue())
    truth["really_a_jpeg.heic"] = LABELS[0]
    return folder, truth


def test_heic_and_avif_are_listed_and_tagged_like_jpeg(tmp_path, phone_folder, labels_file):
    folder, truth = phone_folder
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file)
    assert set(rows) == set(truth)
    for name, label in truth.items():
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
        assert rows[name]["top_labels"][0] == label, name
        assert (rows[name]["width"], rows[name]["height"]) == (320, 240)


def test_heic_and_avif_with_tiles_tag_like_without(tmp_path, phone_folder, labels_file):
    folder, truth = phone_folder
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file,
               decode=DecodeConfig(tiles="2x2"))  # fmt: skip
    for name, label in truth.items():
        assert rows[name]["views"] > 1 and rows[name]["top_labels"][0] == label, name


@pytest.mark.parametrize("fmt", ["heic", pytest.param("avif", marks=needs_avif)])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_once(tmp_path, fmt, orientation):
    shown = two_colours()
    stored, exif = rotated(shown, orientation)
    path = tmp_path / f"o.{fmt}"
    path.write_bytes((heic if fmt == "heic" else avif)(stored, exif=exif))
    reference = tmp_path / "shown.png"
    shown.save(reference)
    decoded = decode.load(str(path), decode.Preprocess(draft=False))
    assert (decoded.width, decoded.height) == shown.size
    diff = np.abs(first_view(path) - first_view(reference)).mean()
    assert diff < 8, diff  # a wrong or double rotation swaps red and blue: ~170


def test_multi_image_heic_tags_its_primary_image(tmp_path, labels_file):
    folder = tmp_path / "burst"
    folder.mkdir()
    primary, other = shape_image(LABELS[0], seed=1), shape_image(LABELS[4], seed=2)
    data = io.BytesIO()
    other.save(data, "HEIF", save_all=True, append_images=[primary], primary_index=1)
    (folder / "burst.heic").write_bytes(data.getvalue())
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file)
    assert rows["burst.heic"]["top_labels"][0] == LABELS[0]


def test_heic_thumbnail_serves_as_draft_when_large_enough(tmp_path):
    path = tmp_path / "big.heic"
    path.write_bytes(heic(shape_image(LABELS[2], seed=3, size=(1600, 1200)), thumbnails=[320]))
    with decode.open_image(str(path)) as img:
        rgb, width, height = decode._pillow(img, decode.Preprocess())
    assert (width, height) == (1600, 1200) and rgb.size == (320, 240)  # the thumbnail
    with decode.open_image(str(path)) as img:
        rgb, _, _ = decode._pillow(img, decode.Preprocess(tiles="2x2"))
    assert rgb.size == (1600, 1200)  # tiles need more than the thumbnail: the full image
    a = first_view(path)
    b = decode.load(str(path), decode.Preprocess()).pixels[0].astype(int)
    assert np.abs(a - b).mean() < 6  # the draft's global view is the full decode's


@pytest.mark.parametrize("fmt", ["heic", pytest.param("avif", marks=needs_avif)])
def test_truncated_or_corrupt_phone_files_are_error_rows(tmp_path, fmt, labels_file):
    folder = tmp_path / "bad"
    folder.mkdir()
    data = (heic if fmt == "heic" else avif)(shape_image(LABELS[1], seed=5))
    (folder / f"half.{fmt}").write_bytes(data[: len(data) // 2])
    (folder / f"header.{fmt}").write_bytes(data[:40])
    (folder / f"noise.{fmt}").write_bytes(data[:12] + np.random.default_rng(0).bytes(3000))
    shape_image(LABELS[1], seed=5).save(folder / "good.jpg")
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file)
    assert rows["good.jpg"]["status"] == "ok"
    name = "HEIF" if fmt == "heic" else "AVIF"
    for bad in ("half", "header", "noise"):
        row = rows[f"{bad}.{fmt}"]
        assert row["status"] == "error", bad
        assert row["error"].startswith((f"truncated {name}", "corrupt image")), row["error"]


def test_new_formats_take_the_cpu_way_when_the_device_decodes_jpegs(tmp_path, phone_folder):
    folder, truth = phone_folder
    entries = list(discover([folder]))
    dataset = ImageDataset(entries, decode.Preprocess(), Split(0.0))  # every batch: device
    for i, entry in enumerate(entries):
        _, result = dataset.item(i, device=True)
        if entry.rel == "really_a_jpeg.heic":
            assert isinstance(result, decode.RawJpeg)  # a JPEG, whatever its name: nvJPEG's
        else:
            assert isinstance(result, decode.Decoded), entry.rel  # decoded by the CPU worker


def test_report_thumbnails_of_heic_and_avif(tmp_path, phone_folder):
    folder, truth = phone_folder
    for name in truth:
        uri = thumbnail(folder / name, 64)
        assert uri and uri.startswith("data:image/jpeg;base64,"), name


# ---- the allow-list ------------------------------------------------------------------------


def test_eps_named_jpg_is_an_error_row_and_never_reaches_the_eps_plugin(
    tmp_path, labels_file, monkeypatch
):
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "invoice.jpg").write_bytes(EPS)
    (folder / "binary_eps.jpg").write_bytes(b"\xc5\xd0\xd3\xc6" + bytes(60))
    shape_image(LABELS[3], seed=1).save(folder / "fine.png")
    touched = []

    def spy(self, *a, **k):
        touched.append(self)
        raise AssertionError("the EPS plugin was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", spy)
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file)
    assert rows["fine.png"]["top_labels"][0] == LABELS[3]
    assert rows["invoice.jpg"]["error"] == "unsupported format (PostScript)"
    assert rows["binary_eps.jpg"]["error"] == "unsupported format (PostScript)"
    assert thumbnail(folder / "invoice.jpg", 64) is None
    assert touched == []


def test_every_image_open_passes_the_allow_list(tmp_path, monkeypatch):
    """Decoding, the device path's header read and the report's thumbnails all restrict
    Pillow to FORMATS (a PostScript file that slipped past the sniffing still meets it)."""
    seen = []
    original = Image.open

    def spying(fp, mode="r", formats=None):
        seen.append(formats)
        return original(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spying)
    path = tmp_path / "a.jpg"
    shape_image(LABELS[0], seed=0).save(path)
    decode.load(str(path), decode.Preprocess())
    decode.read_jpeg(str(path), decode.Preprocess())
    thumbnail(path, 32)
    assert len(seen) == 3 and all(f and "EPS" not in f and set(f) <= set(decode.FORMATS)
                                  for f in seen)  # fmt: skip
    eps = tmp_path / "b.jpg"
    eps.write_bytes(b"\n" + EPS)  # no magic at the start: only the allow-list stops it
    with pytest.raises(DecodeError, match="not an image"):
        decode.load(str(eps), decode.Preprocess())
    assert "HEIF" in decode.allowed_formats()


def test_formats_pillow_could_open_but_omni_does_not_are_not_images(tmp_path):
    path = tmp_path / "icon.jpg"
    Image.new("RGB", (32, 32), "red").save(path, "ICO")
    with pytest.raises(DecodeError, match="not an image"):
        decode.load(str(path), decode.Preprocess())


# ---- camera RAW ------------------------------------------------------------------------------


def dng_folder(tmp_path) -> tuple:
    """DNGs: full-size preview, no preview, a preview too small, and a rotated one."""
    folder = tmp_path / "raw"
    folder.mkdir()
    shots = {
        "preview.dng": (LABELS[0], True, 1),
        "no_preview.dng": (LABELS[4], None, 1),
        "tiny_preview.dng": (LABELS[6], (80, 60), 1),
        "rotated.DNG": (LABELS[2], True, 6),
    }
    for name, (label, preview, orientation) in shots.items():
        img = shape_image(label, seed=len(name))
        stored = img.transpose(Image.Transpose.ROTATE_90) if orientation == 6 else img
        thumb = stored if preview is True else (stored.resize(preview) if preview else None)
        (folder / name).write_bytes(make_dng(stored, thumb, orientation))
    return folder, {name: label for name, (label, _, _) in shots.items()}


@needs_rawpy
def test_raw_preview_when_large_enough_else_demosaic(tmp_path):
    folder, _ = dng_folder(tmp_path)
    how = {}
    for name in ("preview.dng", "no_preview.dng", "tiny_preview.dng", "rotated.DNG"):
        rgb, width, height, how[name] = raw.load(str(folder / name), 10**9, lambda w, h: 0.9)
        assert (width, height) == (320, 240), name
        assert rgb.width / rgb.height == pytest.approx(320 / 240, rel=0.02), name
    assert how == {"preview.dng": "preview", "no_preview.dng": "demosaic",
                   "tiny_preview.dng": "demosaic", "rotated.DNG": "preview"}  # fmt: skip
    # tiles ask for more than the preview holds: demosaic (at full size, half is not enough)
    rgb, *_, kind = raw.load(str(folder / "preview.dng"), 10**9, lambda w, h: 1.5)
    assert kind == "demosaic"


@needs_rawpy
def test_raw_files_are_tagged_right_by_preview_and_by_demosaic(tmp_path, labels_file):
    folder, truth = dng_folder(tmp_path)
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file)
    for name, label in truth.items():
        assert rows[name]["status"] == "ok", rows[name]["error"]
        assert rows[name]["top_labels"][0] == label, name
        assert (rows[name]["width"], rows[name]["height"]) == (320, 240), name
    tiled = run(folder, tmp_path / "tiles.parquet", labels=labels_file,
                decode=DecodeConfig(tiles="2x2"))  # fmt: skip
    for name, label in truth.items():
        assert tiled[name]["views"] > 1 and tiled[name]["top_labels"][0] == label, name


@needs_rawpy
def test_rotated_raw_is_oriented_on_both_paths(tmp_path):
    shown = two_colours()
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # EXIF 6 turns it back
    reference = tmp_path / "shown.png"
    shown.save(reference)
    for preview in (stored, None):
        path = tmp_path / "r.dng"
        path.write_bytes(make_dng(stored, preview, orientation=6))
        decoded = decode.load(str(path), decode.Preprocess(draft=False))
        assert (decoded.width, decoded.height) == (320, 240)
        diff = np.abs(first_view(path) - first_view(reference)).mean()
        assert diff < 25, (preview is None, diff)  # demosaic colours differ a little; a turn: ~170


@needs_rawpy
def test_raw_by_content_a_dng_named_tif_and_a_jpeg_named_nef(tmp_path):
    img = shape_image(LABELS[5], seed=9)
    (tmp_path / "scan.tif").write_bytes(make_dng(img, None))
    img.save(tmp_path / "photo.nef", "JPEG")
    assert decode.load(str(tmp_path / "scan.tif"), decode.Preprocess()).width == 320
    assert decode.load(str(tmp_path / "photo.nef"), decode.Preprocess()).width == 320
    assert thumbnail(tmp_path / "scan.tif", 32) is None  # Pillow's TIFF cannot; only decoding
    (tmp_path / "p.dng").write_bytes(make_dng(img, img))
    assert thumbnail(tmp_path / "p.dng", 32).startswith("data:image/jpeg")


@needs_rawpy
def test_broken_raw_is_an_error_row(tmp_path, labels_file):
    folder = tmp_path / "raw"
    folder.mkdir()
    data = make_dng(shape_image(LABELS[1], seed=3), None)
    (folder / "cut.dng").write_bytes(data[: len(data) // 2])
    (folder / "fake.cr3").write_bytes(b"\0\0\0\x18ftypcrx " + bytes(100))
    (folder / "noise.raf").write_bytes(b"FUJIFILMCCD-RAW " + bytes(200))
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file)
    for name in ("cut.dng", "fake.cr3", "noise.raf"):
        assert rows[name]["status"] == "error", name
        assert "camera RAW" in rows[name]["error"], rows[name]["error"]


def test_without_rawpy_raw_files_name_the_extra(tmp_path, labels_file, monkeypatch):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.dng").write_bytes(make_dng(shape_image(LABELS[1], seed=3), None))
    (folder / "b.cr3").write_bytes(b"\0\0\0\x18ftypcrx " + bytes(100))
    shape_image(LABELS[1], seed=3).save(folder / "c.jpg")
    monkeypatch.setitem(sys.modules, "rawpy", None)  # `import rawpy` raises ImportError
    rows = run(folder, tmp_path / "t.parquet", labels=labels_file)
    assert rows["a.dng"]["error"] == "camera RAW needs: pip install 'omni-cli[raw]'"
    assert rows["b.cr3"]["error"] == "camera RAW needs: pip install 'omni-cli[raw]'"
    assert rows["c.jpg"]["status"] == "ok"


def test_search_image_query_reads_heic_and_refuses_postscript(tmp_path):
    from omni_cli.errors import UsageError
    from omni_cli.look.search import encode_query

    meta = {"model": str(MODEL), "precision": "fp32", "preprocess": "draft"}
    img = shape_image(LABELS[2], seed=11)
    (tmp_path / "q.heic").write_bytes(heic(img))
    img.save(tmp_path / "q.png")
    a, _ = encode_query(meta, text=None, image=tmp_path / "q.heic", device="cpu")
    b, _ = encode_query(meta, text=None, image=tmp_path / "q.png", device="cpu")
    assert float(a @ b / (a.norm() * b.norm())) > 0.99
    (tmp_path / "q.jpg").write_bytes(EPS)
    with pytest.raises(UsageError, match="unsupported format"):
        encode_query(meta, text=None, image=tmp_path / "q.jpg", device="cpu")
