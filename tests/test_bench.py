"""`omni bench` through the CLI: a table for people, JSON with every stage for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.tools.bench import bench_runtimes

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-clip"


def test_bench_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(FIXTURE), "--device", "cpu", "--synthetic", "16",
            "--resolution", "320x240", "--batch", "8", "--workers", "0", "--baseline",
            "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "omni bench" in result.output and "machine:" in result.output
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "settings", "stages", "memory_kind", "omni_version"}
    # beside eager's encoder, the runtime `tag --runtime auto` takes here, if not eager
    auto = bench_runtimes("auto", torch.device("cpu"), data["settings"]["precision"])
    assert set(data["stages"]) == {"decode:cpu", "encoder", "tag:cpu", "baseline"} | {
        f"encoder:{name}" for name in auto}  # fmt: skip
    assert data["settings"]["decode"] == "cpu"  # no GPU: the only mode
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    assert data["settings"]["images"] == 16
    for stage in data["stages"].values():
        assert stage["images"] == 16
        assert stage["images_per_second"] > 0
        assert stage["peak_memory"] > 0
        assert stage["share"] > 0
    assert data["stages"]["encoder"]["share"] == 1.0
    for name in auto:
        assert data["stages"][f"encoder:{name}"]["parity"] < 0.02


def test_bench_rejects_bad_resolution():
    result = CliRunner().invoke(app, ["bench", "--resolution", "huge"])
    assert result.exit_code == 2
    assert "--resolution" in result.output
