"""Cron benchmark: how long does a nightly rerun take when nothing (or little) changed?

Writes N small JPEGs, tags them once with the fixture model and a labels file of L labels
(the 9 the fixture knows, then made-up ones), then times whole `omni tag` commands, each a
fresh process as cron starts it: a rerun with nothing changed (it imports neither torch nor
transformers, loads no model and leaves the output byte-identical) and a rerun after 1% of the
files changed (it tags those and copies the other rows as Arrow data). Prints each command's
wall time and its ratio to the first run.

    python benchmarks/incremental.py                      # 10,000 images, 1,000 labels
    python benchmarks/incremental.py --n 2000 --labels 9
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe  # noqa: E402

from omni_cli import synthetic  # noqa: E402

MODEL = Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip"


def write(args: tuple[str, int, int]) -> int:
    folder, start, n = Path(args[0]), args[1], args[2]
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        label = synthetic.LABELS[i % len(synthetic.LABELS)]
        sub = folder / f"{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        synthetic.draw(label, (160, 120), rng=rng).save(sub / f"{i:06d}.jpg", quality=85)
    return n


def command(folder: Path, labels: Path, out: Path) -> tuple[float, str]:
    """One whole `omni tag` in a fresh process: (seconds, its summary line)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "omni_cli", "tag", str(folder), "-l",
                           str(labels), "-o", str(out), "--model", str(MODEL)],
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):
        raise SystemExit(done.stderr)
    return seconds, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--labels", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "archive", Path(tmp) / "tags.parquet"
        per = 1000
        with ProcessPoolExecutor() as pool:
            jobs = [(str(folder), s, min(per, args.n - s)) for s in range(0, args.n, per)]
            assert sum(pool.map(write, jobs)) == args.n
        labels = Path(tmp) / "labels.txt"
        names = list(synthetic.LABELS) + [f"thing {i}" for i in range(args.labels)]
        labels.write_text("\n".join(names[: args.labels]) + "\n")
        print(f"{args.n:,} JPEGs of 160x120, {args.labels:,} labels, fixture model, CPU")
        t_first, line = command(folder, labels, out)
        print(f"first run:          {t_first:7.2f} s   {line}")
        before = (out.read_bytes(), out.stat().st_mtime_ns)
        t_same, line = command(folder, labels, out)
        same = (out.read_bytes(), out.stat().st_mtime_ns) == before
        print(f"nothing changed:    {t_same:7.2f} s = {t_same / t_first:.1%} of the first run; "
              f"output byte-identical and untouched: {same}   {line}")  # fmt: skip
        changed = args.n // 100
        for path in sorted(folder.rglob("*.jpg"))[:changed]:  # 1%: rewritten, new mtimes
            path.write_bytes(path.read_bytes())
        t_more, line = command(folder, labels, out)
        print(f"1% of files changed: {t_more:6.2f} s = {t_more / t_first:.1%} of the first run"
              f"   {line}")  # fmt: skip


if __name__ == "__main__":
    main()
