"""`omni search`: ranking stored embeddings by a text or an image query, with the fixture model."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.look import index as index_module
from omni_cli.look.index import index_folder
from omni_cli.look.search import load_index, rank
from omni_cli.output.layout import metadata

from .conftest import LABELS, MODEL, omni_tag, shape_image

RED = 12  # red circles in the mixed folder; 2 of every other label


def omni(*args):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """A mixed folder tagged once with --save-embeddings, and once without."""
    base = tmp_path_factory.mktemp("search")
    folder = base / "photos"
    folder.mkdir()
    truth = {}
    for i in range(RED):
        name = f"red_circle_{i:02d}.jpg"
        shape_image("red circle", seed=200 + i).save(folder / name)
        truth[name] = "red circle"
    for label in LABELS[1:]:
        for i in range(2):
            name = f"{label.replace(' ', '_')}_{i}.png"
            shape_image(label, seed=300 + i + 7 * LABELS.index(label)).save(folder / name)
            truth[name] = label
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff cut short")
    labels = base / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    outputs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNI_CACHE_DIR", str(base / "cache"))
        for name, extra in (("emb", ["--save-embeddings"]), ("plain", [])):
            out = base / f"{name}.parquet"
            args = [folder, "--labels", labels, "-o", out, "--model", MODEL, "--workers", 0]
            result = omni_tag(*args, "--precision", "fp32", *extra)
            assert result.exit_code == 3, result.output  # the broken file
            outputs[name] = out
    return {"folder": folder, "truth": truth, **outputs}


def found(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_text_query_finds_red_circles_first(archive):
    hits = found(omni("search", archive["emb"], "red circle", "-k", 10, "--json"))
    assert len(hits) == 10
    assert [archive["truth"][h["path"]] for h in hits] == ["red circle"] * 10  # precision@10
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and [h["rank"] for h in hits] == list(
        range(1, 11)
    )


@pytest.mark.parametrize("label", ["blue triangle", "green square"])
def test_text_query_for_other_labels(archive, label):
    hits = found(omni("search", archive["emb"], f"a {label}", "-k", 2, "--json"))
    assert [archive["truth"][h["path"]] for h in hits] == [label, label]


@pytest.mark.parametrize("label", ["red circle", "green triangle", "blue square"])
def test_image_query_finds_its_own_label_first(archive, tmp_path, label):
    query = tmp_path / "query.jpg"
    shape_image(label, seed=999).save(query)  # not in the archive
    hits = found(omni("search", archive["emb"], "--image", query, "-k", 2, "--json"))
    assert [archive["truth"][h["path"]] for h in hits] == [label, label]
    assert all(h["view"] == 0 for h in hits)


def test_table_lists_rank_score_path(archive):
    result = omni("search", archive["emb"], "red circle", "-k", 3)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "path"]
    assert len(lines) == 4
    for n, line in enumerate(lines[1:], 1):
        rank_, score, path = line.split(maxsplit=2)
        assert int(rank_) == n and -1 <= float(score) <= 1
        assert Path(path).parent == archive["folder"] and Path(path).name.startswith("red_circle")


def test_error_rows_are_not_ranked(archive):
    index = load_index(archive["emb"])
    assert len(index) == len(archive["truth"])  # broken.jpg has no embedding
    hits = found(omni("search", archive["emb"], "red circle", "-k", 1000, "--json"))
    assert len(hits) == len(archive["truth"]) and "broken.jpg" not in {h["path"] for h in hits}


def test_without_embeddings_names_the_command_that_stores_them(archive):
    result = omni("search", archive["plain"], "red circle")
    assert result.exit_code == 2
    assert "no embeddings" in result.output and "omni tag" in result.output
    assert "--save-embeddings" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a text query or --image"),
        (["red", "--image", "q.jpg"], "give a text query or --image"),
        (["   "], "the query is empty"),
        (["red", "-k", 0], "-k must be at least 1"),
        (["--image", "/no/such/file.jpg"], "no such file"),
        (["red", "--device", "tpu"], "--device must be"),
    ],
)
def test_usage_errors_exit_2(archive, args, message):
    result = omni("search", archive["emb"], *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_unreadable_query_image_and_missing_output_exit_2(archive, tmp_path):
    bad = tmp_path / "q.jpg"
    bad.write_bytes(b"not an image")
    result = omni("search", archive["emb"], "--image", bad)
    assert result.exit_code == 2 and "not an image" in result.output
    result = omni("search", tmp_path / "nothing.parquet", "red")
    assert result.exit_code == 2 and "no such file" in result.output


def test_a_model_that_is_gone_is_fatal(archive, tmp_path):
    result = omni("search", archive["emb"], "red", "--model", tmp_path / "gone")
    assert result.exit_code == 2 and "model not found" in result.output  # a typo: usage


def _output_with_views(path: Path, rows: list[tuple[str, list[list[float]] | None]]) -> Path:
    """An output holding only what search reads: rows of (path, views x dim embeddings)."""
    meta = {"labels": ["x"], "model": "m", "precision": "fp32"}
    emb = [None if v is None else np.asarray(v, np.float16).reshape(-1) for _, v in rows]
    table = pa.table(
        {
            "root": ["r"] * len(rows),
            "path": [p for p, _ in rows],
            "status": ["ok" if v is not None else "error" for _, v in rows],
            "views": pa.array([None if v is None else len(v) for _, v in rows], pa.int16()),
            "embedding": pa.array(emb, pa.list_(pa.float16())),
        }
    )
    pq.write_table(table.replace_schema_metadata({b"omni": json.dumps(meta)}), path)
    return path


def test_an_image_scores_as_its_best_view(tmp_path):
    s = 1 / np.sqrt(2)
    out = _output_with_views(
        tmp_path / "t.parquet",
        [
            ("tiled.jpg", [[0, 1, 0], [0, 0, 1], [1, 0, 0]]),  # its third view is the query
            ("error.jpg", None),
            ("near.jpg", [[s, s, 0]]),
            ("far.jpg", [[0, -1, 0]]),
            ("two.jpg", [[0, 0, -1], [s, 0, s]]),
        ],
    )
    index = load_index(out)
    assert len(index) == 4 and index.dim == 3 and index.segments[0].matrix.dtype == np.float16
    hits = rank(index, torch.tensor([1.0, 0.0, 0.0]), k=3)
    assert [(h.path, h.view) for h in hits] == [("tiled.jpg", 2), ("near.jpg", 0), ("two.jpg", 1)]
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert hits[1].score == pytest.approx(s, abs=1e-3)
    with pytest.raises(Exception, match="dimensions"):
        rank(index, torch.ones(5), k=1)


# ---------------------------------------------------------------------------------------------
# The index beside the output: built once, kept in step file by file.


def _no_build(*args, **kwargs):
    raise AssertionError("the index was rebuilt")


def test_a_repeat_search_reads_the_index_not_the_output(archive, monkeypatch):
    first = found(omni("search", archive["emb"], "red circle", "-k", 5, "--json"))
    folder = index_folder(archive["emb"])
    assert folder == archive["emb"].parent / "emb.parquet.index"
    assert (folder / "index.json").is_file() and list(folder.glob("seg-*.npy"))
    monkeypatch.setattr(index_module, "_build", _no_build)
    again = omni("search", archive["emb"], "red circle", "-k", 5, "--json")
    assert found(again) == first and "indexed" not in again.stderr


def test_a_changed_output_rebuilds_its_index(archive, tmp_path):
    out = tmp_path / "t.parquet"
    out.write_bytes(archive["emb"].read_bytes())
    before = found(omni("search", out, "red circle", "-k", 1000, "--json"))
    table = pq.read_table(out)
    keep = pa.array([not p.startswith("red_circle") for p in table["path"].to_pylist()])
    meta = {b"omni": json.dumps(metadata(out))}  # kept, as a rerun keeps it
    pq.write_table(table.filter(keep).replace_schema_metadata(meta), out)  # red circles gone
    result = omni("search", out, "red circle", "-k", 1000, "--json")
    assert "indexed 1 of 1 file" in result.stderr
    after = found(result)
    assert {h["path"] for h in after} == {h["path"] for h in before} - {
        p for p in archive["truth"] if p.startswith("red_circle")
    }
    assert len(list(index_folder(out).glob("seg-*.npy"))) == 1  # the old segment is gone


def _split(source: Path, folder: Path, at: int, link_from: Path | None = None) -> None:
    """A folder output as the archive layout writes it: part files and _omni.json."""
    table = pq.read_table(source)
    meta = json.dumps(metadata(source)).encode()
    folder.mkdir()
    (folder / "_omni.json").write_bytes(meta)
    plain = table.replace_schema_metadata(None)
    if link_from is not None:
        os.link(link_from / "part-00000.parquet", folder / "part-00000.parquet")
    else:
        pq.write_table(plain.slice(0, at), folder / "part-00000.parquet")
    pq.write_table(plain.slice(at), folder / "part-00001.parquet")


def test_a_folder_output_reindexes_only_the_parts_that_changed(archive, tmp_path, monkeypatch):
    single = found(omni("search", archive["emb"], "blue square", "-k", 1000, "--json"))
    _split(archive["emb"], tmp_path / "v1", at=10)
    tags = tmp_path / "tags"
    tags.symlink_to("v1")
    result = omni("search", tags, "blue square", "-k", 1000, "--json")
    assert "indexed 2 of 2 files" in result.stderr
    assert found(result) == single  # same ranking from two parts as from one file
    assert (tmp_path / "tags.index" / "index.json").is_file()

    # The next version: part 0 unchanged (a hard link: same inode), part 1 rewritten.
    _split(archive["emb"], tmp_path / "v2", at=10, link_from=tmp_path / "v1")
    (tmp_path / "next").symlink_to("v2")
    os.replace(tmp_path / "next", tags)
    result = omni("search", tags, "blue square", "-k", 1000, "--json")
    assert "indexed 1 of 2 files" in result.stderr
    assert found(result) == single
    monkeypatch.setattr(index_module, "_build", _no_build)
    assert found(omni("search", tags, "blue square", "-k", 1000, "--json")) == single


def test_a_damaged_segment_is_built_again(archive, tmp_path):
    out = tmp_path / "t.parquet"
    out.write_bytes(archive["emb"].read_bytes())
    before = found(omni("search", out, "green circle", "-k", 3, "--json"))
    (segment,) = index_folder(out).glob("seg-*.npy")
    segment.write_bytes(segment.read_bytes()[:1000])  # cut short, as by a full disk
    result = omni("search", out, "green circle", "-k", 3, "--json")
    assert found(result) == before and "indexed 1 of 1 file" in result.stderr


def test_an_index_that_cannot_sit_beside_the_output_goes_to_the_cache(archive, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(index_module, "index_folder", lambda output: blocked / "t.index")
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path / "cache"))
    index = load_index(archive["emb"])
    assert index.folder.parent == tmp_path / "cache" / "index" and index.rebuilt == 1
    assert load_index(archive["emb"]).rebuilt == 0


def test_relative_roots_resolve_against_the_folder_tag_ran_in(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    for i, label in enumerate(LABELS[:3]):
        shape_image(label, seed=i).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["photos", "--labels", "labels.txt", "-o", "out/t.parquet", "--model", MODEL]
    assert omni_tag(*args, "--workers", 0, "--save-embeddings").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hits = found(omni("search", tmp_path / "out" / "t.parquet", LABELS[1], "-k", 1, "--json"))
    assert hits[0]["root"] == "photos" and hits[0]["path"] == "1.png"
    assert hits[0]["file"] == str(tmp_path / "photos" / "1.png")

    (tmp_path / "photos").rename(tmp_path / "moved")
    result = omni("search", tmp_path / "out" / "t.parquet", LABELS[1], "-k", 1)
    assert result.exit_code == 0
    assert "input folder 'photos' (a relative path) was not found under" in result.stderr
    assert f"{tmp_path} (the folder `omni tag` ran in)" in result.stderr


# ---------------------------------------------------------------------------------------------
# Hostile file names: shown, never obeyed by the terminal.

TITLE = "\x1b]0;pwn\x07"  # sets the terminal's title
RAW = ("\x1b", "\x07", "\x9b")


def test_terminal_escapes_in_names_are_printed_as_escapes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shape_image("red circle", seed=5).save(folder / f"{TITLE}.jpg")
    shape_image("green square", seed=6).save(folder / "plain.png")
    (folder / "\x1b[2Jbad\x9b.jpg").write_bytes(b"\xff\xd8\xff cut short")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    out = tmp_path / "t.parquet"
    args = [folder, "--labels", tmp_path / "labels.txt", "-o", out, "--model", MODEL]
    tagged = omni_tag(*args, "--workers", 0, "--save-embeddings")
    assert tagged.exit_code == 3, tagged.output
    assert not any(c in tagged.output for c in RAW), repr(tagged.output)
    assert "error: " in tagged.output and "\\x1b[2Jbad\\x9b.jpg" in tagged.output

    logged = omni_tag(*args, "--workers", 0, "--save-embeddings", "--log-json")
    assert logged.exit_code == 3 and not any(c in logged.output for c in RAW)
    summary = json.loads(logged.stdout.splitlines()[-1])
    assert [e["path"] for e in summary["error_files"]] == ["\x1b[2Jbad\x9b.jpg"]  # exact, in JSON

    table = omni("search", out, "red circle", "-k", 1)
    assert table.exit_code == 0 and not any(c in table.output for c in RAW), repr(table.output)
    assert table.stdout.splitlines()[1].endswith("/\\x1b]0;pwn\\x07.jpg")
    as_json = omni("search", out, "red circle", "-k", 1, "--json")
    assert not any(c in as_json.output for c in RAW)
    assert json.loads(as_json.stdout)[0]["path"] == f"{TITLE}.jpg"  # the name itself, in JSON

    page = tmp_path / "r.html"
    report = omni("report", out, "-o", page)
    assert report.exit_code == 0 and not any(c in report.output for c in RAW)
    html = page.read_text()
    assert not any(c in html for c in RAW)
    assert "\\x1b]0;pwn\\x07.jpg" in html and "\\x1b[2Jbad\\x9b.jpg" in html


def test_tag_keeps_an_archive_index_in_step(archive, tmp_path, monkeypatch):
    """A night over an archive whose index exists: `omni tag` builds the segments of the parts
    it wrote (the others are hard links under new names, and keep theirs), and the next search
    builds nothing and sees the night."""
    from omni_cli.output import archive as archive_module

    monkeypatch.setattr(archive_module, "TARGET_BYTES", 3_000)  # several parts
    photos = tmp_path / "photos"
    shutil.copytree(archive["folder"], photos)
    labels = archive["folder"].parent / "labels.txt"
    out = tmp_path / "tags"
    args = [photos, "--labels", labels, "-o", out, "--model", MODEL, "--workers", 0,
            "--precision", "fp32", "--save-embeddings"]  # fmt: skip
    assert omni_tag(*args).exit_code == 3
    before = found(omni("search", out, "blue square", "-k", 1000, "--json"))
    segments = len(list(index_folder(out).glob("seg-*.npy")))
    assert segments >= 4
    gone = sorted(p for p in archive["truth"] if p.startswith("green"))[0]
    (photos / gone).unlink()
    shape_image("blue square", seed=999).save(photos / "red_circle_00.jpg", format="JPEG")
    result = omni_tag(*args)
    assert result.exit_code == 3, result.output
    built = re.search(r"search index kept in step: (\d+) of its segments built", result.output)
    assert built and 1 <= int(built.group(1)) < segments
    build = index_module._build
    monkeypatch.setattr(index_module, "_build", _no_build)
    after = found(omni("search", out, "blue square", "-k", 1000, "--json"))
    assert {h["path"] for h in after} == {h["path"] for h in before} - {gone}
    assert after[0]["path"] == "red_circle_00.jpg"  # now a blue square
    monkeypatch.setattr(index_module, "_build", build)
    shutil.rmtree(index_folder(out))
    assert found(omni("search", out, "blue square", "-k", 1000, "--json")) == after  # as built
