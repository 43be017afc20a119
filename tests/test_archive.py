"""The archive layout (`-o tags`): readers, nights that rewrite only what changed, crashes."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omni_cli.errors import Interrupted
from omni_cli.output import archive, layout
from omni_cli.output.lock import OutputLock
from omni_cli.pipeline import tag
from omni_cli.tools import synthetic

from .conftest import LABELS, MODEL, omni_tag
from .test_cron import config, flushed_rows, make_folder, start_slow, wait_for_parts


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of a few rows each, so that a small archive has many."""
    monkeypatch.setattr(archive, "TARGET_BYTES", 600)


def photos(tmp_path, per_folder=8):
    root = tmp_path / "photos"
    for i, name in enumerate("abc"):
        make_folder(root / name, per_folder, seed=i)
    return root


def read_rows(out) -> dict:
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def inodes(out) -> dict[str, int]:
    """First path of each part -> its inode."""
    return {pq.read_table(p, columns=["path"])["path"][0].as_py(): p.stat().st_ino
            for p in layout.parts(out)}  # fmt: skip


def test_every_reader_reads_every_row_once(tmp_path, labels_file):
    folder, out = photos(tmp_path, 3), tmp_path / "tags"
    result = tag(config(folder, labels_file, out, save_embeddings=True))
    assert result.files == 9 and out.is_symlink() and out.is_dir()
    expected = sorted(f"{d}/img{i:03d}.jpg" for d in "abc" for i in range(3))

    duckdb = pytest.importorskip("duckdb")  # test extras; not on every GPU image
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")

    assert sorted(pd.read_parquet(out)["path"]) == expected
    table = pq.read_table(out)
    assert sorted(table["path"].to_pylist()) == expected
    assert table.schema.field("scores").type == pa.list_(pa.float32(), len(LABELS))
    assert table.schema.field("embedding").type == pa.list_(pa.float16())
    sql = f"select path from read_parquet('{out}/*.parquet') order by path"
    assert [r[0] for r in duckdb.sql(sql).fetchall()] == expected
    assert sorted(pl.read_parquet(f"{out}/*.parquet")["path"].to_list()) == expected
    meta = json.loads((out / "_omni.json").read_text())
    assert meta == layout.metadata(out) and meta["labels"] == list(LABELS)
    for part in layout.parts(out):  # the metadata is stored once, not in every part
        assert b"omni" not in (pq.read_metadata(part).metadata or {})


def test_one_file_holds_its_metadata_once_and_reads_as_before(tmp_path, labels_file):
    folder, out = photos(tmp_path, 2), tmp_path / "tags.parquet"
    tag(config(folder, labels_file, out, save_embeddings=True))
    footer = pq.read_metadata(out).metadata
    assert json.loads(footer[b"omni"])["labels"] == list(LABELS)
    assert LABELS[0].encode() not in base64.b64decode(footer[b"ARROW:schema"])  # not twice
    assert layout.metadata(out)["labels"] == list(LABELS)
    table = pq.read_table(out)
    assert table.schema.field("similarity").type == pa.list_(pa.float32(), len(LABELS))
    assert table.schema.field("embedding").type == pa.list_(pa.float16())
    import duckdb
    import pandas as pd

    assert len(pd.read_parquet(out)) == 6
    assert duckdb.sql(f"select count(*) from '{out}'").fetchall() == [(6,)]
    # An output written before (the metadata also in ARROW:schema) still reads, and a rerun
    # over unchanged files leaves it as it is.
    old = table.replace_schema_metadata({b"omni": footer[b"omni"]})
    pq.write_table(old, out)
    assert pq.read_schema(out).metadata[b"omni"] == footer[b"omni"]
    before = out.read_bytes()
    result = tag(config(folder, labels_file, out, save_embeddings=True))
    assert result.unchanged and out.read_bytes() == before


def test_a_night_rewrites_only_the_parts_that_hold_it(tmp_path, labels_file, small_parts):
    folder, out = photos(tmp_path), tmp_path / "tags"
    tag(config(folder, labels_file, out))
    first = os.readlink(out)
    before, old_rows = inodes(out), read_rows(out)
    assert len(before) >= 6  # several parts
    # A night: a new folder, one file redrawn in a, one deleted in c.
    make_folder(folder / "d", 2, seed=9)
    synthetic.draw(LABELS[5], (200, 160), rng=np.random.default_rng(5)).save(
        folder / "a" / "img000.jpg"
    )
    (folder / "c" / "img007.jpg").unlink()
    result = tag(config(folder, labels_file, out))
    assert result.tagged == 3 and result.files == 25
    rows = read_rows(out)
    reference = tmp_path / "reference.parquet"
    tag(config(folder, labels_file, reference))
    expected = read_rows(reference)
    assert sorted(rows) == sorted(expected)
    for name, row in rows.items():
        assert np.allclose(row["similarity"], expected[name]["similarity"], atol=1e-6), name
    assert rows["a/img000.jpg"]["top_labels"][0] == LABELS[5]
    assert rows["a/img000.jpg"]["mtime_ns"] != old_rows["a/img000.jpg"]["mtime_ns"]
    # Rows in key order across the parts; the parts of folder b were hard-linked, not written.
    paths = [p for part in layout.parts(out) for p in pq.read_table(part)["path"].to_pylist()]
    assert paths == sorted(paths)
    after = inodes(out)
    linked = [k for k in after if before.get(k) == after[k]]
    assert any(k.startswith("b/") for k in linked)
    assert all(not k.startswith("d/") for k in linked)
    assert len(linked) >= len(after) - 4
    # The replaced version stays until the next run, for readers that listed it.
    assert os.readlink(out) != first and (out.parent / first).is_dir()
    assert tag(config(folder, labels_file, out)).unchanged  # writes nothing ...
    assert not (out.parent / first).exists()  # ... and clears the version two runs back
    assert len(list(layout.versions_dir(out).iterdir())) == 1


def test_nothing_changed_writes_nothing(tmp_path, labels_file):
    folder, out = photos(tmp_path, 2), tmp_path / "tags"
    assert omni_tag(folder, "--labels", labels_file, "-o", f"{out}/", "--model", MODEL,
                    "--workers", 0).exit_code == 0  # fmt: skip
    target, listing = os.readlink(out), sorted(os.listdir(out))
    mtimes = [p.stat().st_mtime_ns for p in out.iterdir()]
    result = omni_tag(folder, "--labels", labels_file, "-o", out, "--model", MODEL)
    assert result.exit_code == 0 and "nothing changed" in result.output
    assert os.readlink(out) == target and sorted(os.listdir(out)) == listing
    assert [p.stat().st_mtime_ns for p in out.iterdir()] == mtimes


def test_a_crash_while_publishing_leaves_the_old_version_and_the_rerun_recovers(
    tmp_path, labels_file, monkeypatch, small_parts
):
    folder, out = photos(tmp_path), tmp_path / "tags"
    tag(config(folder, labels_file, out))
    target, before = os.readlink(out), read_rows(out)
    make_folder(folder / "d", 3, seed=4)
    (folder / "b" / "img002.jpg").unlink()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(archive, "switch", crash)
    with pytest.raises(Interrupted, match="left as it was"):
        tag(config(folder, labels_file, out))
    assert os.readlink(out) == target and read_rows(out) == before  # readers see the old one
    assert len(list(layout.versions_dir(out).iterdir())) == 2  # and a half-published one
    monkeypatch.undo()
    monkeypatch.setattr(archive, "TARGET_BYTES", 600)
    result = tag(config(folder, labels_file, out))
    assert result.tagged == 0 and result.carried == 26  # the new rows came from OUT.partial
    rows = read_rows(out)
    assert "b/img002.jpg" not in rows and {f"d/img{i:03d}.jpg" for i in range(3)} <= set(rows)
    assert len(rows) == 26 and len(pq.read_table(out)) == 26
    assert not out.with_name("tags.partial").exists()


# Runs `omni` and SIGKILLs it at a chosen step of publishing a version.
KILL_AT = (
    "import os, sys; import omni_cli.output.archive as a; step = sys.argv.pop(1); "
    "die = lambda *x, **k: os.kill(os.getpid(), 9); "
    "w = a._Writer._write; "
    "a._Writer._write = (lambda self, b: (w(self, b), die())) if step == 'part' else w; "
    "a.switch = die if step == 'switch' else a.switch; "
    "from omni_cli.cli import app; sys.argv[0] = 'omni'; app()"
)


@pytest.mark.parametrize("step", ["part", "switch"])
def test_kill_9_while_publishing(tmp_path, labels_file, step):
    folder, out = photos(tmp_path, 4), tmp_path / "tags"
    tag(config(folder, labels_file, out))
    target, before = os.readlink(out), read_rows(out)
    make_folder(folder / "d", 2, seed=4)
    args = [sys.executable, "-c", KILL_AT, step, "tag", str(folder), "--labels",
            str(labels_file), "-o", str(out), "--model", str(MODEL), "--workers", "0",
            "--precision", "fp32"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert os.readlink(out) == target and read_rows(out) == before
    result = tag(config(folder, labels_file, out))
    assert result.tagged == 0 and result.files == 14
    assert sorted(read_rows(out)) == sorted(
        [f"{d}/img{i:03d}.jpg" for d in "abc" for i in range(4)] + ["d/img000.jpg", "d/img001.jpg"]
    )
    assert len(list(layout.versions_dir(out).iterdir())) == 2  # the current and the one before


def test_kill_9_while_tagging_resumes_with_every_file_once(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags"
    make_folder(folder, 20)
    proc = start_slow(tmp_path, labels_file, out)
    wait_for_parts(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()
    done = flushed_rows(out)
    result = tag(config(folder, labels_file, out))
    assert result.carried == done and result.files == 20
    paths = pq.read_table(out)["path"].to_pylist()
    assert paths == sorted(f"img{i:03d}.jpg" for i in range(20))


def test_lock_refusal_and_full_hold_for_the_archive(tmp_path, labels_file):
    folder, out = photos(tmp_path, 2), tmp_path / "tags"
    base = [folder, "--labels", labels_file, "-o", out, "--model", MODEL, "--workers", 0,
            "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert omni_tag(*base).exit_code == 0
    target = os.readlink(out)
    (folder / "a" / "img001.jpg").unlink()
    with OutputLock(out):
        result = omni_tag(*base)
    assert result.exit_code == 4 and "is writing" in result.output
    assert os.readlink(out) == target
    result = omni_tag(*base, "--tiles", "2x2")
    assert result.exit_code == 2 and "was made differently (tiles off -> 2x2)" in result.output
    assert os.readlink(out) == target and not out.with_name("tags.partial").exists()
    assert omni_tag(*base, "--full").exit_code == 0
    assert len(pq.read_table(out)) == 5
    assert all(p.stat().st_nlink == 1 for p in layout.parts(out))  # all written again


def test_a_name_that_is_not_an_archive_is_refused(tmp_path, labels_file):
    folder = photos(tmp_path, 1)
    single = tmp_path / "tags"
    single.write_bytes(b"not mine")
    result = omni_tag(folder, "--labels", labels_file, "-o", single, "--model", MODEL)
    assert result.exit_code == 2 and "is one file" in result.output
    assert single.read_bytes() == b"not mine"
    folder2 = tmp_path / "stuff"
    folder2.mkdir()
    (folder2 / "x.txt").write_text("x")
    result = omni_tag(folder, "--labels", labels_file, "-o", folder2, "--model", MODEL)
    assert result.exit_code == 2 and "not an omni archive" in result.output
    result = omni_tag(folder, "--labels", labels_file, "-o", tmp_path / "t.csv", "--model", MODEL)
    assert result.exit_code == 2 and "must end in .parquet" in result.output


def _rows(names, seed=0, labels=4):
    rng = np.random.default_rng(seed)
    n = len(names)
    sim = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * labels, np.float32)), labels)
    return pa.table(
        {
            "root": ["r"] * n,
            "path": names,
            "status": ["ok"] * n,
            "error": [None] * n,
            "bytes": [1] * n,
            "mtime_ns": [seed] * n,
            "width": [1] * n,
            "height": [1] * n,
            "views": [1] * n,
            "similarity": sim,
            "probs": sim,
            "scores": sim,
            "top_labels": [["a"]] * n,
            "top_scores": [[1.0]] * n,
        },  # fmt: skip
        schema=_schema(labels),
    )


def _schema(labels):
    from omni_cli.output.sink import schema

    return schema(labels, embeddings=False, metadata={"labels": list(range(labels))})


def test_compaction_keeps_parts_bounded_over_many_nights(tmp_path):
    """Publish directly: 40 nights of scattered additions and deletions."""
    out, partial = tmp_path / "tags", tmp_path / "tags.partial"
    rng = np.random.default_rng(0)
    have = {f"f{i:05d}": 0 for i in range(0, 4000, 10)}
    target = 4000  # about 40 rows of this schema per part

    def night(add: list[str], drop: set[str], seed: int):
        partial.mkdir(exist_ok=True)
        if add:
            pq.write_table(_rows(sorted(add), seed), partial / "part-000000.parquet")
        version = archive.current(out)
        previous = None
        if version is not None:
            parts = archive.index(version)
            stays, counts = {}, []
            for p in parts:
                t = pq.read_table(version / p.name)
                stays[p.name] = np.array([path not in drop for path in t["path"].to_pylist()])
                counts.append(int(stays[p.name].sum()))
            previous = archive.Previous(version, tuple(parts), tuple(counts), stays)
        new = archive.NewRows(partial, _schema(4), lambda t: pa.array([True] * t.num_rows))
        archive.publish(out, _schema(4), previous, new, target_bytes=target)
        for f in partial.iterdir():
            f.unlink()
        archive.recover(out)

    night(list(have), set(), 0)
    listed = layout.parts(out)  # a reader lists the version through the symlink ...
    sizes = []
    for n in range(1, 41):
        add = [f"f{i:05d}" for i in rng.choice(4000, 6, replace=False) if f"f{i:05d}" not in have]
        drop = set(rng.choice(sorted(have), 4, replace=False).tolist())
        for name in drop:
            del have[name]
        have.update(dict.fromkeys(add, n))
        night(add, drop, n)
        sizes.append(len(layout.parts(out)))
    table = pq.read_table(out)
    assert table["path"].to_pylist() == sorted(have)  # every row once, in key order
    assert dict(zip(table["path"].to_pylist(), table["mtime_ns"].to_pylist(), strict=True)) == have
    parts = archive.index(archive.current(out))
    per_part = [p.rows for p in parts]
    assert max(per_part) <= 2 * 40 and len(parts) <= 2 * len(have) / 40 + 2, per_part
    assert max(sizes) <= 2 * len(have) / 40 + 4
    with pytest.raises(FileNotFoundError):  # ... and cannot read another version's range
        pq.read_table(listed[0])


def test_one_file_and_an_archive_convert_into_each_other(tmp_path, labels_file, monkeypatch):
    folder, single = photos(tmp_path, 3), tmp_path / "tags.parquet"
    tag(config(folder, labels_file, single, save_embeddings=True))
    monkeypatch.setattr(archive, "TARGET_BYTES", 600)  # several parts
    assert archive.convert(single, tmp_path / "tags") == 9
    assert len(layout.parts(tmp_path / "tags")) > 1
    assert archive.convert(tmp_path / "tags", tmp_path / "back.parquet") == 9
    for out in (tmp_path / "tags", tmp_path / "back.parquet"):
        assert layout.metadata(out) == layout.metadata(single)
        assert read_rows(out) == read_rows(single)
    # The converted archive is the output a rerun updates: nothing changed, nothing to do.
    assert tag(config(folder, labels_file, tmp_path / "tags", save_embeddings=True)).unchanged
