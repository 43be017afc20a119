"""Archive scale: what a nightly `omni tag` costs over a large output, one file or an archive.

Forges outputs cheaply: a tree of N distinct small JPEG files (copies of a few hundred real
160x120 JPEGs; distinct inodes, since omni lists a hard-linked file once), and rows for them
replicated from a real `omni tag` run over a small sample (so the metadata is exactly what the
command writes), with random float32 similarity, probs and scores (incompressible: the worst
case for bytes). The same rows are written as one file (`tags.parquet`) and as an archive
(`tags`). Then whole `omni tag` commands (fresh processes, fixture model, CPU) are timed for:

- nothing changed;
- a night: a new folder of 100 files, 50 files redrawn in one folder, 20 deleted in another;
- 1% changed, scattered: every 100th file redrawn.

For each: wall time, peak memory (the process's VmHWM, and the process tree's proportional set
size polled every 50 ms, so that pages the process shares with its forked decode helper count
once; the larger is shown) and bytes written (`wchar` of /proc/PID/io: every byte the command
wrote, OUT.partial/ included), and the bytes of the output's files that are new (a hard-linked
part costs nothing).

    python benchmarks/archive_scale.py                       # 100k and 300k rows, 1,000 labels
    python benchmarks/archive_scale.py --rows 1000000 --labels 100
    python benchmarks/archive_scale.py --rows 4000 16000 --labels 20000 --runs none night
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe  # noqa: E402

from omni_cli.inputs.sources import discover  # noqa: E402
from omni_cli.output import archive, layout  # noqa: E402
from omni_cli.output.layout import write_file  # noqa: E402
from omni_cli.tools import synthetic  # noqa: E402

MODEL = str(Path(__file__).parents[1] / "tests" / "fixtures" / "tiny-clip")
POOL = 300  # real JPEGs the tree is made of
PER_FOLDER = 1000
# Runs omni in this process and, on exit, leaves /proc/self/io and VmHWM in a file.
LAUNCH = (
    "import atexit, sys; dump = sys.argv.pop(1); "
    "atexit.register(lambda: open(dump, 'w').write(open('/proc/self/io').read() + "
    "open('/proc/self/status').read())); "
    "from omni_cli.cli import app; sys.argv[0] = 'omni'; app()"
)


def jpegs(n: int, seed: int) -> list[bytes]:
    import io

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        synthetic.draw(synthetic.LABELS[i % 9], (160, 120), rng=rng).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def make_tree(tree: Path, rows: int, pool: list[bytes]) -> None:
    for i in range(rows):
        folder = tree / f"d{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(pool[i % len(pool)])


def omni(work: Path, out: str, labels: Path, inputs: str = "tree") -> dict:
    """One whole `omni tag` in a fresh process: wall, peak memory, bytes written."""
    dump = work / "io.txt"
    dump.unlink(missing_ok=True)
    args = [sys.executable, "-c", LAUNCH, str(dump), "tag", inputs, "-l", str(labels),
            "-o", out, "--model", MODEL, "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.perf_counter()
    proc = psutil.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:  # PSS: a page shared by the process and its forked decode helper counts once
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - started
    err = proc.stderr.read().decode()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"omni failed ({proc.returncode}): {err}")
    fields = dict(line.split(":", 1) for line in dump.read_text().splitlines() if ":" in line)
    hwm = int(fields["VmHWM"].split()[0]) * 1024
    return {"wall": wall, "peak": max(peak, hwm), "wchar": int(fields["wchar"])}


def new_bytes(path: Path, before: dict[int, int]) -> int:
    """Bytes of the output's files whose inode was not there before."""
    return sum(p.stat().st_size for p in _files(path) if p.stat().st_ino not in before)


def inodes(path: Path) -> dict[int, int]:
    return {p.stat().st_ino: p.stat().st_size for p in _files(path)}


def _files(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else ([path] if path.exists() else [])


def forge(work: Path, rows: int, labels: Path, pool: list[bytes], seed: int = 0) -> None:
    """The tree, and both outputs for it, as `omni tag tree` over it would have written them."""
    tree = work / "tree"
    make_tree(tree, rows, pool)
    sample = work / "sample"
    make_tree(sample, 200, pool)
    omni(work, "sample.parquet", labels, "sample")
    template = pq.read_table(work / "sample.parquet")
    meta = layout.metadata(work / "sample.parquet")
    schema = template.schema.with_metadata({layout.META_KEY: json.dumps(meta)})
    entries = sorted(_entries(work))
    n_labels = len(meta["labels"])
    rng = np.random.default_rng(seed)

    def batches():
        for start in range(0, len(entries), 2048):
            chunk = entries[start : start + 2048]
            n = len(chunk)
            rows_ = template.take(np.arange(n) % template.num_rows).combine_chunks()
            cols = {c: rows_[c].chunk(0) for c in rows_.column_names}
            cols["root"] = pa.array([e[0] for e in chunk])
            cols["path"] = pa.array([e[1] for e in chunk])
            cols["bytes"] = pa.array([e[2] for e in chunk], pa.int64())
            cols["mtime_ns"] = pa.array([e[3] for e in chunk], pa.int64())
            for name in ("similarity", "probs", "scores"):
                flat = pa.array(rng.random(n * n_labels, np.float32))
                cols[name] = pa.FixedSizeListArray.from_arrays(flat, n_labels)
            yield pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)

    write_file(work / "tags.parquet", batches(), schema)
    # The archive: the same rows as a run's flushed parts, published as a first version.
    partial = work / "forge.partial"
    partial.mkdir()
    for i, batch in enumerate(batches()):
        pq.write_table(pa.Table.from_batches([batch]).replace_schema_metadata(None),
                       partial / f"part-{i:06d}.parquet")  # fmt: skip
    new = archive.NewRows(partial, schema, lambda t: pa.array(np.ones(t.num_rows, bool)))
    archive.publish(work / "tags", schema, None, new)
    shutil.rmtree(partial)
    shutil.rmtree(sample)


def _entries(work: Path) -> list[tuple[str, str, int, int]]:
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return [(e.root, e.rel, e.bytes, e.mtime_ns) for e in discover([Path("tree")])]
    finally:
        os.chdir(cwd)


def night(work: Path, pool: list[bytes]) -> None:
    tree = work / "tree"
    new = tree / "new"
    new.mkdir(exist_ok=True)
    for i in range(100):
        (new / f"n{i:04d}.jpg").write_bytes(pool[(i * 7) % len(pool)])
    for path in sorted((tree / "d0001").iterdir())[:50]:
        path.write_bytes(pool[(int(path.stem) + 1) % len(pool)])
    for path in sorted((tree / "d0002").iterdir())[:20]:
        path.unlink()


def scattered(work: Path, rows: int, pool: list[bytes]) -> None:
    for i in range(50, rows, 100):
        path = work / "tree" / f"d{i // PER_FOLDER:04d}" / f"{i:07d}.jpg"
        if path.exists():
            path.write_bytes(pool[(i + 2) % len(pool)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--runs", nargs="+", default=["none", "night", "scattered"])
    parser.add_argument("--layouts", nargs="+", default=["tags.parquet", "tags"])
    parser.add_argument("--work", type=Path, default=None, help="folder for the forged data")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    pool = jpegs(POOL, 0)
    table = []
    for rows in args.rows:
        work = Path(tempfile.mkdtemp(prefix="omni-scale-", dir=args.work))
        try:
            labels = work / "labels.txt"
            names = list(synthetic.LABELS) + [f"thing {i}" for i in range(args.labels)]
            labels.write_text("\n".join(names[: args.labels]) + "\n")
            started = time.perf_counter()
            forge(work, rows, labels, pool)
            size = {out: sum(p.stat().st_size for p in _files(work / out)) for out in args.layouts}
            sizes = ", ".join(f"{o} {s / 1e9:.2f} GB" for o, s in size.items())
            took = time.perf_counter() - started
            print(f"forged {rows:,} rows x {args.labels:,} labels in {took:.0f} s: {sizes}",
                  flush=True)  # fmt: skip
            for run in args.runs:
                if run == "night":
                    night(work, pool)
                elif run == "scattered":
                    scattered(work, rows, pool)
                for out in args.layouts:
                    before = inodes(work / out)
                    m = omni(work, out, labels)
                    m["new"] = new_bytes(work / out, before)
                    row = (rows, args.labels, run, "one file" if out.endswith(".parquet")
                           else "archive", m)  # fmt: skip
                    table.append(row)
                    print(_line(row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| rows | labels | run | layout | wall | peak memory | written | new output bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        print(_line(row))


def _line(row) -> str:
    rows, labels, run, how, m = row
    what = {"none": "nothing changed", "night": "a night", "scattered": "1% scattered"}[run]
    return (f"| {rows:,} | {labels:,} | {what} | {how} | {m['wall']:.1f} s | "
            f"{m['peak'] / 2**20:,.0f} MiB | {m['wchar'] / 1e6:,.1f} MB | "
            f"{m['new'] / 1e6:,.1f} MB |")  # fmt: skip


if __name__ == "__main__":
    main()
