"""What only CUDA does: nvJPEG decoding, a real out-of-memory, `--batch auto` probing.

Skipped without a CUDA GPU (and the nvJPEG test without a torchvision that loads beside this
PyTorch). `benchmarks/gpu_check.sh` runs these on a GPU machine; test_feed.py covers the same
code on the CPU with a fake decoder.
"""

from __future__ import annotations

import contextlib
import gc

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
from omni_cli.inputs.devdecode import BACKENDS, device_decoder
from omni_cli.model.loading import load_encoder
from omni_cli.pipeline import tag
from omni_cli.tools.synthetic import draw

from .conftest import LABELS, MODEL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GIB = 1 << 30
SKIP = pytest.mark.skip(reason="no runtime besides eager on this GPU")


@contextlib.contextmanager
def memory_cap(limit: int):
    """Let this process's CUDA allocator hold at most `limit` bytes: a real OOM beyond it."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit / total)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def photos(folder, n=240):
    """JPEGs of the fixture's shapes at assorted sizes and EXIF orientations, plus odd ones."""
    folder.mkdir()
    rng = np.random.default_rng(11)
    sizes = [(640, 480), (1920, 1080), (333, 517), (1024, 1024), (1280, 720)]
    truth = {}
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        img = draw(label, sizes[i % len(sizes)], rng=rng, shape_frac=float(rng.uniform(0.3, 0.6)))
        exif = Image.Exif()
        exif[0x0112] = 1 + i % 8
        name = f"{i:04d}.jpg"
        img.save(folder / name, quality=90, exif=exif.tobytes())
        truth[name] = label
    odd = draw("green square", (800, 600), rng=rng, shape_frac=0.5)
    odd.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    odd.save(folder / "progressive.jpg", quality=90, progressive=True)
    good = (folder / "0000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return truth


def best(row) -> str:
    """The label of a row's highest similarity."""
    return LABELS[max(range(len(LABELS)), key=lambda i: row["similarity"][i])]


def run(tmp_path, folder, labels_file, name, jpeg_decoder=None, **decode):
    cfg = TagConfig(inputs=(folder,), labels_file=labels_file, output=tmp_path / name,
                    model=ModelConfig(model=str(MODEL), device="cuda", precision="fp32",
                                      batch=64),
                    decode=DecodeConfig(**decode), workers=4)  # fmt: skip
    result = tag(cfg, jpeg_decoder=jpeg_decoder)
    return result, {r["path"]: r for r in pq.read_table(result.output).to_pylist()}


CUDA = torch.device("cuda") if torch.cuda.is_available() else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_decoders_agree_with_the_cpu_path(tmp_path, labels_file, backend):
    """Each installed GPU JPEG decoder: top-1 agreement with the CPU path >= 99.5%."""
    decoder = device_decoder(CUDA, backend) if CUDA else None
    if decoder is None:
        pytest.skip(f"{backend} cannot decode JPEGs on this GPU here")
    truth = photos(tmp_path / "photos")
    cpu, a = run(tmp_path, tmp_path / "photos", labels_file, "cpu.parquet", decoder="cpu")
    gpu, b = run(tmp_path, tmp_path / "photos", labels_file, "gpu.parquet", decoder="gpu",
                 jpeg_decoder=decoder)  # fmt: skip
    assert gpu.device_decoded >= len(truth) - 1 and cpu.device_decoded == 0
    assert a.keys() == b.keys() and len(a) == len(truth) + 3
    assert b["truncated.jpg"]["error"] == a["truncated.jpg"]["error"] == "truncated JPEG"
    for name in ("cmyk.jpg", "progressive.jpg"):  # handed back to the CPU, tagged
        assert b[name]["status"] == "ok" and best(b[name]) == "green square"
    same = sum(best(a[p]) == best(b[p]) for p in truth)
    assert same / len(truth) >= 0.995, same
    assert sum(best(b[p]) == label for p, label in truth.items()) / len(truth) >= 0.8
    assert all((a[p]["width"], a[p]["height"]) == (b[p]["width"], b[p]["height"]) for p in a)
    hybrid, c = run(tmp_path, tmp_path / "photos", labels_file, "hybrid.parquet", decoder="auto",
                    jpeg_decoder=decoder)  # fmt: skip
    assert c.keys() == a.keys() and hybrid.cpu_share is not None
    assert sum(best(a[p]) == best(c[p]) for p in truth) / len(truth) >= 0.995  # README's figure
    # --decode gpu pins where each file is decoded: a second run gives the same rows
    _, d = run(tmp_path, tmp_path / "photos", labels_file, "gpu2.parquet", decoder="gpu",
               jpeg_decoder=decoder)  # fmt: skip
    assert all(best(b[p]) == best(d[p]) for p in a)
    assert max(abs(x - y) for p in truth for x, y in zip(b[p]["similarity"], d[p]["similarity"],
                                                          strict=True)) < 1e-4  # fmt: skip


def test_a_real_out_of_memory_backs_off_and_keeps_every_view():
    enc = load_encoder(ModelConfig(model="random:vit-b-32", device="cuda", precision="fp32",
                                   batch=4096))  # fmt: skip
    pixels = torch.randint(0, 256, (600, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        reference = torch.cat([enc.forward(pixels[i : i + 32]) for i in range(0, 600, 32)])
    held = torch.cuda.memory_allocated()
    with memory_cap(held + GIB // 2):  # 600 fp32 views need ~1.5 GiB of activations
        got = enc.encode_images(pixels)
    assert enc.batch < 4096
    assert got.shape == reference.shape  # every view once, in order
    assert (got * reference).sum(-1).min() > 0.9999  # cosine: the same embeddings


def test_batch_auto_probes_what_fits():
    free = load_encoder(ModelConfig(model="random:vit-b-32", device="cuda", precision="fp32"))
    assert free.batch == 512
    held = torch.cuda.memory_allocated()
    del free
    gc.collect()
    with memory_cap(held + GIB // 2):
        enc = load_encoder(ModelConfig(model="random:vit-b-32", device="cuda", precision="fp32"))
        assert enc.batch < 512 and enc.batch & (enc.batch - 1) == 0
        with torch.inference_mode():  # and it fits
            enc.forward(torch.zeros(enc.batch, 3, 224, 224, dtype=torch.uint8))


def _cuda_runtimes() -> list[str]:
    from omni_cli.model.runtimes import installed

    return [r for r in installed(CUDA) if r != "eager"] if CUDA else []


@pytest.mark.parametrize("runtime", _cuda_runtimes() or [pytest.param("compile", marks=SKIP)])
def test_cuda_runtimes_agree_with_eager(runtime):
    """torch.compile (and TensorRT / ONNX Runtime where installed) on CUDA, bf16: within the
    fast path's tolerance of eager, the same top labels (as tests/test_runtimes.py on the CPU)."""
    from .test_runtimes import views

    sims = {}
    for name in ("eager", runtime):
        enc = load_encoder(ModelConfig(model=str(MODEL), device="cuda", precision="bf16",
                                       batch=8, runtime=name))  # fmt: skip
        texts = enc.encode_texts([f"a photo of a {label}." for label in LABELS])
        sims[name] = (enc.encode_images(views()) @ texts.T).float().cpu()
    assert (sims[runtime] - sims["eager"]).abs().max() < 0.02
    assert torch.equal(sims[runtime].argmax(-1), sims["eager"].argmax(-1))
