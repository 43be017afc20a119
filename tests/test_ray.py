"""The Ray engine: same rows as the local engine, and fast failures before any work.

One local Ray cluster (2 CPUs) serves the whole module; the engine reuses a session it finds.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.config import ModelConfig, TagConfig
from omni_cli.output.layout import metadata
from omni_cli.pipeline import tag
from omni_cli.ray_engine import placement

from .conftest import MODEL

ray = pytest.importorskip("ray")

EXACT = ["root", "path", "status", "error", "bytes", "mtime_ns", "width", "height", "views"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ray-cache")
    # Short: Ray's socket paths must stay under the Unix limit of 107 bytes.
    temp = tempfile.mkdtemp(prefix="omni-ray-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp,
        runtime_env={"env_vars": {"OMNI_CACHE_DIR": str(cache)}},
    )
    yield
    ray.shutdown()


@pytest.fixture
def folder(tmp_path, images):
    """The conftest images (every format) plus files that cannot be read."""
    photos = tmp_path / "photos"
    (photos / "bad").mkdir()
    (photos / "bad" / "notes.jpg").write_text("not an image")
    (photos / "bad" / "empty.png").write_bytes(b"")
    whole = (photos / "red_circle.jpg").read_bytes()
    (photos / "bad" / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    return photos


def config(folder, labels_file, out, **kw):
    model = ModelConfig(model=str(MODEL), device="cpu", precision="fp32", batch=4)
    return TagConfig(
        inputs=(folder,), labels_file=labels_file, output=out, workers=0, model=model, **kw
    )


def test_same_rows_as_local_engine(cluster, folder, labels_file, tmp_path):
    from omni_cli.ray_engine import tag_ray

    events = []
    local = tag(config(folder, labels_file, tmp_path / "local.parquet"))
    remote = tag_ray(config(folder, labels_file, tmp_path / "ray.parquet"), events.append)
    assert (remote.files, remote.tagged, sorted(remote.errors)) == (
        local.files,
        local.tagged,
        sorted(local.errors),
    )
    assert len(remote.errors) == 3 and remote.exit_code == 3
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert a.schema.equals(b.schema, check_metadata=False)
    meta_a, meta_b = (metadata(tmp_path / f"{n}.parquet") for n in ("local", "ray"))
    meta_a.pop("created"), meta_b.pop("created")
    # each engine encodes the content-free images itself: the baselines agree to float noise
    base_a, base_b = meta_a.pop("score_baseline"), meta_b.pop("score_baseline")
    np.testing.assert_allclose(base_a, base_b, atol=1e-6)
    assert meta_a == meta_b
    assert a.select(EXACT).to_pylist() == b.select(EXACT).to_pylist()  # row for row
    assert a["top_labels"].to_pylist() == b["top_labels"].to_pylist()
    ok = [s == "ok" for s in a["status"].to_pylist()]
    assert ok == [s == "ok" for s in b["status"].to_pylist()]
    for column in ("similarity", "probs", "scores"):
        got = np.array([x for x, good in zip(b[column].to_pylist(), ok, strict=True) if good])
        want = np.array([x for x, good in zip(a[column].to_pylist(), ok, strict=True) if good])
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [e.stage for e in events][:2] == ["scan", "model"]
    assert events[-1].stage == "finish" and events[-1].done == local.files

    # An unchanged rerun follows the local engine's incremental rules: nothing to do, so no
    # cluster; after a change, the changed file and the error rows are tried again.
    again = tag_ray(config(folder, labels_file, tmp_path / "ray.parquet"))
    assert again.unchanged and (again.tagged, again.carried) == (0, local.files)
    first = sorted(folder.glob("*.png"))[0]
    first.write_bytes(first.read_bytes())  # same pixels, a new mtime
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 10**9))
    again = tag_ray(config(folder, labels_file, tmp_path / "ray.parquet"))
    assert (again.tagged + again.failed, again.carried) == (4, local.files - 4)


def test_cuda_on_cpu_cluster_fails_fast(cluster, folder, labels_file, tmp_path):
    out = tmp_path / "tags.parquet"
    args = ["tag", str(folder), "-l", str(labels_file), "-o", str(out), "--model", str(MODEL)]
    started = time.monotonic()
    result = CliRunner().invoke(app, [*args, "--engine", "ray", "--device", "cuda"])
    assert time.monotonic() - started < 15
    assert result.exit_code == 2, result.output
    assert "--device cuda: the Ray cluster has no GPUs" in result.output
    assert not out.exists()


def test_unreachable_address_fails_fast(folder, labels_file, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "tags.parquet"
    args = ["tag", str(folder), "-l", str(labels_file), "-o", str(out), "--engine", "ray"]
    started = time.monotonic()
    result = CliRunner().invoke(app, [*args, "--ray-address", f"127.0.0.1:{port}"])
    assert time.monotonic() - started < 10
    assert result.exit_code == 1, result.output
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in result.output
    assert not out.exists()


def test_ray_options_need_the_ray_engine(folder, labels_file):
    args = ["tag", str(folder), "-l", str(labels_file), "--ray-address", "127.0.0.1:6379"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "need --engine ray" in result.output


def test_placement():
    gpu = placement({"CPU": 32.0, "GPU": 4.0}, "auto")
    assert (gpu.device, gpu.actors, gpu.num_gpus) == ("cuda", 4, 1)
    cpu = placement({"CPU": 16.0}, "auto")
    assert (cpu.device, cpu.actors, cpu.num_gpus) == ("cpu", 8, 0) and 0 < cpu.num_cpus < 1
    assert placement({"CPU": 32.0, "GPU": 4.0}, "cpu").device == "cpu"
