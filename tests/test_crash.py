"""A file that crashes or hangs its decoder costs its own row, never the run (issue #18).

The decoder is made to misbehave through a monkeypatched `decode.load`: workers are forked
after the patch, so they inherit it. A file named `crash*` segfaults its process (a real
SIGSEGV, as a broken native decoder would), `hang*` never returns, `flaky*` kills its worker
once (an OOM kill) and decodes fine when retried.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from omni_cli.config import DecodeConfig, ModelConfig, TagConfig
from omni_cli.errors import UsageError
from omni_cli.inputs import decode, isolate
from omni_cli.inputs.loader import make_loader
from omni_cli.inputs.sources import discover
from omni_cli.model import encoder as encoder_module
from omni_cli.pipeline import tag
from omni_cli.tools import synthetic

from .conftest import LABELS, MODEL, omni_tag


def make_folder(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        synthetic.draw(label, (200, 160), rng=rng).save(folder / f"img{i:03d}.jpg", quality=85)


@pytest.fixture
def hostile_decoder(monkeypatch, tmp_path):
    original = decode.load
    marks = tmp_path / "marks"
    marks.mkdir()

    def load(path, spec):
        name = os.path.basename(path)
        if name.startswith("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if name.startswith("hang"):
            time.sleep(3600)
        if name.startswith("flaky") and not (marks / name).exists():
            (marks / name).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
        return original(path, spec)

    monkeypatch.setattr(decode, "load", load)


def config(folder, labels_file, out, workers, **decode_kw):
    return TagConfig(
        inputs=(folder,),
        labels_file=labels_file,
        output=out,
        workers=workers,
        model=ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=4),
        decode=DecodeConfig(**decode_kw),
    )


def rows(out) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def test_crashing_and_hanging_files_become_error_rows_and_the_rest_is_unchanged(
    tmp_path, labels_file, hostile_decoder, monkeypatch
):
    clean, hostile = tmp_path / "clean", tmp_path / "hostile"
    make_folder(clean, 14)
    make_folder(hostile, 14)
    good = (clean / "img000.jpg").read_bytes()
    for name in ("crash_a.jpg", "hang_b.jpg", "flaky_c.jpg"):
        (hostile / name).write_bytes(good)
    expected = rows_of(tag(config(clean, labels_file, tmp_path / "clean.parquet", 0)))
    # Slow forwards: workers die while the main process is busy encoding, not only waiting.
    forward = encoder_module.Encoder.forward
    monkeypatch.setattr(encoder_module.Encoder, "forward",
                        lambda self, x: (time.sleep(0.05), forward(self, x))[1])  # fmt: skip
    for workers in (2, None):  # None: the default; on a small CPU, the lockstep helper
        for mark in (tmp_path / "marks").iterdir():  # flaky_c crashes once per run
            mark.unlink()
        out = tmp_path / f"hostile-{workers}.parquet"
        result = tag(config(hostile, labels_file, out, workers, decode_timeout=2.0))
        check_hostile_run(result, rows(out), expected)


def check_hostile_run(result, got: dict, expected: dict) -> None:
    assert result.failed == 2
    assert got["crash_a.jpg"]["status"] == "error"
    assert got["crash_a.jpg"]["error"] == "crashed the decoder (signal 11, SIGSEGV)"
    assert got["hang_b.jpg"]["error"] == "decoder timed out (after 2 s)"
    assert got["flaky_c.jpg"]["status"] == "ok"  # killed once, fine alone: tagged
    assert got["flaky_c.jpg"]["top_labels"] == got["img000.jpg"]["top_labels"]
    for name, row in expected.items():
        assert got[name]["status"] == "ok", name
        np.testing.assert_allclose(got[name]["similarity"], row["similarity"], atol=1e-6)
        assert got[name]["top_labels"] == row["top_labels"], name


def rows_of(result) -> dict[str, dict]:
    return rows(result.output)


@pytest.mark.parametrize("workers, helper", [(2, False), (0, True)], ids=["workers", "helper"])
def test_the_loader_delivers_every_file_exactly_once_across_deaths(
    tmp_path, hostile_decoder, workers, helper
):
    folder = tmp_path / "f"
    make_folder(folder, 30)
    good = (folder / "img000.jpg").read_bytes()
    for name in ("crash1.jpg", "crash2.jpg", "flaky1.jpg", "hang1.jpg"):
        (folder / name).write_bytes(good)
    entries = list(discover([folder]))
    loader = make_loader(entries, decode.Preprocess(), files=3, workers=workers, timeout=1.0,
                         helper=helper)  # fmt: skip
    seen = [item for batch in loader for item in batch.items]
    names = sorted(item.entry.rel for item in seen)
    assert names == sorted(e.rel for e in entries)  # each once
    errors = {item.entry.rel: item.error for item in seen if item.error}
    assert set(errors) == {"crash1.jpg", "crash2.jpg", "hang1.jpg"}
    assert errors["hang1.jpg"].startswith("decoder timed out")
    assert all(errors[n].startswith("crashed the decoder") for n in ("crash1.jpg", "crash2.jpg"))
    assert 1 <= loader.restarts <= 4  # two workers may die in one round


def test_decode_in_this_process_has_no_alarm():
    """0 workers decode in the main process: the alarm must never be armed there."""
    isolate.arm(0.01)
    time.sleep(0.05)  # the main process is still here


def test_death_reasons():
    assert isolate.death_reason(-11, 60) == "crashed the decoder (signal 11, SIGSEGV)"
    assert isolate.death_reason(-9, 60) == "crashed the decoder (signal 9, SIGKILL)"
    assert isolate.death_reason(3, 60) == "crashed the decoder (exit code 3)"
    assert isolate.death_reason(-signal.SIGALRM, 60) == "decoder timed out (after 60 s)"
    assert isolate.death_reason(None, 2.5) == "decoder timed out (after 2.5 s)"


def test_decode_timeout_is_checked(tmp_path, labels_file):
    with pytest.raises(UsageError, match="--decode-timeout"):
        DecodeConfig(decode_timeout=0)
    result = omni_tag(tmp_path, "--labels", labels_file, "--decode-timeout", "0")
    assert result.exit_code == 2
    assert "--decode-timeout" in result.output


def test_a_file_the_device_rejects_is_decoded_outside_the_main_process(tmp_path, hostile_decoder):
    """The feeder's CPU fallback (a JPEG nvJPEG refused) runs in a process of its own."""
    from omni_cli.inputs.feed import Feeder
    from omni_cli.inputs.loader import Split

    from .test_feed import FakeDecoder

    folder = tmp_path / "f"
    make_folder(folder, 5)
    synthetic.draw(LABELS[0], (200, 160), rng=np.random.default_rng(1)).save(
        folder / "crash_refused.jpg", quality=85, comment=b"REFUSE-ME"
    )
    entries = list(discover([folder]))
    split = Split(0.0)  # every batch to the device
    loader = make_loader(entries, decode.Preprocess(), files=3, workers=0, split=split)
    feeder = Feeder(loader, decode.Preprocess(), torch.device("cpu"), 8,
                    decoder=FakeDecoder(refuse=b"REFUSE-ME"), split=split)  # fmt: skip
    items = {it.entry.rel: it for fed in feeder for it in fed.items}
    assert feeder.fallbacks == 1 and len(items) == 6
    assert items["crash_refused.jpg"].error == "crashed the decoder (signal 11, SIGSEGV)"
    assert all(
        it.error is None and it.views == 1
        for rel, it in items.items()
        if rel != "crash_refused.jpg"
    )


def test_a_worker_that_dies_while_the_loader_starts_costs_one_file(
    tmp_path, hostile_decoder, monkeypatch
):
    """PyTorch hands workers their first files inside the iterator's start and raises a
    registered worker's death from its SIGCHLD handler wherever the main thread is: a file that
    crashes at once must not end the run from there (seen once in CI)."""
    from torch.utils.data import dataloader

    real = dataloader._MultiProcessingDataLoaderIter._reset

    def slow(self, loader, first_iter=False):
        real(self, loader, first_iter)
        time.sleep(2.0)  # the first files are handed out; the crashing worker dies meanwhile

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_reset", slow)
    folder = tmp_path / "f"
    make_folder(folder, 6)
    (folder / "crash0.jpg").write_bytes((folder / "img000.jpg").read_bytes())
    entries = list(discover([folder]))
    loader = make_loader(entries, decode.Preprocess(), files=1, workers=2, timeout=5.0)
    seen = [item for batch in loader for item in batch.items]
    assert sorted(i.entry.rel for i in seen) == sorted(e.rel for e in entries)
    errors = {i.entry.rel: i.error for i in seen if i.error}
    assert list(errors) == ["crash0.jpg"] and errors["crash0.jpg"].startswith("crashed the decoder")
