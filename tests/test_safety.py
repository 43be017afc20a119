"""Nothing lost at night: empty or unreadable inputs, shrinking outputs, --full resume,
stored embeddings, files that crash the decoder, odd names and symlinked outputs."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from omni_cli.errors import InputUnreadable, Interrupted, UsageError
from omni_cli.output.sink import Sink
from omni_cli.pipeline import tag

from .conftest import MODEL, omni_tag
from .test_cron import config, make_folder, opened, rows_by_path  # noqa: F401


def cli(folder, labels_file, out, *extra):
    """`omni tag` as cron runs it, with the fixture model on the CPU."""
    return omni_tag(folder, "-l", labels_file, "-o", out, "--model", MODEL, "--device", "cpu",
                    "--precision", "fp32", "--workers", "0", "--batch", "4", *extra)  # fmt: skip


def test_an_emptied_root_keeps_the_output_until_allow_shrink(tmp_path, labels_file):
    folder, out = tmp_path / "share", tmp_path / "tags.parquet"
    make_folder(folder, 4)
    tag(config(folder, labels_file, out))
    before = out.read_bytes()
    for f in folder.iterdir():  # the share is not mounted: an empty mount point
        f.unlink()
    result = cli(folder, labels_file, out)
    assert result.exit_code == 1
    assert "holds no image files now" in result.output and "4 rows" in result.output
    assert out.read_bytes() == before
    with pytest.raises(InputUnreadable):
        tag(config(folder, labels_file, out))
    done = tag(config(folder, labels_file, out, allow_shrink=True))
    assert done.files == 0 and pq.read_table(out).num_rows == 0


def test_a_root_left_out_of_the_command_is_not_dropped(tmp_path, labels_file):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "tags.parquet"
    make_folder(a, 2)
    make_folder(b, 6)
    run = config(a, labels_file, out)
    tag(run.__class__(**{**run.__dict__, "inputs": (a, b)}))
    with pytest.raises(InputUnreadable, match="not among this run's inputs"):
        tag(config(b, labels_file, out))
    assert pq.read_table(out).num_rows == 8


def test_dropping_more_than_half_is_refused(tmp_path, labels_file, opened):  # noqa: F811
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 6)
    tag(config(folder, labels_file, out))
    for name in ["img000.jpg", "img001.jpg", "img002.jpg"]:
        (folder / name).unlink()
    tag(config(folder, labels_file, out))  # half is not more than half
    assert pq.read_table(out).num_rows == 3
    for name in ["img003.jpg", "img004.jpg"]:
        (folder / name).unlink()
    with pytest.raises(InputUnreadable, match="drop 2 of the 3 rows"):
        tag(config(folder, labels_file, out))
    assert pq.read_table(out).num_rows == 3
    assert tag(config(folder, labels_file, out, allow_shrink=True)).files == 1


def _unlistable(monkeypatch, bad):
    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.abspath(path) == os.path.abspath(bad):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_subfolder_that_cannot_be_listed_keeps_its_rows(tmp_path, labels_file, monkeypatch):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder / "locked", 3)
    make_folder(folder / "open", 2, seed=1)
    tag(config(folder, labels_file, out))
    before = rows_by_path(out)
    make_folder(folder / "new", 1, seed=2)
    _unlistable(monkeypatch, folder / "locked")
    result = tag(config(folder, labels_file, out))
    assert result.exit_code == 3 and result.unlisted[0][1] == "locked/"
    after = rows_by_path(out)
    assert len(after) == 6
    for path in ["locked/img000.jpg", "locked/img001.jpg", "locked/img002.jpg"]:
        assert after[path] == before[path]
    again = cli(folder, labels_file, out)
    assert again.exit_code == 3 and "not listed" in again.output and "locked" in again.output
    assert len(rows_by_path(out)) == 6


def test_an_input_folder_that_cannot_be_listed_stops_the_run(tmp_path, labels_file, monkeypatch):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 2)
    tag(config(folder, labels_file, out))
    before = out.read_bytes()
    _unlistable(monkeypatch, folder)
    result = cli(folder, labels_file, out)
    assert result.exit_code == 1 and "cannot list input folder" in result.output
    assert out.read_bytes() == before


def test_an_interrupted_full_run_resumes(tmp_path, labels_file, opened, monkeypatch):  # noqa: F811
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 5)
    tag(config(folder, labels_file, out))
    opened.clear()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # every row is tagged and saved; the final write is not

    write = pq.ParquetWriter.write_batch
    monkeypatch.setattr(pq.ParquetWriter, "write_batch", killed)
    with pytest.raises(Interrupted, match="5 rows are saved"):
        tag(config(folder, labels_file, out, full=True))
    assert len(opened) == 5
    monkeypatch.setattr(pq.ParquetWriter, "write_batch", write)
    opened.clear()
    result = tag(config(folder, labels_file, out, full=True))
    assert opened == [], opened
    assert (result.files, result.tagged) == (5, 0), result


def test_dropping_stored_embeddings_is_refused(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 3)
    tag(config(folder, labels_file, out, save_embeddings=True))
    make_folder(folder / "new", 1, seed=3)
    before = out.read_bytes()
    with pytest.raises(UsageError, match="--save-embeddings"):
        tag(config(folder, labels_file, out))
    assert out.read_bytes() == before
    result = cli(folder, labels_file, out)
    assert result.exit_code == 2 and "would drop them" in result.output
    tag(config(folder, labels_file, out, full=True))
    assert "embedding" not in pq.read_schema(out).names


def _mark_error(out, path, error):
    table = pq.read_table(out)
    hit = pc.equal(table["path"], path)
    status = pc.if_else(hit, "error", table["status"])
    reason = pc.if_else(hit, pa.scalar(error), table["error"])
    table = table.set_column(2, "status", status).set_column(3, "error", reason)
    meta = pq.read_metadata(out).metadata[b"omni"]  # the run's metadata, kept
    pq.write_table(table.replace_schema_metadata({b"omni": meta}), out)


def test_a_file_that_crashed_the_decoder_is_not_retried_until_it_changes(
    tmp_path,
    labels_file,
    opened,  # noqa: F811
):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 4)
    tag(config(folder, labels_file, out))
    _mark_error(out, "img000.jpg", "crashed the decoder (signal 11)")
    _mark_error(out, "img001.jpg", "truncated JPEG")
    (folder / "img003.jpg").rename(folder / "fresh.jpg")  # other work: errors looked at again
    opened.clear()
    result = tag(config(folder, labels_file, out))
    rows = rows_by_path(out)
    assert "img000.jpg" not in opened and "img001.jpg" in opened
    assert rows["img000.jpg"]["error"] == "crashed the decoder (signal 11)"
    assert rows["img001.jpg"]["status"] == "ok"
    assert result.exit_code == 3  # the kept error is still reported
    os.utime(folder / "img000.jpg", ns=(1, 1))  # the file changed: try it again
    tag(config(folder, labels_file, out))
    assert rows_by_path(out)["img000.jpg"]["status"] == "ok"


def test_sticky_error_rows_survive_new_labels(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 3)
    tag(config(folder, labels_file, out, save_embeddings=True))
    _mark_error(out, "img000.jpg", "decoder timed out after 60 s")
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join(labels_file.read_text().split("\n")[:4]) + "\n")
    tag(config(folder, fewer, out, save_embeddings=True))
    rows = rows_by_path(out)
    assert rows["img000.jpg"]["error"] == "decoder timed out after 60 s"
    assert rows["img000.jpg"]["similarity"] == [None] * 4
    assert len(rows["img001.jpg"]["similarity"]) == 4


def test_an_input_folder_named_in_latin1_is_tagged(tmp_path, labels_file):
    base = os.fsencode(tmp_path)
    os.mkdir(base + b"/caf\xe9")
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    make_folder(folder, 2)
    out = tmp_path / "tags.parquet"
    result = cli(folder, labels_file, out)
    assert result.exit_code == 0, result.output
    root = pq.read_table(out)["root"][0].as_py()
    assert root.endswith("caf\\xe9")


def test_an_output_that_is_a_symlink_stays_one(tmp_path, labels_file):
    folder = tmp_path / "photos"
    make_folder(folder, 2)
    real, link = tmp_path / "store" / "tags.parquet", tmp_path / "tags.parquet"
    real.parent.mkdir()
    tag(config(folder, labels_file, real))
    link.symlink_to(real)
    make_folder(folder / "new", 1, seed=5)
    tag(config(folder, labels_file, link))
    assert link.is_symlink() and pq.read_table(real).num_rows == 3


def test_a_new_threshold_says_the_rows_were_scored_again(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 3)
    tag(config(folder, labels_file, out))
    result = cli(folder, labels_file, out, "--threshold", "0.9")
    assert result.exit_code == 0
    assert "nothing to tag, 3 carried rows scored again" in result.output


def test_a_killed_runs_half_written_part_is_cleaned_up(tmp_path):
    from omni_cli.output.sink import partial_dir
    from omni_cli.output.sink import schema as make_schema

    out = tmp_path / "tags.parquet"
    folder = partial_dir(out)
    folder.mkdir()
    (folder / ".part-000003.tmp").write_bytes(b"half")
    Sink(out, make_schema(1, embeddings=False, metadata={})).close()
    assert not (folder / ".part-000003.tmp").exists()


def test_verify_retags_a_file_rewritten_with_its_size_and_mtime_restored(
    tmp_path,
    labels_file,
    opened,  # noqa: F811
):
    from .conftest import shape_image

    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 2)
    victim = folder / "victim.bmp"  # a BMP's size depends on its width and height alone
    shape_image("red circle", seed=1).save(victim)
    tag(config(folder, labels_file, out, verify=True))
    assert (tmp_path / "tags.parquet.hashes").exists()
    assert rows_by_path(out)["victim.bmp"]["top_labels"][0] == "red circle"
    stat = victim.stat()
    shape_image("blue triangle", seed=2).save(victim)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size
    opened.clear()
    plain = tag(config(folder, labels_file, out))  # size and mtime alone: nothing changed
    assert plain.unchanged and opened == []
    checked = tag(config(folder, labels_file, out, verify=True))
    assert opened == ["victim.bmp"] and checked.tagged == 1
    assert rows_by_path(out)["victim.bmp"]["top_labels"][0] == "blue triangle"
    opened.clear()
    assert tag(config(folder, labels_file, out, verify=True)).unchanged and opened == []
