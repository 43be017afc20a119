"""Sources: which files become rows, in what order, and how odd trees are survived."""

from __future__ import annotations

import os

import pytest

from omni_cli.errors import InputNotFound
from omni_cli.inputs.sources import discover


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def rels(*args, **kw):
    return [e.rel for e in discover(*args, **kw)]


def test_images_only_hidden_skipped_sorted(tmp_path):
    for name in [
        "b.JPG",
        "a.png",
        "sub/c.webp",
        "notes.txt",
        ".hidden.jpg",
        ".cache/d.jpg",
        "sub/deeper/e.tiff",
        "f.jpeg",
    ]:
        touch(tmp_path / name)
    assert rels([tmp_path]) == ["a.png", "b.JPG", "f.jpeg", "sub/c.webp", "sub/deeper/e.tiff"]
    assert rels([tmp_path], recursive=False) == ["a.png", "b.JPG", "f.jpeg"]
    entry = next(discover([tmp_path]))
    assert entry.root == str(tmp_path) and entry.bytes == 1 and entry.mtime_ns > 0


def test_several_roots_and_file_arguments(tmp_path):
    touch(tmp_path / "one/x.jpg")
    touch(tmp_path / "two/x.jpg")
    entries = list(discover([tmp_path / "one", tmp_path / "two" / "x.jpg"]))
    assert [(e.root, e.rel) for e in entries] == [
        (str(tmp_path / "one"), "x.jpg"),
        (str(tmp_path / "two"), "x.jpg"),
    ]


def test_symlink_loop_and_dangling_symlink(tmp_path):
    touch(tmp_path / "a/img.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")  # a/loop -> a
    os.symlink(tmp_path / "missing.jpg", tmp_path / "a" / "dangling.jpg")
    entries = {e.rel: e for e in discover([tmp_path])}
    assert set(entries) == {"a/img.png", "a/dangling.jpg"}
    assert entries["a/dangling.jpg"].error == "broken symlink"
    assert entries["a/img.png"].error is None


def test_undecodable_names_are_escaped_but_openable(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(b"x")
    (entry,) = discover([tmp_path])
    assert entry.rel == "caf\\xe9.jpg"
    entry.rel.encode("utf-8")  # valid UTF-8 for Parquet
    assert os.path.exists(entry.path)


def test_missing_input_is_an_error_before_any_work(tmp_path):
    with pytest.raises(InputNotFound, match="input not found"):
        list(discover([tmp_path / "nope"]))


def test_every_real_file_once_however_it_is_reached(tmp_path):
    """Hard links, symlinked files, overlapping inputs and file arguments (either order)."""
    touch(tmp_path / "p/a.jpg", b"a")
    touch(tmp_path / "p/scans/b.jpg", b"b")
    touch(tmp_path / "p/c.jpg", b"c")
    os.link(tmp_path / "p/a.jpg", tmp_path / "p/z-hard.jpg")
    os.symlink(tmp_path / "p/c.jpg", tmp_path / "p/y-link.jpg")
    p = tmp_path / "p"

    def listed(*inputs):
        return [(os.path.relpath(e.root, tmp_path), e.rel) for e in discover(list(inputs))]

    assert listed(p) == [("p", "a.jpg"), ("p", "c.jpg"), ("p", "scans/b.jpg")]
    assert listed(p, p / "scans") == listed(p)
    assert listed(p / "scans", p) == [("p/scans", "b.jpg"), ("p", "a.jpg"), ("p", "c.jpg")]
    assert listed(p / "c.jpg", p) == [("p", "c.jpg"), ("p", "a.jpg"), ("p", "scans/b.jpg")]
    assert listed(p, p / "c.jpg") == listed(p)
