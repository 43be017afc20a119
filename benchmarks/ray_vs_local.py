"""Local engine vs Ray engine: wall time of `omni tag` on the same folder, on this machine.

Synthesises N 640x480 JPEGs (default 300) and tags them with the fixture model
tests/fixtures/tiny-clip on the CPU at fp32, alternating the engines for R rounds (default 2),
each run in a fresh process with a fresh output (`--full`, no resume). Prints per run the wall
time of the `tag` call (for Ray: starting a local cluster, the setup task that loads the model,
the actor pool, the dataset and shutting down) and the tagging phase alone (`TagResult.seconds`),
then the best of each engine and their ratio.

    python benchmarks/ray_vs_local.py [--images 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from omni_cli.tools.synthetic import LABELS, draw  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-clip"
DRIVER = """
import json, sys, time
from pathlib import Path
from omni_cli.config import ModelConfig, TagConfig
engine, folder, labels, out, model = sys.argv[1:6]
cfg = TagConfig(inputs=(Path(folder),), labels_file=Path(labels), output=Path(out),
                model=ModelConfig(model=model, device="cpu", precision="fp32"),
                resume=False, full=True)
if engine == "ray":
    from omni_cli.ray_engine import tag_ray as run
else:
    from omni_cli.pipeline import tag as run
started = time.perf_counter()
r = run(cfg, None)
wall = time.perf_counter() - started
print(json.dumps({"tagged": r.tagged, "seconds": r.seconds, "wall": wall}))
"""


def run(engine: str, folder: Path, labels: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", DRIVER, engine, str(folder), str(labels), str(out), str(FIXTURE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        folder, labels = Path(tmp) / "photos", Path(tmp) / "labels.txt"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            img = draw(LABELS[i % len(LABELS)], (640, 480), rng=rng)
            img.save(folder / f"img{i:04d}.jpg", quality=90)
        labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for engine in ("local", "ray"):
                r = run(engine, folder, labels, Path(tmp) / f"{engine}.parquet")
                print(
                    f"round {round_ + 1} {engine:5}: {r['tagged']} images, wall {r['wall']:6.2f} s,"
                    f" tagging {r['seconds']:6.2f} s ({r['tagged'] / r['seconds']:6.1f} images/s)"
                )
                if engine not in best or r["wall"] < best[engine]["wall"]:
                    best[engine] = r
    local, ray = best["local"], best["ray"]
    print(
        f"best: local {local['wall']:.2f} s wall ({local['seconds']:.2f} s tagging), "
        f"ray {ray['wall']:.2f} s wall ({ray['seconds']:.2f} s tagging): "
        f"Ray takes {ray['wall'] / local['wall']:.1f}x the wall time, "
        f"{ray['seconds'] / local['seconds']:.1f}x the tagging time"
    )


if __name__ == "__main__":
    main()
