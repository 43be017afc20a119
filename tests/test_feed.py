"""Device decoding and feeding, on the CPU: the decoder is a PIL-backed fake of nvJPEG.

What only CUDA does (nvJPEG itself, a real out-of-memory, probing) is in test_cuda.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
from omni_cli.inputs import decode, devdecode, tiling
from omni_cli.inputs.feed import Feeder, SplitControl, choose_decoder
from omni_cli.inputs.loader import Split, files_per_batch, make_loader
from omni_cli.inputs.sources import discover
from omni_cli.model.loading import load_encoder
from omni_cli.pipeline import tag
from omni_cli.tools.synthetic import draw

from .conftest import LABELS, MODEL, shape_image

CPU = torch.device("cpu")
SPEC = decode.Preprocess()


class FakeDecoder:
    """nvJPEG's contract on CPU tensors: a list of JPEG files in, (3, H, W) uint8 as stored out.

    Like nvJPEG it ignores EXIF orientation, and it refuses what it is told to refuse (a whole
    batch fails when one file in it does, as torchvision's batched call does).
    """

    def __init__(self, refuse: bytes | None = None):
        self.calls: list[int] = []
        self.refuse = refuse

    def __call__(self, files, device):
        self.calls.append(len(files))
        out = []
        for data in files:
            raw = data.numpy().tobytes()
            if self.refuse and self.refuse in raw:
                raise RuntimeError("nvjpeg: unsupported stream (injected)")
            img = Image.open(io.BytesIO(raw)).convert("RGB")
            out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(device))
        return out


def jpeg(path, img, **kw):
    img.save(path, quality=92, **kw)
    return str(path)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(tmp_path, orientation):
    img = draw("red triangle", (160, 96), rng=np.random.default_rng(orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = jpeg(tmp_path / "o.jpg", img, exif=exif.tobytes())
    raw = decode.read_jpeg(path, SPEC)
    stored = FakeDecoder()([torch.from_numpy(raw.data.copy())], CPU)[0]
    shown = devdecode.orient(stored, raw.orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert (raw.width, raw.height) == (want.shape[1], want.shape[0])
    assert np.array_equal(shown.permute(1, 2, 0).numpy(), want)


def test_only_plain_complete_jpegs_go_to_the_device(tmp_path):
    base = shape_image("blue circle", seed=1)
    assert decode.read_jpeg(jpeg(tmp_path / "ok.jpg", base), SPEC) is not None
    assert decode.read_jpeg(jpeg(tmp_path / "p.jpg", base, progressive=True), SPEC) is None
    assert decode.read_jpeg(jpeg(tmp_path / "c.jpg", base.convert("CMYK")), SPEC) is None
    assert decode.read_jpeg(jpeg(tmp_path / "g.jpg", base.convert("L")), SPEC) is None
    base.save(tmp_path / "x.png")
    assert decode.read_jpeg(str(tmp_path / "x.png"), SPEC) is None
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert decode.read_jpeg(str(tmp_path / "cut.jpg"), SPEC) is None
    capped = decode.Preprocess(max_pixels=100)
    assert decode.read_jpeg(str(tmp_path / "ok.jpg"), capped) is None


def test_device_views_agree_with_the_cpu_fast_path(tmp_path):
    """Same views (to a few grey levels) and the same top label as decode.load, tiles too."""
    enc = load_encoder(ModelConfig(model=str(MODEL), device="cpu", precision="fp32"))
    classifier = enc.encode_texts([f"a photo of a {label}." for label in LABELS]).T
    rng = np.random.default_rng(7)
    cases = [((320, 240), "off"), ((241, 333), "off"), ((1024, 768), "off"),
             ((1600, 1200), "auto"), ((700, 1500), "2x3")]  # fmt: skip
    agree = total = 0
    for i, (size, tiles) in enumerate(cases * 3):
        label = LABELS[i % len(LABELS)]
        path = jpeg(tmp_path / f"{i}.jpg", draw(label, size, rng=rng, shape_frac=0.4))
        spec = decode.Preprocess(tiles=tiles)
        cpu = torch.from_numpy(decode.load(path, spec).pixels)
        raw = decode.read_jpeg(path, spec)
        image = FakeDecoder()([torch.from_numpy(raw.data.copy())], CPU)[0]
        dev = devdecode.device_views([image], spec)[0]
        assert dev.shape == cpu.shape
        assert len(dev) == tiling.view_count(size[0], size[1], tiles, 0.5, 224)
        assert (dev.float() - cpu.float()).abs().mean() < 3.0  # grey levels, out of 255
        a, b = enc.encode_images(cpu) @ classifier, enc.encode_images(dev) @ classifier
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
    assert agree / total >= 0.995, (agree, total)


def zoo(folder):
    """Good JPEGs beside every kind the device path must hand back to the CPU."""
    folder.mkdir()
    for i, label in enumerate(LABELS):
        jpeg(folder / f"{i}_{label.replace(' ', '_')}.jpg", shape_image(label, seed=i))
    base = shape_image("green square", seed=42)
    jpeg(folder / "cmyk_green_square.jpg", base.convert("CMYK"))
    jpeg(folder / "progressive_green_square.jpg", base, progressive=True)
    base.save(folder / "png_green_square.png")
    good = (folder / "0_red_circle.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.jpg").write_text("not a JPEG")
    refused = shape_image("blue triangle", seed=9)
    jpeg(folder / "refused_blue_triangle.jpg", refused, comment=b"REFUSE-ME")
    return folder


def feed_all(folder, decoder, *, workers=0, views_per_forward=8, spec=SPEC):
    entries = list(discover([folder]))
    split = Split(0.0)
    loader = make_loader(entries, spec, files=4, workers=workers, split=split)
    feeder = Feeder(loader, spec, CPU, views_per_forward, decoder=decoder, split=split)
    return feeder, list(feeder)


def test_feeder_falls_back_per_file_and_keeps_error_rows(tmp_path):
    folder = zoo(tmp_path / "zoo")
    decoder = FakeDecoder(refuse=b"REFUSE-ME")
    feeder, groups = feed_all(folder, decoder)
    items = {it.entry.rel: it for fed in groups for it in fed.items}
    assert len(items) == len(LABELS) + 6  # every file once
    assert items["truncated.jpg"].error == "truncated JPEG"
    assert items["notes.jpg"].error == "not an image"
    ok = [rel for rel, it in items.items() if it.error is None]
    assert all(items[rel].views == 1 for rel in ok) and len(ok) == len(LABELS) + 4
    # The nine plain JPEGs and the refused one reach the device; the refusal fails its whole
    # batch call, which is retried file by file, and the refused file goes the CPU way.
    assert feeder.device_decoded == len(LABELS) and feeder.fallbacks == 1
    assert any(n > 1 for n in decoder.calls) and decoder.calls.count(1) >= 2
    for fed in groups:  # views line up with the items that have them, in order
        assert len(fed.pixels) == sum(it.views for it in fed.items if it.error is None)
        assert fed.pixels.dtype == torch.uint8 and fed.pixels.shape[1:] == (3, 224, 224)


def test_groups_hold_a_forward_of_views(tmp_path):
    folder = zoo(tmp_path / "zoo")
    _, groups = feed_all(folder, FakeDecoder(), views_per_forward=6)
    assert all(len(fed.pixels) >= 6 for fed in groups[:-1])


def config(tmp_path, folder, labels_file, name, **decode):
    return TagConfig(inputs=(folder,), labels_file=labels_file, output=tmp_path / name,
                     workers=0, model=ModelConfig(model=str(MODEL), device="cpu",
                                                  precision="fp32", batch=5),
                     decode=DecodeConfig(**decode))  # fmt: skip


def test_tag_with_a_device_decoder_matches_the_cpu_path(tmp_path, labels_file):
    folder = zoo(tmp_path / "zoo")
    cpu = tag(config(tmp_path, folder, labels_file, "cpu.parquet", decoder="cpu"))
    dev = tag(config(tmp_path, folder, labels_file, "dev.parquet", decoder="gpu"),
              jpeg_decoder=FakeDecoder(refuse=b"REFUSE-ME"))  # fmt: skip
    assert dev.device_decoded == len(LABELS) and cpu.device_decoded == 0
    a = {r["path"]: r for r in pq.read_table(cpu.output).to_pylist()}
    b = {r["path"]: r for r in pq.read_table(dev.output).to_pylist()}
    assert a.keys() == b.keys() and sorted(cpu.errors) == sorted(dev.errors)
    for path, row in a.items():
        assert (row["status"], row["error"], row["views"]) == (
            b[path]["status"], b[path]["error"], b[path]["views"])  # fmt: skip
        if row["status"] == "ok":
            assert row["top_labels"][0] == b[path]["top_labels"][0]
            assert np.abs(np.subtract(row["similarity"], b[path]["similarity"])).max() < 0.02


def test_views_of_one_file_may_span_two_forwards(tmp_path, labels_file):
    """Forwards of exactly --batch views: a tiled file split across forwards scores the same."""
    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i, label in enumerate(LABELS[:4]):
        draw(label, (1400, 700), rng=rng, shape_frac=0.3).save(folder / f"{i}.jpg")
    runs = {}
    for batch in (7, 64):
        cfg = config(tmp_path, folder, labels_file, f"b{batch}.parquet", tiles="auto")
        cfg = TagConfig(
            **{
                **cfg.__dict__,
                "model": ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=batch),
            }
        )
        runs[batch] = {r["path"]: r for r in pq.read_table(tag(cfg).output).to_pylist()}
    assert all(r["views"] > 7 for r in runs[7].values())
    for path, row in runs[7].items():
        np.testing.assert_allclose(row["similarity"], runs[64][path]["similarity"], atol=1e-5)


def test_split_is_exact_and_balances_the_two_decoders():
    split = Split(0.25)
    assert [split.cpu() for _ in range(8)].count(True) == 2
    control = SplitControl(Split(0.2), workers=4)

    def window(cpu_ms: float, device_ms: float) -> float:
        for _ in range(16):
            control.cpu(10, 10 * cpu_ms / 1000)  # a worker's batch of 10 CPU decodes
            control.device(10, 10 * device_ms / 1000)  # the feeder's 10 device decodes
            control.batch_seen()
        return control.split.share

    # 4 workers at 10 ms an image decode 400/s; the device path takes 2.5 ms an image: both
    # finish together when 50% go to the CPU. The share moves halfway there per window.
    assert window(10, 2.5) == pytest.approx(0.35)
    assert window(10, 2.5) == pytest.approx(0.425)
    for _ in range(10):
        share = window(10, 10)  # a slow device path: 80% to the CPU
    assert share == pytest.approx(0.8, abs=1e-3)
    split = Split(0.98)
    split.share += 0.5
    assert split.share == 1.0


def test_choosing_the_decoder():
    assert choose_decoder("auto", CPU, False) == (None, None, False)  # no CUDA: the CPU
    fake = FakeDecoder()
    decoder, split, adapt = choose_decoder("auto", CPU, False, fake)
    assert decoder is fake and split.share == 0.5 and adapt
    decoder, split, adapt = choose_decoder("gpu", CPU, False, fake)
    assert split.share == 0.0 and not adapt
    assert choose_decoder("auto", CPU, True, fake)[0] is None  # --exact stays on PIL
    with pytest.raises(Exception, match="--decode gpu needs a CUDA device"):
        choose_decoder("gpu", CPU, False)


def test_loader_batches_are_small_and_bounded_in_bytes():
    assert files_per_batch(512, SPEC, workers=15) == 16
    assert files_per_batch(32, decode.Preprocess(tiles="auto"), workers=15) == 1
    big = decode.Preprocess(tiles="4x4")
    per_file = 21 * 3 * 224 * 224
    assert files_per_batch(4096, big, workers=64) * per_file * 64 * 2 <= 1 << 30


def test_a_feeding_thread_gives_the_same_groups_and_passes_errors_on(tmp_path):
    entries = list(discover([zoo(tmp_path / "zoo")]))

    def feeder(decoder, thread):
        loader = make_loader(entries, SPEC, files=4, workers=0, split=Split(0.0))
        return Feeder(loader, SPEC, CPU, 8, decoder=decoder, split=Split(0.0), thread=thread)

    plain, threaded = list(feeder(FakeDecoder(), False)), list(feeder(FakeDecoder(), True))
    assert [[i.entry.rel for i in f.items] for f in plain] == [
        [i.entry.rel for i in f.items] for f in threaded]  # fmt: skip
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(plain, threaded, strict=True))

    def broken(files, device):
        raise KeyboardInterrupt  # anything the thread meets reaches the consumer

    with pytest.raises(KeyboardInterrupt):
        list(feeder(broken, True))


def test_hybrid_run_with_workers_tags_every_file_once(tmp_path, labels_file):
    folder = zoo(tmp_path / "zoo")
    cfg = config(tmp_path, folder, labels_file, "hybrid.parquet", decoder="auto")
    cfg = TagConfig(**{**cfg.__dict__, "workers": 2})
    result = tag(cfg, jpeg_decoder=FakeDecoder(refuse=b"REFUSE-ME"))
    rows = pq.read_table(result.output).to_pylist()
    assert len(rows) == len({r["path"] for r in rows}) == len(LABELS) + 6
    assert result.cpu_share is not None and 0.0 <= result.cpu_share <= 1.0
    assert {r["path"] for r in rows if r["status"] == "error"} == {"truncated.jpg", "notes.jpg"}


class FakeNvImage:
    """What nvImageCodec's `Image` offers that omni uses: DLPack export of an (H, W, 3) array."""

    def __init__(self, hwc: np.ndarray):
        self.hwc = hwc

    def __dlpack__(self, stream=None, **kwargs):
        return self.hwc.__dlpack__()

    def __dlpack_device__(self):
        return self.hwc.__dlpack_device__()


def fake_nvimgcodec(refuse: bytes = b"REFUSE-ME", oom_above: int | None = None, drop=False):
    """A PIL-backed stand-in for `nvidia.nvimgcodec` with its API: `Decoder.decode(list)` gives
    an image or None per file, in order (or, like releases before 0.x, drops failures: `drop`).
    It applies EXIF orientation unless told not to, as nvImageCodec does by default, and raises
    torch.OutOfMemoryError for a call of more than `oom_above` pixels."""
    import types

    module = types.ModuleType("nvidia.nvimgcodec")
    module.ColorSpec = types.SimpleNamespace(RGB="rgb", UNCHANGED="unchanged")
    module.calls = []  # (files, pixels, thread name) per call

    class DecodeParams:
        def __init__(self, apply_exif_orientation=True, color_spec="rgb", allow_any_depth=False):
            self.apply_exif_orientation, self.color_spec = apply_exif_orientation, color_spec

    class Decoder:
        def __init__(self, device_id=0, max_num_cpu_threads=0, backends=None, options=""):
            self.device_id = device_id

        def decode(self, srcs, params=None, cuda_stream=0):
            import threading

            single = not isinstance(srcs, list)
            srcs = [srcs] if single else srcs
            opened = []
            for arr in srcs:
                raw = np.asarray(arr, dtype=np.uint8).tobytes()
                try:
                    img = Image.open(io.BytesIO(raw))
                    img.load()
                except Exception:
                    img = None
                opened.append(None if img is None or refuse in raw else img)
            pixels = sum(img.width * img.height for img in opened if img is not None)
            module.calls.append((len(srcs), pixels, threading.current_thread().name))
            if oom_above is not None and pixels > oom_above:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            out = []
            for img in opened:
                if img is not None and (params is None or params.apply_exif_orientation):
                    img = ImageOps.exif_transpose(img)
                rgb = None if img is None else np.asarray(img.convert("RGB")).copy()
                out.append(None if rgb is None else FakeNvImage(rgb))
            if single:
                return out[0]
            return [o for o in out if o is not None] if drop else out

    module.DecodeParams, module.Decoder = DecodeParams, Decoder
    return module


@pytest.fixture
def nvimgcodec(monkeypatch):
    """Install a fake `nvidia.nvimgcodec`; returns a function that swaps in a configured one."""
    import sys
    import types

    def install(**kw):
        module = fake_nvimgcodec(**kw)
        package = types.ModuleType("nvidia")
        package.nvimgcodec = module
        monkeypatch.setitem(sys.modules, "nvidia", package)
        monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
        return module

    return install


@pytest.mark.parametrize("drop", [False, True])
def test_nvimgcodec_is_preferred_and_maps_rejections_to_none(tmp_path, nvimgcodec, drop):
    module = nvimgcodec(drop=drop)
    decoder = devdecode.device_decoder(CPU)
    assert decoder.name == "nvimgcodec" and decoder.releases_gil
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [jpeg(tmp_path / "a.jpg", shape_image("red circle", 1, (64, 48)), exif=exif),
             jpeg(tmp_path / "b.jpg", shape_image("blue square", 2), comment=b"REFUSE-ME"),
             None,
             jpeg(tmp_path / "d.jpg", shape_image("green triangle", 3, (40, 30)))]  # fmt: skip
    data = [b"not a JPEG" if f is None else Path(f).read_bytes() for f in files]
    out = decoder([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data], CPU)
    assert [None if o is None else tuple(o.shape) for o in out] == [
        (3, 48, 64), None, None, (3, 30, 40)]  # fmt: skip  # stored orientation: EXIF is omni's
    want = np.asarray(Image.open(files[3]).convert("RGB"))
    assert np.array_equal(out[3].permute(1, 2, 0).numpy(), want)
    assert module.calls[0][0] == 4  # one batched call for the group


def test_nvimgcodec_run_matches_the_cpu_path_on_a_decode_thread(tmp_path, labels_file, nvimgcodec):
    module = nvimgcodec()
    folder = zoo(tmp_path / "zoo")
    decoder, split, adapt = choose_decoder("gpu", CPU, False, devdecode.device_decoder(CPU))
    assert decoder.name == "nvimgcodec" and split.share == 0.0 and not adapt
    feeder, groups = feed_all(folder, decoder)
    assert feeder.threaded  # it releases the GIL: groups are made on the feeding thread
    assert {name for _, _, name in module.calls} == {"omni-feed"}
    plain = Feeder(make_loader(list(discover([folder])), SPEC, files=4, workers=0,
                               split=Split(0.0)), SPEC, CPU, 8, decoder=decoder,
                   split=Split(0.0), thread=False)  # fmt: skip
    assert [[i.entry.rel for i in f.items] for f in groups] == [
        [i.entry.rel for i in f.items] for f in plain]  # fmt: skip
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(groups, plain, strict=True))
    # the refused file comes back None, without failing its batch, and goes the CPU way
    assert feeder.device_decoded == len(LABELS) and feeder.fallbacks == 1
    cpu = tag(config(tmp_path, folder, labels_file, "cpu.parquet", decoder="cpu"))
    dev = tag(config(tmp_path, folder, labels_file, "dev.parquet", decoder="gpu"),
              jpeg_decoder=decoder)  # fmt: skip
    a = {r["path"]: r for r in pq.read_table(cpu.output).to_pylist()}
    b = {r["path"]: r for r in pq.read_table(dev.output).to_pylist()}
    assert dev.device_decoded == len(LABELS) and a.keys() == b.keys()
    for path, row in a.items():
        assert (row["status"], row["error"], row["views"], row["width"], row["height"]) == (
            b[path]["status"], b[path]["error"], b[path]["views"], b[path]["width"],
            b[path]["height"])  # fmt: skip
        if row["status"] == "ok":
            assert row["top_labels"][:1] == b[path]["top_labels"][:1]
            assert np.abs(np.subtract(row["similarity"], b[path]["similarity"])).max() < 0.02


def test_device_decode_groups_are_bounded_by_pixels_and_oom_makes_them_smaller(
    tmp_path, nvimgcodec
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(12):  # 320x240 = 76,800 pixels each
        jpeg(folder / f"{i:02d}.jpg", shape_image(LABELS[i % len(LABELS)], seed=i))
    jpeg(folder / "big.jpg", shape_image("red circle", seed=99, size=(800, 600)))  # 480,000
    small, limit = 320 * 240, 4 * 320 * 240  # the device holds 4 small files' pixels at once
    entries = list(discover([folder]))

    def run(decoder, decode_pixels):
        loader = make_loader(entries, SPEC, files=13, workers=0, split=Split(0.0))
        feeder = Feeder(loader, SPEC, CPU, 64, decoder=decoder, split=Split(0.0),
                        thread=False, decode_pixels=decode_pixels)  # fmt: skip
        return feeder, list(feeder)

    # A budget of 5 small files' pixels: groups of at most 5 files, the big one alone.
    module = nvimgcodec()
    feeder, groups = run(devdecode.device_decoder(CPU), 5 * small)
    assert len(groups) == 1 and feeder.decode_backoffs == 0 and feeder.device_decoded == 13
    assert all(pixels <= 5 * small or n == 1 for n, pixels, _ in module.calls)
    assert sorted(n for n, _, _ in module.calls) == [1, 2, 5, 5]  # 12 small + big, in order
    reference = {i.entry.rel: i for f in groups for i in f.items}
    ref_pixels = torch.cat([f.pixels for f in groups])

    # OOM above 4 files: the budget of 13 files fails, halves until groups fit; the big file
    # does not fit even alone and goes the CPU way. Nothing is lost, the run does not fail.
    module = nvimgcodec(oom_above=limit)
    feeder, groups = run(devdecode.device_decoder(CPU), 1 << 30)
    items = {i.entry.rel: i for f in groups for i in f.items}
    failed = [n for n, pixels, _ in module.calls if pixels > limit]
    assert feeder.decode_backoffs >= 1 and feeder.decode_pixels < 2 * limit
    assert len(failed) == feeder.decode_backoffs + 1 and failed[-1] == 1  # + the big file alone
    assert feeder.fallbacks == 1 and feeder.device_decoded == 12
    assert items.keys() == reference.keys() and all(i.error is None for i in items.values())
    assert all(items[k].views == reference[k].views == 1 for k in items)
    assert sum(n for n, pixels, _ in module.calls if pixels <= limit) == 12  # each once
    big = torch.from_numpy(decode.load(str(folder / "big.jpg"), SPEC).pixels)
    pixels = torch.cat([f.pixels for f in groups])
    order = [i.entry.rel for f in groups for i in f.items]
    assert torch.equal(pixels[order.index("big.jpg")], big[0])  # the CPU's views
    small_views = [k for k, rel in enumerate(order) if rel != "big.jpg"]
    assert torch.equal(pixels[small_views], ref_pixels[small_views])  # as without the OOM


def test_decode_gpu_pins_every_file_to_one_decoder(tmp_path, labels_file, nvimgcodec):
    """With workers racing, `--decode gpu` still sends each plain JPEG to the device and the rest
    to the CPU, decided by the file alone: two runs give the same rows."""
    nvimgcodec()
    folder = zoo(tmp_path / "zoo")
    runs = []
    for name in ("a.parquet", "b.parquet"):
        cfg = config(tmp_path, folder, labels_file, name, decoder="gpu")
        cfg = TagConfig(**{**cfg.__dict__, "workers": 2})
        result = tag(cfg, jpeg_decoder=devdecode.device_decoder(CPU))
        assert result.device_decoded == len(LABELS) and result.cpu_share is None
        runs.append({r["path"]: r for r in pq.read_table(result.output).to_pylist()})
    for path, row in runs[0].items():
        # the same pixels; forwards may group files differently, so allow float rounding
        assert row["similarity"] == pytest.approx(runs[1][path]["similarity"], abs=1e-5), path
        assert row["status"] == runs[1][path]["status"] and row["error"] == runs[1][path]["error"]
