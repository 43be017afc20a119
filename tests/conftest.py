"""Shared fixtures: the tiny trained CLIP, a labels file, and sample images it recognises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_cli.tools import synthetic

MODEL = Path(__file__).parent / "fixtures" / "tiny-clip"
LABELS = synthetic.LABELS


def omni_tag(*args):
    """`omni tag ARGS...` through Typer's CliRunner; arguments may be paths or numbers."""
    from typer.testing import CliRunner

    from omni_cli.cli import app

    return CliRunner().invoke(app, ["tag", *map(str, args)])


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the label-embedding cache out of the user's home."""
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def labels_file(tmp_path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return path


def shape_image(label: str, seed: int, size=(320, 240)) -> Image.Image:
    """A frame-filling `label` on a light background."""
    return synthetic.draw(
        label, size, rng=np.random.default_rng(seed), shape_frac=0.45, center=(0.5, 0.5)
    )


@pytest.fixture
def images(tmp_path) -> dict[str, str]:
    """One image per label, in every supported format; returns relative path -> true label."""
    folder = tmp_path / "photos"
    folder.mkdir()
    truth = {}
    formats = ["jpg", "png", "webp", "gif", "tiff", "bmp", "jpg", "png", "webp"]
    for i, (label, ext) in enumerate(zip(LABELS, formats, strict=True)):
        name = f"{label.replace(' ', '_')}.{ext}"
        img = shape_image(label, seed=i)
        if ext == "gif":
            img = img.quantize(colors=64)
        img.save(folder / name)
        truth[name] = label
    return truth
