"""Report benchmark: does `omni report` keep its memory flat from 100k rows to 1M, in both shapes?

Writes synthetic `omni tag` outputs (the 18 labels of examples/labels-photos.txt, Dirichlet-
distributed probs and an independent `scores` column, 1% error rows, threshold 0.5 so that some
rows have no tag) as one Parquet file and as a folder of part files with `_omni.json` (the
archive layout), creates real 1024x768 JPEGs only for the rows the page will show (the only
files `report` opens), then runs `omni report` on each in a fresh process and prints its wall
time, peak memory (RSS) and the page's size.

    python benchmarks/report_scale.py                          # 100,000 and 1,000,000 rows
    python benchmarks/report_scale.py --rows 100000 --shape file
    python benchmarks/report_scale.py --rows 100000 --shape file --labels 1000
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
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from omni_cli.text import plural  # noqa: E402
from omni_cli.tools import synthetic  # noqa: E402

PHOTO_LABELS = Path(__file__).parents[1] / "examples" / "labels-photos.txt"
LABELS = [
    line.split(":")[0].strip()
    for line in PHOTO_LABELS.read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
PER_LABEL = 24
THRESHOLD = 0.5


PART_ROWS = 100_000  # rows per part file of the folder shape


def synthesise(folder: Path, rows: int, shapes: list[str], labels: list[str], seed: int = 0
               ) -> tuple[list[Path], set]:  # fmt: skip
    """Write the outputs; return them and the rows whose files the page will show."""
    rng = np.random.default_rng(seed)
    n_labels = len(labels)
    probs = rng.dirichlet(np.full(n_labels, 0.3), size=rows).astype(np.float32)
    scores = (1 / (1 + np.exp(-rng.normal(-2.5, 2.0, size=(rows, n_labels))))).astype(np.float32)
    error = rng.random(rows) < 0.01
    probs[error], scores[error] = np.nan, np.nan
    order = np.argsort(-scores, axis=1)[:, :5]
    passes = np.take_along_axis(scores, order, axis=1) >= THRESHOLD
    untagged = ~passes.any(axis=1) & ~error
    # The rows the page shows: the best per label (fewer with many labels, as report.py shows),
    # and the least sure untagged ones.
    per_label = min(PER_LABEL, max(4, 2_400 // n_labels))
    ranked = np.where(np.isnan(scores), -np.inf, scores)
    shown = set(np.argsort(-ranked, axis=0, kind="stable")[:per_label].ravel().tolist())
    best = np.where(untagged, np.nan_to_num(ranked.max(axis=1), neginf=1.0), np.inf)
    shown |= set(np.argsort(best, kind="stable")[:PER_LABEL].tolist())

    def table(a: int, b: int) -> pa.Table:
        n, err = b - a, error[a:b]

        def fixed(m: np.ndarray) -> pa.Array:
            flat = pa.array(m[a:b].reshape(-1), pa.float32(), from_pandas=True)  # NaN -> null
            return pa.FixedSizeListArray.from_arrays(flat, n_labels, mask=pa.array(err))

        names = np.array(labels, dtype=object)
        top = [[] if err[i] else list(names[order[a + i][passes[a + i]]]) for i in range(n)]
        return pa.table(
            {
                "root": pa.array([str(folder)] * n),
                "path": pa.array([f"{i // 1000:04d}/{i:07d}.jpg" for i in range(a, b)]),
                "status": pa.array(np.where(err, "error", "ok")),
                "error": pa.array(
                    [
                        ("truncated JPEG" if i % 2 else "not an image") if e else None
                        for i, e in enumerate(err)
                    ]
                ),  # fmt: skip
                "bytes": pa.array(rng.integers(100_000, 5_000_000, n)),
                "mtime_ns": pa.array(np.full(n, 1_700_000_000 * 10**9)),
                "width": pa.array(np.full(n, 1024, np.int32)),
                "height": pa.array(np.full(n, 768, np.int32)),
                "views": pa.array(np.where(err, 0, 1).astype(np.int16)),
                "similarity": fixed(probs),
                "probs": fixed(probs),
                "scores": fixed(scores),
                "top_labels": pa.array(top, pa.list_(pa.string())),
                "top_scores": pa.array([[0.9] * len(t) for t in top], pa.list_(pa.float32())),
            }
        )

    meta = {
        "labels": labels,
        "model": "openai/clip-vit-large-patch14",
        "precision": "bf16",
        "tiles": "off",
        "top_k": 5,
        "threshold": THRESHOLD,
        "created": "2026-01-01T00:00:00+00:00",
        "scores": "synthetic",
    }
    bounds = list(range(0, rows, PART_ROWS)) + [rows]
    chunks = [table(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    outputs = []
    if "file" in shapes:
        out = folder / f"tags-{rows}.parquet"
        schema = chunks[0].schema.with_metadata({b"omni": json.dumps(meta)})
        with pq.ParquetWriter(out, schema, compression="zstd") as writer:
            for chunk in chunks:
                writer.write_table(chunk.replace_schema_metadata(schema.metadata), 65_536)
        outputs.append(out)
    if "folder" in shapes:
        out = folder / f"tags-{rows}"
        out.mkdir()
        (out / "_omni.json").write_text(json.dumps(meta))
        for i, chunk in enumerate(chunks):
            pq.write_table(chunk, out / f"part-{i:05d}.parquet", compression="zstd",
                           row_group_size=65_536)  # fmt: skip
        outputs.append(out)
    return outputs, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000", help="comma list of sizes")
    parser.add_argument("--shape", choices=["file", "folder", "both"], default="both")
    parser.add_argument("--labels", type=int, help="N made-up labels instead of the 18 photo ones")
    args = parser.parse_args()
    labels = LABELS if args.labels is None else [f"label {i}" for i in range(args.labels)]
    shapes = ["file", "folder"] if args.shape == "both" else [args.shape]
    print(f"machine: {describe()}")
    print("| rows | shape | wall | peak RSS | page |")
    print("|---|---|---|---|---|")
    for rows in [int(r) for r in args.rows.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            outputs, shown = synthesise(folder, rows, shapes, labels)
            rng = np.random.default_rng(1)
            for i in sorted(shown):
                path = folder / f"{i // 1000:04d}/{i:07d}.jpg"
                path.parent.mkdir(exist_ok=True)
                label = synthetic.LABELS[i % len(synthetic.LABELS)]
                img = synthetic.draw(label, (1024, 768), rng=rng, background="textured")
                img.save(path, quality=90)
            for out in outputs:
                page = folder / "report.html"
                start = time.perf_counter()
                child = subprocess.run(
                    [sys.executable, "-c", RUN, str(out), "-o", str(page), "-q"],
                    check=True,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                wall = time.perf_counter() - start
                peak = int(child.stderr.strip().splitlines()[-1]) / 1024
                parts = len(list(out.glob("*.parquet")))
                shape = "one file" if out.suffix else f"folder, {plural(parts, 'part')}"
                print(f"| {rows:,} | {shape} | {wall:.2f} s | {peak:.0f} MiB | "
                      f"{page.stat().st_size / 1e6:.2f} MB, {len(shown)} thumbnails |")  # fmt: skip


# `omni report ARGS` in a fresh process that prints its own peak RSS (VmHWM, in kB) last: the
# high-water mark starts afresh at exec, unlike ru_maxrss, which would count this big parent.
RUN = """
import sys
from omni_cli.cli import app
try:
    app(["report", *sys.argv[1:]])
except SystemExit as exit:
    assert not exit.code, exit.code
status = open("/proc/self/status").read()
print(status.split("VmHWM:")[1].split()[0], file=sys.stderr)
"""


if __name__ == "__main__":
    main()
