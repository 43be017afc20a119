"""Search benchmark: how fast does `omni search` answer over a million stored embeddings?

Writes a synthetic `omni tag --save-embeddings` output of N images (random unit vectors, stored
as float16 like `tag` stores them), as one Parquet file or as a folder of part files (the
archive layout), then runs what `omni search` runs apart from encoding the query (open the
output, bring the index in step, rank), each time in a fresh process that reports its wall time
and peak RSS:

  first query    no index yet: every embedding is decoded once into the index
  repeat query   the index is in step: nothing is decoded
  one part new   (folder output) one part rewritten: only its segment is rebuilt

It also times the product over the memory-mapped index in this process (the per-query work),
and the alternative that the choice in index.py was made against.

    python benchmarks/search_scale.py                      # 1,000,000 images, dim 512, one file
    python benchmarks/search_scale.py --parts 16           # the same as a folder of 16 parts
    python benchmarks/search_scale.py --images 100000 --views 11 --dim 768
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from omni_cli.look.search import load_index, rank  # noqa: E402

META = {"labels": ["x"], "model": "synthetic", "precision": "bf16", "tiles": "off"}
SCHEMA = pa.schema(
    [
        ("root", pa.string()),
        ("path", pa.string()),
        ("views", pa.int16()),
        ("embedding", pa.list_(pa.float16())),
    ]
)


def write_part(path: Path, first: int, images: int, views: int, dim: int, seed: int,
               meta: bool) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    schema = SCHEMA.with_metadata({b"omni": json.dumps(META)}) if meta else SCHEMA
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(first, first + images, 65_536):
            n = min(65_536, first + images - start)
            emb = rng.standard_normal((n * views, dim), dtype=np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            values = pa.array(emb.astype(np.float16).reshape(-1))
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * views * dim)
            batch = pa.record_batch(
                [
                    pa.array(["/archive"] * n),
                    pa.array([f"{i // 1000:04d}/{i:07d}.jpg" for i in range(start, start + n)]),
                    pa.array(np.full(n, views, np.int16)),
                    pa.ListArray.from_arrays(offsets, values),
                ],
                schema=schema,
            )
            writer.write_batch(batch)


def synthesise(base: Path, images: int, views: int, dim: int, parts: int) -> Path:
    """One file (parts == 1) or a folder of part files with _omni.json, like the archive layout."""
    if parts == 1:
        path = base / "tags.parquet"
        write_part(path, 0, images, views, dim, seed=0, meta=True)
        return path
    folder = base / "tags"
    folder.mkdir()
    (folder / "_omni.json").write_text(json.dumps(META))
    bounds = np.linspace(0, images, parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        write_part(folder / f"part-{i:05d}.parquet", a, b - a, views, dim, seed=i, meta=False)
    return folder


# What `omni search` does apart from encoding the query, in a fresh process that prints its
# wall time, peak RSS (VmHWM, kB: it starts afresh at exec), segments rebuilt and the index size.
RUN = """
import sys, time, json
import numpy as np, torch
from omni_cli.look.search import load_index, rank
start = time.perf_counter()
index = load_index(sys.argv[1])
query = torch.nn.functional.normalize(torch.randn(index.dim), dim=0)
hits = rank(index, query, 20)
seconds = time.perf_counter() - start
status = open("/proc/self/status").read()
print(json.dumps({"seconds": seconds, "rss_kb": int(status.split("VmHWM:")[1].split()[0]),
                  "rebuilt": index.rebuilt, "segments": len(index.segments),
                  "bytes": index.nbytes, "hits": len(hits)}))
"""


def fresh(path: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", RUN, str(path)], check=True,
                           capture_output=True, text=True)  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--views", type=int, default=1, help="views per image (tiles: > 1)")
    parser.add_argument("--dim", type=int, default=512, help="512 ViT-B/32, 768 ViT-L/14")
    parser.add_argument("--parts", type=int, default=1, help="1: one file; N: a folder of N")
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {describe()}; {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = synthesise(Path(tmp), args.images, args.views, args.dim, args.parts)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
        shape = "one file" if args.parts == 1 else f"a folder of {args.parts} parts"
        print(f"{args.images:,} images x {args.views} views x dim {args.dim} as {shape}: "
              f"{size / 1e9:.2f} GB written in {time.perf_counter() - start:.1f} s")  # fmt: skip
        runs = [("first query (builds the index)", fresh(path))]
        runs.append(("repeat query (index in step)", fresh(path)))
        if args.parts > 1:
            last = path / f"part-{args.parts - 1:05d}.parquet"
            first = args.images - args.images // args.parts
            write_part(last.with_suffix(".tmp"), first, args.images // args.parts, args.views,
                       args.dim, seed=99, meta=False)  # fmt: skip
            os.replace(last.with_suffix(".tmp"), last)
            runs.append(("one part rewritten", fresh(path)))
        print("fresh process each: open the output, bring the index in step, rank (no model)")
        for name, r in runs:
            print(f"  {name:<32} {r['seconds']:6.2f} s   peak RSS {r['rss_kb'] / 1024:5.0f} MiB"
                  f"   {r['rebuilt']}/{r['segments']} segments built, "
                  f"index {r['bytes'] / 2**30:.2f} GiB")  # fmt: skip

        index = load_index(path)
        query = torch.nn.functional.normalize(torch.randn(args.dim), dim=0)
        hits = rank(index, query, args.k)
        assert len(hits) == args.k and hits[0].score >= hits[-1].score
        seconds = timed(lambda: rank(index, query, args.k), args.repeat)
        print(f"rank in a warm process (product, best view, top-k, rows): "
              f"{seconds * 1e3:.0f} ms, median of {args.repeat}")  # fmt: skip
        q32 = query.numpy()

        def numpy_chunks(chunk: int = 65_536) -> None:  # numpy has no float16 matmul kernel
            for s in index.segments:
                for i in range(0, len(s.matrix), chunk):
                    s.matrix[i : i + chunk].astype(np.float32) @ q32

        print(f"the same product in numpy (float16 -> float32 chunks, matmul): "
              f"{timed(numpy_chunks, args.repeat) * 1e3:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
