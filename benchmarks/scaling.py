"""Scaling on the CPU: 1x, 4x and 16x the images through `omni tag`; time linear, memory flat.

Each size runs `omni_cli.pipeline.tag` in a fresh process (the fixture model
tests/fixtures/tiny-clip, synthetic 640x480 JPEGs, default workers) while this script samples
the resident memory of that process and of its decode workers. Prints the tagging time (model
loading and interpreter start excluded), its ratio to the 1x run against the ideal 4 and 16, and
peak RSS of the main process and of all processes, with the 16x/1x ratio (target: within 10%).
1x is 200 images by default: RSS climbs over the first ~300 images of a run (allocator and
decoder caches warming up, measured: 480 -> 740 MB, then flat to 800 images), so a smaller 1x
compares a cold run with a warm one rather than a small folder with a large one.

    python benchmarks/scaling.py [--base 200] [--model tests/fixtures/tiny-clip]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from omni_cli.tools.bench import machine_info
from omni_cli.tools.synthetic import LABELS, draw

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-clip"
DRIVER = """
import json, sys
from pathlib import Path
from omni_cli.config import ModelConfig, TagConfig
from omni_cli.pipeline import tag
folder, labels, out, model = sys.argv[1:5]
cfg = TagConfig(inputs=(Path(folder),), labels_file=Path(labels), output=Path(out),
                model=ModelConfig(model=model, device="cpu"), resume=False, full=True)
r = tag(cfg)
print(json.dumps({"tagged": r.tagged, "seconds": r.seconds}))
"""


def run(folder: Path, labels: Path, out: Path, model: str) -> dict:
    cmd = [sys.executable, "-c", DRIVER, str(folder), str(labels), str(out), model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    me, main_peak, total_peak = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            rss = me.memory_info().rss
            kids = sum(c.memory_info().rss for c in me.children(recursive=True))
        except psutil.Error:
            break
        main_peak, total_peak = max(main_peak, rss), max(total_peak, rss + kids)
        time.sleep(0.01)
    stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"tag failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return dict(result, main_rss=main_peak, total_rss=total_peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=200)
    ap.add_argument("--model", default=str(FIXTURE))
    args = ap.parse_args()
    m = machine_info()
    print(f"machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}; model {args.model}")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="omni-scaling-") as tmp:
        labels = Path(tmp) / "labels.txt"
        labels.write_text("\n".join(LABELS) + "\n")
        folder = Path(tmp) / "images"
        folder.mkdir()
        count = 0
        for factor in (1, 4, 16):
            while count < factor * args.base:  # each size is a superset of the last
                label = LABELS[count % len(LABELS)]
                draw(label, (640, 480), rng=rng, background="textured").save(
                    folder / f"{count:06d}.jpg", quality=90
                )
                count += 1
            res = run(folder, labels, Path(tmp) / f"out{factor}.parquet", args.model)
            rows.append((factor, res))
    base = rows[0][1]
    print(f"{'images':>7} {'seconds':>8} {'ratio':>7} {'ideal':>5} {'images/s':>9} "
          f"{'main RSS':>9} {'all RSS':>9}")  # fmt: skip
    for factor, r in rows:
        print(f"{r['tagged']:>7} {r['seconds']:>8.2f} {r['seconds'] / base['seconds']:>7.2f} "
              f"{factor:>5} {r['tagged'] / r['seconds']:>9.1f} {r['main_rss'] / 2**20:>7.0f}MB "
              f"{r['total_rss'] / 2**20:>7.0f}MB")  # fmt: skip
    last = rows[-1][1]
    for key, name in (("main_rss", "main process"), ("total_rss", "main + workers")):
        ratio = last[key] / base[key]
        verdict = "ok" if ratio <= 1.10 else "SHORT"
        print(f"peak RSS at 16x / 1x, {name}: {ratio:.3f} (target <= 1.10) {verdict}")


if __name__ == "__main__":
    main()
