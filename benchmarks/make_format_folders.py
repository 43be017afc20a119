"""Folders of the same synthetic 1080p photos as JPEG, HEIC and AVIF, to time their decoding.

    python benchmarks/make_format_folders.py /tmp/fmt --n 48
    for f in jpeg heic avif; do
        omni bench --images /tmp/fmt/$f --stages decode --workers 0 --repeat 3 --device cpu
    done

Each image is a shape on a textured background (`synthetic.draw`: the noise makes the codecs
work as on photos); JPEG at quality 90, HEIC and AVIF at quality 80.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from omni_cli.inputs import decode  # noqa: F401  (registers the HEIF plugin)
from omni_cli.tools import synthetic

FORMATS = {"jpeg": ("jpg", "JPEG", 90), "heic": ("heic", "HEIF", 80), "avif": ("avif", "AVIF", 80)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--size", default="1920x1080")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    for i in range(args.n):
        label = synthetic.LABELS[i % len(synthetic.LABELS)]
        img = synthetic.draw(label, (width, height), rng=rng, background="textured")
        for folder, (ext, fmt, quality) in FORMATS.items():
            path = args.out / folder / f"{i:04d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, fmt, quality=quality)
    for folder in FORMATS:
        files = list((args.out / folder).iterdir())
        size = sum(f.stat().st_size for f in files) / len(files)
        print(f"{folder}: {len(files)} files, {size / 1000:.0f} KB each")


if __name__ == "__main__":
    main()
