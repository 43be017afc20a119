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

from omni_cli import decode, synthetic
from omni_cli.config import ModelConfig, TagConfig
from omni_cli.lock import OutputLock
from omni_cli.pipeline import tag

from .conftest import LABELS, MODEL, omni_tag

# Runs `omni` with every encoder forward slowed down, so a test can interrupt it mid-run.
SLOW_OMNI = (
    "import sys, time; import omni_cli.encoder as e; f = e.Encoder._forward; "
    "e.Encoder._forward = lambda self, x: (time.sleep(0.25), f(self, x))[1]; "
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


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, -9), (signal.SIGTERM, 143)])
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
    if sig == signal.SIGTERM:
        assert "terminated" in stderr
    assert not out.exists()
    done = flushed_rows(out)
    assert 6 <= done < 30
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
    assert tag(config(folder, labels_file, out)).files == 2


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
