"""Search benchmark: how fast does `omni search` answer over a million stored embeddings?

Writes a synthetic `omni tag --save-embeddings` output of N images (random unit vectors, stored
as float16 like `tag` stores them), then times `search.load_index` (reading the column into one
float16 matrix) and `search.rank` for a query (the part that runs per query; encoding the query
itself is one text through the text encoder). It also times the alternatives for the product,
so the choice in search.py stays a measured one.

    python benchmarks/search_scale.py                        # 1,000,000 images, dim 512
    python benchmarks/search_scale.py --images 100000 --views 11 --dim 768
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def synthesise(path: Path, images: int, views: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    meta = {"labels": ["x"], "model": "synthetic", "precision": "bf16", "tiles": "off"}
    schema = pa.schema(
        [
            ("root", pa.string()),
            ("path", pa.string()),
            ("views", pa.int16()),
            ("embedding", pa.list_(pa.float16())),
        ],
        metadata={b"omni": json.dumps(meta)},
    )
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, images, 65_536):
            n = min(65_536, images - start)
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
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {describe()}; {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tags.parquet"
        start = time.perf_counter()
        synthesise(path, args.images, args.views, args.dim)
        made = time.perf_counter() - start
        print(f"{args.images:,} images x {args.views} views x dim {args.dim}: "
              f"{path.stat().st_size / 1e9:.2f} GB written in {made:.1f} s")  # fmt: skip
        start = time.perf_counter()
        index = load_index(path)
        load = time.perf_counter() - start
        peak = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 2**20
        print(f"load_index: {load:.2f} s, matrix {index.matrix.numel() * 2 / 2**30:.2f} GiB fp16, "
              f"peak RSS so far {peak:.2f} GiB")  # fmt: skip

    query = torch.nn.functional.normalize(torch.randn(args.dim), dim=0)
    hits = rank(index, query, args.k)
    assert len(hits) == args.k and hits[0].score >= hits[-1].score
    seconds = timed(lambda: rank(index, query, args.k), args.repeat)
    print(f"rank, the per-query work of omni search (product, best view, top-k, rows): "
          f"{seconds * 1e3:.0f} ms, median of {args.repeat}")  # fmt: skip

    m = index.matrix  # (views, dim) float16
    q16, q32 = query.half(), query
    f32 = m.float()
    bf16 = m.bfloat16()

    def chunked(chunk: int = 131_072) -> torch.Tensor:
        out = torch.empty(len(m))
        for i in range(0, len(m), chunk):
            torch.mv(m[i : i + chunk].float(), q32, out=out[i : i + chunk])
        return out

    rows = [
        ("float16 matrix, one mv (search.py)", lambda: m @ q16, m.numel() * 2),
        ("float16 -> float32 in chunks of 131,072, mv", chunked, m.numel() * 2),
        ("float32 copy made at load, one mv", lambda: f32 @ q32, m.numel() * 4),
        ("bfloat16 copy made at load, one mv", lambda: bf16 @ q16.bfloat16(), m.numel() * 2),
        (
            "numpy float16 -> float32 chunks, matmul",
            lambda: [
                m[i : i + 131_072].numpy().astype(np.float32) @ q32.numpy()
                for i in range(0, len(m), 131_072)
            ],
            m.numel() * 2,
        ),
    ]
    print("product alone (all views x query), median of", args.repeat)
    for name, fn, memory in rows:
        seconds = timed(fn, args.repeat)
        print(f"  {name:<45} {seconds * 1e3:7.0f} ms   resident matrix {memory / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
