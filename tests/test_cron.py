"""Cron safety: incremental reruns, crash and SIGTERM resume, the lock, and the bad-file zoo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
from omni_cli.errors import Interrupted
from omni_cli.inputs import decode
from omni_cli.output.lock import OutputLock
from omni_cli.pipeline import tag
from omni_cli.tools import synthetic

from .conftest import LABELS, MODEL, omni_tag

# Runs `omni` with every encoder forward slowed down, so a test can interrupt it mid-run.
SLOW_OMNI = (
    "import sys, time; import omni_cli.model.encoder as e; f = e.Encoder.forward; "
    "e.Encoder.forward = lambda self, x: (time.sleep(0.25), f(self, x))[1]; "
    "from omni_cli.cli import app; sys.argv[0] = 'omni'; app()"
)


def make_folder(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        synthetic.draw(label, (200, 160), rng=rng).save(folder / f"img{i:03d}.jpg", quality=85)


def config(folder, labels_file, out, **kw):
    return TagConfig(
        inputs=(folder,),
        labels_file=labels_file,
        output=out,
        workers=0,
        model=ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=4),
        **kw,
    )


@pytest.fixture
def opened(monkeypatch):
    """Counts the files decoded in this process."""
    calls = []
    original = decode.load

    def counting(path, spec):
        calls.append(os.path.basename(path))
        return original(path, spec)

    monkeypatch.setattr(decode, "load", counting)
    return calls


def rows_by_path(out):
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def test_unchanged_rerun_opens_no_image(tmp_path, labels_file, opened):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 12)
    first = tag(config(folder, labels_file, out))
    assert first.tagged == 12 and len(opened) == 12
    before = rows_by_path(out)
    opened.clear()
    second = tag(config(folder, labels_file, out))
    assert opened == [] and second.tagged == 0 and second.carried == 12
    assert rows_by_path(out) == before


def test_add_modify_delete_changes_exactly_those_rows(tmp_path, labels_file, opened):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 10)
    tag(config(folder, labels_file, out))
    before = rows_by_path(out)
    synthetic.draw("blue square", (200, 160), rng=np.random.default_rng(9)).save(folder / "new.jpg")
    synthetic.draw("green triangle", (210, 160), rng=np.random.default_rng(8)).save(
        folder / "img003.jpg"
    )
    (folder / "img005.jpg").unlink()
    opened.clear()
    result = tag(config(folder, labels_file, out))
    assert sorted(opened) == ["img003.jpg", "new.jpg"]
    assert result.tagged == 2 and result.carried == 8
    after = rows_by_path(out)
    assert set(after) == set(before) - {"img005.jpg"} | {"new.jpg"}
    assert after["new.jpg"]["top_labels"][0] == "blue square"
    assert after["img003.jpg"]["top_labels"][0] == "green triangle"
    assert after["img003.jpg"]["width"] == 210
    for name in set(after) - {"new.jpg", "img003.jpg"}:
        assert after[name] == before[name]


def test_changed_settings_or_full_retag_everything(tmp_path, labels_file, opened):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 4)
    tag(config(folder, labels_file, out))
    opened.clear()
    tag(config(folder, labels_file, out, template="a picture of a {}."))
    assert len(opened) == 4
    opened.clear()
    tag(config(folder, labels_file, out, template="a picture of a {}.", full=True))
    assert len(opened) == 4


def start_slow(tmp_path, labels_file, out, *extra):
    args = [
        sys.executable,
        "-c",
        SLOW_OMNI,
        "tag",
        str(tmp_path / "photos"),
        "--labels",
        str(labels_file),
        "-o",
        str(out),
        "--model",
        str(MODEL),
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--batch",
        "2",
        "--flush-rows",
        "2",
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_parts(out, n, proc, timeout=60):
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list(partial.glob("part-*.parquet"))) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no parts were flushed")


def flushed_rows(out):
    partial = out.with_name(out.name + ".partial")
    return sum(pq.read_metadata(p).num_rows for p in partial.glob("part-*.parquet"))


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)]
)
def test_interrupted_run_resumes_with_every_file_once(tmp_path, labels_file, opened, sig, code):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 30)
    reference = tmp_path / "reference.parquet"
    tag(config(folder, labels_file, reference))
    opened.clear()
    proc = start_slow(tmp_path, labels_file, out)
    wait_for_parts(out, 3, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert not out.exists()
    done = flushed_rows(out)
    assert 6 <= done < 30
    if sig != signal.SIGKILL:  # says what it saved, and how to go on
        what = "terminated" if sig == signal.SIGTERM else "interrupted"
        assert f"omni: error: {what}: {done:,} finished rows are saved" in stderr, stderr
        assert "rerun the same command to resume" in stderr
    result = tag(config(folder, labels_file, out))
    assert len(opened) == 30 - done  # only the unflushed files are decoded again
    assert result.carried == done and result.files == 30
    rows, expected = rows_by_path(out), rows_by_path(reference)
    assert sorted(rows) == sorted(expected)  # every file exactly once
    assert len(pq.read_table(out)) == 30
    for name, row in rows.items():
        assert np.allclose(row["similarity"], expected[name]["similarity"], atol=1e-6)
    assert not out.with_name(out.name + ".partial").exists()


def test_second_run_on_the_same_output_is_refused(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 2)
    out.write_bytes(b"previous output")
    with OutputLock(out):
        result = omni_tag(folder, "--labels", labels_file, "-o", out, "--model", MODEL)
    assert result.exit_code == 4
    assert f"(pid {os.getpid()}) is writing {out}" in result.output
    assert out.read_bytes() == b"previous output"
    assert not out.with_name(out.name + ".partial").exists()
    # The lock is released on exit; a lock file left by a dead process does not block.
    out.with_name(out.name + ".lock").write_text("99999999\n")
    assert tag(config(folder, labels_file, out, full=True)).files == 2


def test_bad_input_zoo(tmp_path, labels_file, monkeypatch):
    folder, out = tmp_path / "zoo", tmp_path / "tags.parquet"
    make_folder(folder, 4)
    good = (folder / "img000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.webp").write_bytes(os.urandom(3000))
    (folder / "header_only.jpg").write_bytes(good[:20])
    Image.new("L", (4000, 4000)).save(folder / "bomb.png")
    os.symlink(folder / "nowhere.jpg", folder / "dangling.jpg")
    os.symlink(folder, folder / "loop")
    os.mkfifo(folder / "fifo.jpg")
    undecodable = os.fsencode(str(folder)) + b"/caf\xe9.jpg"
    with open(undecodable, "wb") as f:
        f.write(good)
    (folder / "vanishes.jpg").write_bytes(good)
    original = decode.load

    def vanish_first(path, spec):  # the file disappears between listing and decoding
        if path.endswith("vanishes.jpg"):
            os.unlink(path)
        return original(path, spec)

    monkeypatch.setattr(decode, "load", vanish_first)
    result = omni_tag(folder, "--labels", labels_file, "-o", out, "--model", MODEL,
                      "--workers", 0, "--max-pixels", 10_000_000, "--batch", 3)  # fmt: skip
    assert result.exit_code == 3, result.output
    rows = rows_by_path(out)
    assert {k: v["error"] for k, v in rows.items() if v["status"] == "error"} == {
        "truncated.jpg": "truncated JPEG",
        "empty.png": "empty file",
        "garbage.webp": "not an image",
        "header_only.jpg": "truncated JPEG",
        "bomb.png": "too many pixels (4000x4000 > 10,000,000)",
        "dangling.jpg": "broken symlink",
        "fifo.jpg": "not a regular file",
        "vanishes.jpg": "file vanished",
    }
    ok = {k for k, v in rows.items() if v["status"] == "ok"}
    assert ok == {"img000.jpg", "img001.jpg", "img002.jpg", "img003.jpg", "caf\\xe9.jpg"}
    for k in ok - {"caf\\xe9.jpg"}:
        assert rows[k]["top_labels"][0] == LABELS[int(k[3:6]) % len(LABELS)]


def test_new_labels_rescore_from_stored_embeddings_without_decoding(tmp_path, labels_file, opened):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 9)
    tag(config(folder, labels_file, out, save_embeddings=True))
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("red circle\ngreen square\nblue triangle\nred square\n")
    opened.clear()
    result = tag(config(folder, fewer, out, save_embeddings=True, top_k=2, threshold=0.0))
    assert opened == [] and result.carried == 9
    rescored = rows_by_path(out)
    fresh = tmp_path / "fresh.parquet"
    tag(config(folder, fewer, fresh, save_embeddings=True, top_k=2, threshold=0.0))
    for name, row in rows_by_path(fresh).items():
        # stored embeddings are float16: scores agree to that precision
        assert np.allclose(rescored[name]["similarity"], row["similarity"], atol=2e-3)
        assert np.allclose(rescored[name]["scores"], row["scores"], atol=2e-3)
        assert rescored[name]["top_labels"] == row["top_labels"] and len(row["top_labels"]) == 2
    # Without stored embeddings new labels mean a full run.
    plain = tmp_path / "plain.parquet"
    tag(config(folder, labels_file, plain))
    opened.clear()
    tag(config(folder, fewer, plain))
    assert len(opened) == 9


def test_new_top_k_applies_to_carried_rows(tmp_path, labels_file, opened):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 3)
    tag(config(folder, labels_file, out, top_k=5))
    opened.clear()
    tag(config(folder, labels_file, out, top_k=1))
    assert opened == []
    assert all(len(r["top_labels"]) == 1 for r in rows_by_path(out).values())


def test_overlapping_inputs_list_each_file_once(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 3)
    make_folder(folder / "scans", 2, seed=1)
    os.link(folder / "img000.jpg", folder / "scans" / "same-file.jpg")
    cfg = config(folder, labels_file, out)
    cfg = TagConfig(**{**cfg.__dict__, "inputs": (folder, folder / "scans", folder / "img001.jpg")})
    result = tag(cfg)
    rows = pq.read_table(out).to_pylist()
    assert result.files == len(rows) == 5  # 3 + 2 scans; the hard link is img000 again
    assert sorted(r["path"] for r in rows) == [
        "img000.jpg",
        "img001.jpg",
        "img002.jpg",
        "scans/img000.jpg",
        "scans/img001.jpg",
    ]


def test_a_previous_output_made_differently_is_refused_not_replaced(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 3)
    base = [folder, "--labels", labels_file, "-o", out, "--model", MODEL, "--workers", 0,
            "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert omni_tag(*base, "--tiles", "2x2", "--save-embeddings").exit_code == 0
    before = out.read_bytes()
    (folder / "img001.jpg").unlink()  # something changed, so the run has work to do
    result = omni_tag(*base)
    assert result.exit_code == 2, result.output
    assert "was made differently (tiles 2x2 -> off)" in result.output
    assert "nothing was touched" in result.output and "--full" in result.output
    assert out.read_bytes() == before and not out.with_name(out.name + ".partial").exists()
    result = omni_tag(*base, "--precision", "bf16", "--tiles", "2x2", "--save-embeddings")
    assert result.exit_code == 2 and "precision fp32 -> bf16" in result.output
    assert omni_tag(*base, "--full").exit_code == 0
    assert len(pq.read_table(out)) == 2 and pq.read_table(out)["views"].to_pylist() == [1, 1]


def test_an_interrupted_run_made_differently_is_refused(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 30)
    proc = start_slow(tmp_path, labels_file, out)
    wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    parts = sorted(out.with_name(out.name + ".partial").glob("part-*.parquet"))
    result = omni_tag(folder, "--labels", labels_file, "-o", out, "--model", MODEL,
                      "--workers", 0, "--precision", "fp32", "--tiles", "2x2")  # fmt: skip
    assert result.exit_code == 2 and "interrupted run's rows" in result.output
    assert sorted(out.with_name(out.name + ".partial").glob("part-*.parquet")) == parts
    assert tag(config(folder, labels_file, out, decode=DecodeConfig(tiles="2x2"),
                      full=True)).files == 30  # fmt: skip


def test_an_unreadable_part_stops_the_run_and_stays(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 2)
    partial = out.with_name(out.name + ".partial")
    partial.mkdir()
    (partial / "part-000000.parquet").write_bytes(b"PAR1 not really")
    result = omni_tag(folder, "--labels", labels_file, "-o", out, "--model", MODEL)
    assert result.exit_code == 1 and "cannot read an interrupted run's rows" in result.output
    assert (partial / "part-000000.parquet").read_bytes() == b"PAR1 not really"
    assert not out.exists()


def _state(out):
    """What a no-change run must leave as it is: the bytes and mtime of every file of `out`."""
    files = sorted(out.iterdir()) if out.is_dir() else [out]
    return [(f.name, f.read_bytes(), f.stat().st_mtime_ns) for f in files], os.path.realpath(out)


@pytest.mark.parametrize("name", ["tags.parquet", "tags"])
def test_nothing_changed_imports_no_torch_and_leaves_the_output_as_it_was(
    tmp_path, labels_file, name
):
    folder, out = tmp_path / "photos", tmp_path / name
    make_folder(folder, 4)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    tag(config(folder, labels_file, out))
    before = _state(out)
    script = (
        "import sys\n"
        "from omni_cli.cli import app\n"
        "try:\n"
        f"    app(['tag', {str(folder)!r}, '-l', {str(labels_file)!r}, '-o', {str(out)!r},"
        f" '--model', {str(MODEL)!r}, '--workers', '0', '--device', 'cpu', '--precision',"
        " 'fp32', '--batch', '4'])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr  # the broken file is still listed
    assert "nothing changed since the last run (1 error row kept)" in done.stdout
    assert _state(out) == before
    # Anything else to do, and the error row is tried again with the new file.
    make_folder(folder / "more", 1)
    result = tag(config(folder, labels_file, out))
    assert (result.tagged, result.failed, result.carried) == (1, 1, 4)


def test_summary_counts_failures_apart(tmp_path, labels_file):
    folder, out = tmp_path / "photos", tmp_path / "deep" / "er" / "tags.parquet"
    make_folder(folder, 4)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    result = omni_tag(folder, "--labels", labels_file, "-o", out, "--model", MODEL, "--workers", 0)
    assert result.exit_code == 3, result.output
    assert "omni: 5 files, 4 tagged, 1 failed" in result.output
    assert out.is_file()  # the missing folders were made


def test_an_interrupted_finish_leaves_no_tmp_and_the_old_output(tmp_path, labels_file, monkeypatch):
    folder, out = tmp_path / "photos", tmp_path / "tags.parquet"
    make_folder(folder, 3)
    tag(config(folder, labels_file, out))
    before = out.read_bytes()
    make_folder(folder / "new", 1)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    from omni_cli.output import layout

    monkeypatch.setattr(layout, "_write_group", interrupted)  # while writing OUT.tmp
    with pytest.raises(Interrupted, match="while writing .*left as it was.*1 row are saved"):
        tag(config(folder, labels_file, out))
    assert out.read_bytes() == before
    assert not out.with_name(out.name + ".tmp").exists()
    monkeypatch.undo()
    result = tag(config(folder, labels_file, out))  # the rerun finishes from the saved rows
    assert result.files == 4 and result.tagged == 0


def test_a_sink_interrupted_while_handing_rows_over_never_writes_them_twice(tmp_path):
    from omni_cli.output.sink import Sink, read_parts
    from omni_cli.output.sink import schema as make_schema

    out = tmp_path / "tags.parquet"
    sink = Sink(out, make_schema(1, embeddings=False, metadata={}), part_rows=2)
    real_put = sink._queue.put
    calls = []

    def put(item, *args, **kwargs):
        calls.append(item)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during the hand-over
        return real_put(item, *args, **kwargs)

    sink._queue.put = put
    with pytest.raises(KeyboardInterrupt):
        sink.write(tag_rows(2))  # f0, f1: lost in the hand-over, so tagged again on a rerun
    sink.write(tag_rows(2, start=2))
    sink.close()
    paths = [p for b in read_parts(sink.folder) for p in b["path"].to_pylist()]
    assert paths == ["f2", "f3"]  # once each; none twice


def tag_rows(n, start=0):
    import pyarrow as pa

    from omni_cli.output.sink import schema as make_schema

    names = [f"f{i}" for i in range(start, start + n)]
    columns = {"root": ["r"] * n, "path": names, "status": ["ok"] * n, "error": [None] * n,
               "bytes": [1] * n, "mtime_ns": [1] * n, "width": [1] * n, "height": [1] * n,
               "views": [1] * n, "similarity": [[0.5]] * n, "probs": [[1.0]] * n,
               "scores": [[0.5]] * n, "top_labels": [["a"]] * n,
               "top_scores": [[1.0]] * n}  # fmt: skip
    schema = make_schema(1, embeddings=False, metadata={})
    return pa.RecordBatch.from_pydict({k: columns[k] for k in schema.names}, schema=schema)
