"""Report benchmark: how long does `omni report` take on a big output, and how big is the page?

Writes a synthetic `omni tag` output of N rows (the 18 labels of examples/labels-photos.txt,
Dirichlet-distributed probs and an independent `scores` column, 1% error rows, threshold 0.5 so
that some rows have no tag), creates real 1024x768 JPEGs only for the rows the page will show
(the only files `report` opens), then runs `omni report` in a fresh process and prints its wall
time, peak memory (RSS) and the page's size.

    python benchmarks/report_scale.py                    # 100,000 rows
    python benchmarks/report_scale.py --rows 1000000
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

from omni_cli import synthetic  # noqa: E402

PHOTO_LABELS = Path(__file__).parents[1] / "examples" / "labels-photos.txt"
LABELS = [
    line.split(":")[0].strip()
    for line in PHOTO_LABELS.read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
PER_LABEL = 24
THRESHOLD = 0.5


def synthesise(folder: Path, rows: int, seed: int = 0) -> tuple[Path, set[int]]:
    """Write the output; return it and the rows whose files the page will show."""
    rng = np.random.default_rng(seed)
    n_labels = len(LABELS)
    probs = rng.dirichlet(np.full(n_labels, 0.3), size=rows).astype(np.float32)
    scores = (1 / (1 + np.exp(-rng.normal(-2.5, 2.0, size=(rows, n_labels))))).astype(np.float32)
    error = rng.random(rows) < 0.01
    probs[error], scores[error] = np.nan, np.nan
    order = np.argsort(-scores, axis=1)[:, :5]
    top = [
        [] if error[i] else [LABELS[j] for j in order[i] if scores[i, j] >= THRESHOLD]
        for i in range(rows)
    ]
    # The rows the page shows: the best PER_LABEL per label, and the least sure untagged ones.
    ranked = np.where(np.isnan(scores), -np.inf, scores)
    shown = set(np.argsort(-ranked, axis=0, kind="stable")[:PER_LABEL].ravel().tolist())
    untagged = np.array([not t for t in top]) & ~error
    best = np.where(untagged, np.nan_to_num(ranked.max(axis=1), neginf=1.0), np.inf)
    shown |= set(np.argsort(best, kind="stable")[:PER_LABEL].tolist())

    def fixed(m: np.ndarray) -> pa.Array:
        flat = pa.array(m.reshape(-1), pa.float32(), from_pandas=True)  # NaN -> null
        return pa.FixedSizeListArray.from_arrays(flat, n_labels, mask=pa.array(error))

    table = pa.table(
        {
            "root": pa.array([str(folder)] * rows),
            "path": pa.array([f"{i // 1000:04d}/{i:07d}.jpg" for i in range(rows)]),
            "status": pa.array(np.where(error, "error", "ok")),
            "error": pa.array(
                [
                    ("truncated JPEG" if i % 2 else "not an image") if e else None
                    for i, e in enumerate(error)
                ]
            ),  # fmt: skip
            "bytes": pa.array(rng.integers(100_000, 5_000_000, rows)),
            "mtime_ns": pa.array(np.full(rows, 1_700_000_000 * 10**9)),
            "width": pa.array(np.full(rows, 1024, np.int32)),
            "height": pa.array(np.full(rows, 768, np.int32)),
            "views": pa.array(np.where(error, 0, 1).astype(np.int16)),
            "similarity": fixed(probs),
            "probs": fixed(probs),
            "scores": fixed(scores),
            "top_labels": pa.array(top, pa.list_(pa.string())),
            "top_scores": pa.array([[0.9] * len(t) for t in top], pa.list_(pa.float32())),
        }
    )
    meta = {
        "labels": LABELS,
        "model": "openai/clip-vit-large-patch14",
        "precision": "bf16",
        "tiles": "off",
        "top_k": 5,
        "threshold": THRESHOLD,
        "created": "2026-01-01T00:00:00+00:00",
        "scores": "synthetic",
    }
    out = folder / "tags.parquet"
    table = table.replace_schema_metadata({b"omni": json.dumps(meta)})
    pq.write_table(table, out, compression="zstd", row_group_size=65_536)
    return out, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        out, shown = synthesise(folder, args.rows)
        rng = np.random.default_rng(1)
        for i in sorted(shown):
            path = folder / f"{i // 1000:04d}/{i:07d}.jpg"
            path.parent.mkdir(exist_ok=True)
            label = synthetic.LABELS[i % len(synthetic.LABELS)]
            img = synthetic.draw(label, (1024, 768), rng=rng, background="textured")
            img.save(path, quality=90)
        made = time.perf_counter() - start
        print(f"{args.rows:,} rows, {len(LABELS)} labels, {len(shown)} image files made, "
              f"output {out.stat().st_size / 1e6:.1f} MB ({made:.1f} s)")  # fmt: skip
        page = folder / "report.html"
        start = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", RUN, str(out), "-o", str(page)],
            check=True,
            stderr=subprocess.PIPE,
            text=True,
        )
        wall = time.perf_counter() - start
        peak = int(child.stderr.strip().splitlines()[-1]) / 1024
        print(f"omni report: {wall:.2f} s wall (a fresh process), peak RSS {peak:.0f} MiB, "
              f"page {page.stat().st_size / 1e6:.2f} MB")  # fmt: skip


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
