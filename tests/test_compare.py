"""Compare: files found by (root, path) hash, checked against the names themselves."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from omni_cli.inputs.listing import Files
from omni_cli.inputs.sources import FileEntry
from omni_cli.output import compare


def files(names: list[str], root: str = "photos") -> Files:
    return Files.of([FileEntry(root, n, f"{root}/{n}", 10 + i, 100 + i)
                     for i, n in enumerate(names)])  # fmt: skip


NAMES = ["a.jpg", "b.jpg", "dir/a.jpg", "é/ß.png", "x" * 3000 + ".jpg", "ab.jpg", "ba.jpg"]


def test_every_file_is_found_by_its_own_name_and_no_other():
    lookup = compare.Lookup(files(NAMES))
    asked = [*NAMES, "c.jpg", "a.jpg ", "dir/b.jpg"]
    roots = pa.array(["photos"] * len(asked))
    at = lookup.find(roots, pa.array(asked))
    assert at.tolist() == [*range(len(NAMES)), -1, -1, -1]
    other = lookup.find(pa.array(["elsewhere"]), pa.array(["a.jpg"]))
    assert other.tolist() == [-1]  # same path under another root


def test_a_hash_collision_never_gives_a_row_another_files_index(monkeypatch):
    monkeypatch.setattr(
        compare, "name_hashes", lambda roots, paths: np.zeros(len(roots), np.uint64)
    )
    lookup = compare.Lookup(files(NAMES))
    at = lookup.find(pa.array(["photos"] * len(NAMES)), pa.array(NAMES))
    right = at == np.arange(len(NAMES))
    assert (right | (at == -1)).all() and right.sum() == 1  # found, or taken as gone


def test_size_and_mtime_decide_whether_a_row_describes_a_file_as_it_is():
    found = files(NAMES[:3])
    lookup = compare.Lookup(found)
    rows = pa.table({"root": ["photos"] * 3, "path": NAMES[:3],
                     "bytes": [10, 99, 12], "mtime_ns": [100, 101, None]})  # fmt: skip
    at = lookup.find(rows["root"], rows["path"])
    assert lookup.same(rows, at).tolist() == [True, False, False]
