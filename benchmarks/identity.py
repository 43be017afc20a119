"""What a model's identity costs: hashing a local folder's weights once, then the nightly check.

Writes a model folder whose `model.safetensors` is N MB of random bytes (identity.py hashes
bytes; it does not parse them) and times `identity.identity` three ways: the first call (reads
and hashes the weights), the next one (stat + the cached hash), and a hub-cache snapshot of
the same files (the blob's name is its sha256: nothing is read).

    python benchmarks/identity.py --mb 256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from omni_cli.model import identity

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-clip"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the weights file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OMNI_CACHE_DIR"] = str(Path(tmp) / "cache")
        folder = Path(tmp) / "model"
        shutil.copytree(FIXTURE, folder)
        weights = folder / "model.safetensors"
        digest = hashlib.sha256()
        with open(weights, "wb") as f:
            for _ in range(args.mb):
                block = os.urandom(1 << 20)
                digest.update(block)
                f.write(block)
        blobs, snap = Path(tmp) / "hub" / "blobs", Path(tmp) / "hub" / "snapshots" / "c1"
        blobs.mkdir(parents=True)
        snap.mkdir(parents=True)
        os.link(weights, blobs / digest.hexdigest())
        for p in folder.iterdir():
            target = blobs / digest.hexdigest() if p == weights else p
            (snap / p.name).symlink_to(target)
        first = timed(lambda: identity.identity(folder))
        again = min(timed(lambda: identity.identity(folder)) for _ in range(5))
        hub = min(timed(lambda: identity.identity(snap)) for _ in range(5))
        assert identity.identity(folder) == identity.identity(snap)
    print(f"{args.mb} MB weights: first identity {first:.2f} s ({args.mb / first:.0f} MB/s), "
          f"cached {again * 1000:.1f} ms, hub snapshot {hub * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
