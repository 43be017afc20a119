"""Usage mistakes: every malformed option of every command is one line and exit 2, answered
without importing torch; and the small things a user notices (help, formats, warnings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.errors import ModelError
from omni_cli.model import hub

from .conftest import MODEL

runner = CliRunner()


@pytest.fixture
def setup(tmp_path, labels_file):
    photos = tmp_path / "photos"
    photos.mkdir()
    out = tmp_path / "t.parquet"
    out.write_bytes(b"")
    return {"photos": str(photos), "labels": str(labels_file), "out": str(out),
            "tmp": str(tmp_path)}  # fmt: skip


TAG = ["tag", "{photos}", "--labels", "{labels}", "-o", "{tmp}/new.parquet", "--model", str(MODEL)]
MALFORMED = [
    *[(TAG, opt) for opt in (
        ["--batch", "abc"], ["--batch", "1.5"], ["--batch", "0"], ["--device", "gpu0"],
        ["--precision", "fp8"], ["--tiles", "0x3"], ["--tiles", "3x0"], ["--tiles", "40x40"],
        ["--tiles", "big"], ["--tile-overlap", "2"], ["--decode", "fast"],
        ["--max-gpu-memory", "lots"], ["--workers", "-1"], ["--workers", "x"],
        ["--top-k", "-1"], ["--top-k", "abc"], ["--threshold", "2"], ["--max-pixels", "0"],
        ["--flush-rows", "0"], ["--engine", "spark"], ["--ray-address", "h:1"],
        ["--template", "no placeholder"], ["--exact", "--decode", "gpu"], ["--nope"],
        ["-o", "{tmp}"], ["-o", "{tmp}/out.csv"], ["--recursive", "maybe"])],
    *[(["bench", "--device", "cpu"], opt) for opt in (
        ["--batch", "abc"], ["--device", "x"], ["--precision", "fp8"], ["--tiles", "0x3"],
        ["--tile-overlap", "1"], ["--resolution", "huge"], ["--synthetic", "0"],
        ["--decode", "fast"], ["--repeat", "0"], ["--workers", "-1"], ["--images", "{out}"])],
    *[(["vram", "--model", str(MODEL), "--device", "cpu"], opt) for opt in (
        ["--precision", "fp8"], ["--budget", "lots"], ["--batch", "abc"], ["--batch", "1,0"],
        ["--image", "foo"], ["--tiles", "0x3"], ["--tiles", "3x0"], ["--tiles", "40x40"],
        ["--tile-overlap", "5"], ["--device", "mps"])],
    *[(["report", "{out}"], opt) for opt in (["--per-label", "0"], ["--per-label", "x"])],
    *[(["search", "{out}", "a red circle"], opt) for opt in (
        ["-k", "0"], ["--device", "x"], ["--image", "{tmp}/none.jpg"])],
]  # fmt: skip


@pytest.mark.parametrize("command,option", MALFORMED, ids=lambda v: " ".join(v)[:40])
def test_every_malformed_option_is_one_line_and_exit_2(setup, command, option):
    args = [a.format(**setup) for a in (*command, *option)]
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (args, result.output)
    assert len(lines) == 1 and lines[0].startswith("omni: error: "), result.output
    assert "internal error" not in result.output and "Traceback" not in result.output


def test_usage_errors_help_and_version_answer_before_torch(tmp_path, labels_file):
    script = (
        "import sys\n"
        "from omni_cli.cli import app\n"
        "for args in (['--version'], ['tag', '--help'], ['vram', '--help'], ['search', '--help'],"
        " ['tag', '.', '-l', 'x', '--batch', 'abc'], ['vram', '--tiles', '0x3'],"
        " ['bench', '--resolution', 'huge']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, 2), (args, exc.code)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_help_reads_plainly():
    text = runner.invoke(app, ["tag", "--help"], terminal_width=200).output
    assert "[ray]" in text  # not eaten as markup
    assert "<bool>" not in text and "list[Path]" not in text and "{paths}" not in text
    assert "--model" in text and "--device" in text and "--precision" in text
    assert "none (the label alone)" in text  # --template none is documented
    assert "Views per encoder forward" in text  # --batch means one thing everywhere


def test_vram_prints_whole_numbers_and_a_whole_table_without_a_terminal():
    from omni_cli.tools.vram import human

    assert human(1000 * 1024) == "1000 KiB" and human(1023 * 1024) == "1023 KiB"
    assert human(1.5 * 2**30) == "1.5 GiB"
    result = runner.invoke(app, ["vram", "--model", "random:vit-b-32", "--device", "cpu",
                                 "--budget", "8GiB", "--tiles", "auto"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "e+" not in result.output and "most views/forward" in result.output
    assert "…" not in result.output  # nothing truncated


def test_bench_explains_only_the_rows_it_shows(tmp_path):
    args = ["bench", "--model", str(MODEL), "--device", "cpu", "--synthetic", "4",
            "--resolution", "320x240", "--workers", "0"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "naive loop" not in result.output and "end to end" in result.output


def test_offline_hub_fails_at_once_and_says_what_to_do(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.HUB_TIMEOUT: False)
    monkeypatch.setattr(hub, "snapshot", lambda model, revision=None: None)
    with pytest.raises(ModelError) as caught:
        hub.resolve("openai/clip-vit-base-patch32")
    message = str(caught.value)
    assert "cannot reach the Hugging Face hub" in message
    assert "local folder" in message and "HF_HUB_OFFLINE=1" in message
    monkeypatch.setattr(hub, "snapshot", lambda model, revision=None: Path("abc123"))
    source = hub.resolve("openai/clip-vit-base-patch32")
    assert source.name == "openai/clip-vit-base-patch32" and source.local_only
    # a cached copy loads offline, without the hub client's retries


def test_auto_precision_says_why_and_fp16_on_a_cpu_warns(tmp_path, images, labels_file):
    base = ["tag", str(tmp_path / "photos"), "--labels", str(labels_file), "--model", str(MODEL),
            "--device", "cpu", "--workers", "0"]  # fmt: skip
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "a.parquet")])
    assert "omni: precision auto -> " in result.output
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "b.parquet"), "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    assert "warning: fp16 on a CPU is emulated and slow" in result.output
