"""`omni vram`: exact weight memory, views with tiles, the batch that fits, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.config import ALL_PRECISIONS, ModelConfig, parse_bytes
from omni_cli.errors import UsageError
from omni_cli.model.loading import load_encoder
from omni_cli.tools import vram

from .conftest import MODEL

CPU = torch.device("cpu")
runner = CliRunner()


@pytest.mark.parametrize("text,expected", [("8GiB", 8 << 30), ("8GB", 8 * 10**9), ("8G", 8 << 30),
                                           ("512MiB", 512 << 20), ("1000", 1000)])  # fmt: skip
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["eight", "8XB", "0", ""])
def test_parse_bytes_rejects(text):
    with pytest.raises(UsageError, match="--budget"):
        parse_bytes(text)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "nf4"])
def test_weight_memory_is_exact_from_the_meta_model(precision):
    meta = vram.meta_model(vram.model_config(str(MODEL)))
    assert all(p.device.type == "meta" for p in meta.parameters())
    loaded = load_encoder(ModelConfig(model=str(MODEL), device="cpu", precision=precision))
    assert vram.weight_bytes(meta, precision, CPU) == vram.model_bytes(loaded.model)


def test_views_with_auto_tiles_on_4k():
    # global view + 3 whole-image squares + 6 x 10 tiles of 527 px
    assert vram.views_per_image("auto", (3840, 2160), 0.3, 224) == 1 + 3 + 60
    assert vram.views_per_image("off", (3840, 2160), 0.3, 224) == 1
    assert vram.views_per_image("auto", (1024, 768), 0.3, 224) == 1


def test_json_report_fits_the_budget():
    result = runner.invoke(app, ["vram", "--model", str(MODEL), "--budget", "64MiB", "--json",
                                 "--device", "cpu", "--precision", "fp32,bf16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["budget"] == 64 << 20 and report["budget_source"] == "--budget"
    for row in report["rows"]:
        room = 64 * 2**20 * (1 - vram.HEADROOM) - row["weights"]
        assert row["max_batch"] == int(room // row["activation_per_view"]) > 0
        assert not row["needs_offload"]


def test_big_model_on_small_budget_needs_offload():
    cfg = vram.VramConfig(model="random:vit-l-14", precisions=("fp32", "nf4"), budget=1 << 30,
                          device="cpu", tiles="auto")  # fmt: skip
    rows = {r.precision: r for r in vram.estimate(cfg).rows}
    assert rows["fp32"].offload and rows["fp32"].max_batch == 0
    assert not rows["nf4"].offload and rows["nf4"].weights < 400 << 20


def test_measured_peak_within_15_percent_of_estimate():
    cfg = vram.VramConfig(model=str(MODEL), precisions=("fp32",), batches=(16,), device="cpu",
                          measure=True)  # fmt: skip
    row = vram.estimate(cfg).rows[0]
    assert 0.85 < row.estimates[16] / row.measured[16] < 1.15


def test_table_output_names_precisions():
    result = runner.invoke(app, ["vram", "--model", "random:vit-b-32", "--budget", "8GiB",
                                 "--device", "cpu", "--tiles", "auto"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "95 views per image" in result.output
    for precision in ALL_PRECISIONS:
        assert precision in result.output


@pytest.mark.parametrize("args,message", [
    (["--budget", "lots"], "--budget must be a size"),
    (["--precision", "fp64"], "--precision must be all or some of"),
    (["--tiles", "big"], "--tiles must be off, auto or RxC"),
    (["--model", "/nonexistent/model"], "model not found"),
])  # fmt: skip
def test_bad_options_exit_with_a_message(args, message):
    result = runner.invoke(app, ["vram", "--device", "cpu", *args])
    assert result.exit_code in (1, 2)
    assert message in result.output
