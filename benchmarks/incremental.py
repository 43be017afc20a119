"""Cron benchmark: how long does a nightly rerun take when nothing (or little) changed?

Writes N small JPEGs, tags them once with the fixture model, then reruns with nothing changed
and again after adding 1% new files, and prints each run's wall time and its ratio to the first.
The unchanged rerun opens no image: its cost is listing the folder and copying rows.

    python benchmarks/incremental.py            # 2,000 images
    python benchmarks/incremental.py --n 500
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from omni_cli import synthetic  # noqa: E402
from omni_cli.config import ModelConfig, TagConfig  # noqa: E402
from omni_cli.pipeline import tag  # noqa: E402

MODEL = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip"


def write(folder: Path, start: int, n: int) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        label = synthetic.LABELS[i % len(synthetic.LABELS)]
        img = synthetic.draw(label, (320, 240), rng=rng)
        img.save(folder / f"{i // 500:03d}" / f"{i:06d}.jpg", quality=85)


def timed(cfg: TagConfig):
    start = time.perf_counter()
    result = tag(cfg)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "archive", Path(tmp) / "tags.parquet"
        for i in range(0, args.n + args.n // 100 + 500, 500):
            (folder / f"{i // 500:03d}").mkdir(parents=True, exist_ok=True)
        write(folder, 0, args.n)
        labels = Path(tmp) / "labels.txt"
        labels.write_text("\n".join(synthetic.LABELS))
        cfg = TagConfig(
            inputs=(folder,),
            labels_file=labels,
            output=out,
            model=ModelConfig(model=str(MODEL), device="cpu"),
        )
        first, t_first = timed(cfg)
        print(f"first run:        {first.files:>6,} files, {first.tagged:>6,} tagged, "
              f"{t_first:7.2f} s")  # fmt: skip
        same, t_same = timed(cfg)
        print(f"nothing changed:  {same.files:>6,} files, {same.tagged:>6,} tagged, "
              f"{t_same:7.2f} s = {t_same / t_first:.1%} of the first run")  # fmt: skip
        write(folder, args.n, args.n // 100)
        more, t_more = timed(cfg)
        print(f"1% new files:     {more.files:>6,} files, {more.tagged:>6,} tagged, "
              f"{t_more:7.2f} s = {t_more / t_first:.1%} of the first run")  # fmt: skip


if __name__ == "__main__":
    main()
