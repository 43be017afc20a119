"""A model's identity is its weights and preprocessing: local folders, the hub cache, --revision."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.errors import UsageError
from omni_cli.model import archs, hub, identity
from omni_cli.output.layout import metadata

from .conftest import MODEL, omni_tag

REPO = "org/tiny-clip"
C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40


def copy_model(tmp_path, name="model") -> Path:
    folder = tmp_path / name
    shutil.copytree(MODEL, folder)
    return folder


def perturb(weights: Path) -> None:
    """Scale one tensor by 1.01: a valid safetensors file with other weights."""
    with safe_open(str(weights), "np") as f:
        meta = f.metadata()
    tensors = load_file(str(weights))
    name = next(k for k, v in tensors.items() if v.dtype == np.float32 and v.size > 100)
    tensors[name] = tensors[name] * np.float32(1.01)
    save_file(tensors, str(weights), metadata=meta)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_commit(cache: Path, commit: str, files: dict[str, Path], ref: str | None = "main"):
    """A snapshot in a hub cache laid out as huggingface_hub does: files are links to blobs
    (LFS blobs named by their sha256, others by their git sha1), `refs/<ref>` names it."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        if name.endswith(".safetensors"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(Path("..", "..", "blobs", blob))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def model_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding REPO at commit C1 (the fixture model)."""
    cache = tmp_path / "hf"
    add_commit(cache, C1, model_files(MODEL))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def photos(tmp_path, n=3) -> Path:
    folder = tmp_path / "photos"
    if folder.exists():
        return folder
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def tag(tmp_path, labels_file, model, *extra):
    out = tmp_path / "tags.parquet"
    args = [photos(tmp_path), "--labels", labels_file, "-o", out, "--model", model,
            "--workers", 0, "--device", "cpu", "--precision", "fp32", *extra]  # fmt: skip
    return omni_tag(*args), out


def meta(out: Path) -> dict:
    return metadata(out)


# --- the identity itself -------------------------------------------------------------------


def test_identity_follows_the_weights_and_preprocessing_not_the_files_around_them(tmp_path):
    folder = copy_model(tmp_path)
    first = identity.identity(folder)
    assert first == identity.identity(MODEL)  # content, not the path
    weights_part = first.removeprefix("sha256:").partition("+")[0]
    assert sha256(MODEL / "model.safetensors").startswith(weights_part)
    (folder / "README.md").write_text("a new model card\n")
    (folder / "training_summary.json").write_text("{}")
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "9.9.9"  # re-saved by another transformers: same model
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    assert identity.identity(folder) == first

    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["image_mean"] = [0.5, 0.5, 0.5]
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    prep_changed = identity.identity(folder)
    assert prep_changed != first and prep_changed.partition("+")[0] == first.partition("+")[0]
    assert "model preprocessing changed" in identity.changed("m", first, prep_changed)

    perturb(folder / "model.safetensors")
    weights_changed = identity.identity(folder)
    assert weights_changed.partition("+")[0] != first.partition("+")[0]
    assert identity.changed("m", first, weights_changed).startswith("model weights changed")


def test_a_local_folder_is_hashed_once_and_its_hash_kept_by_size_and_mtime(tmp_path):
    folder = copy_model(tmp_path)
    weights = folder / "model.safetensors"
    before = identity.identity(folder)
    st = weights.stat()
    # Same size, same mtime, other bytes: the cached hash answers (what size+mtime cannot see).
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert identity.identity(folder) == before
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert identity.identity(folder) != before


def test_hub_cache_snapshot_is_identified_by_blob_names_through_refs(tmp_path, hub_cache):
    assert hub.snapshot(REPO) == hub_cache / "models--org--tiny-clip" / "snapshots" / C1
    assert hub.identity(REPO) == identity.identity(MODEL)
    # A commit that only edits the model card: same identity.
    card = tmp_path / "README.md"
    card.write_text("# better card\n")
    add_commit(hub_cache, C2, {**model_files(MODEL), "README.md": card})
    assert hub.snapshot(REPO).name == C2 and hub.identity(REPO) == identity.identity(MODEL)
    # New weights: another identity; the old commit, pinned, keeps the old one.
    new = copy_model(tmp_path, "new")
    perturb(new / "model.safetensors")
    add_commit(hub_cache, C3, model_files(new))
    assert hub.identity(REPO) == identity.identity(new) != identity.identity(MODEL)
    assert hub.identity(REPO, C1) == identity.identity(MODEL)
    assert hub.snapshot(REPO, "v9") is None and hub.identity(REPO, "v9") is None


def test_the_hub_cache_is_found_as_huggingface_hub_finds_it(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    add_commit(tmp_path / "hf-home" / "hub", C1, model_files(MODEL))
    assert hub.identity(REPO) == identity.identity(MODEL)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.identity(REPO) is None


def test_weights_are_read_from_blob_names_without_opening_them(tmp_path, hub_cache):
    blob = next((hub_cache / "models--org--tiny-clip" / "blobs").glob("[0-9a-f]" * 64))
    blob.write_bytes(b"not read")  # the name says what it holds: the file is not opened
    assert hub.identity(REPO) == identity.identity(MODEL)


# --- runs: local folders -------------------------------------------------------------------


def test_new_weights_refuse_with_exit_2_and_a_model_card_edit_changes_nothing(
    tmp_path, labels_file
):
    folder = copy_model(tmp_path)
    result, out = tag(tmp_path, labels_file, folder)
    assert result.exit_code == 0, result.output
    assert meta(out)["revision"] == identity.identity(folder)
    (folder / "README.md").write_text("edited card\n")
    result, _ = tag(tmp_path, labels_file, folder)
    assert result.exit_code == 0 and "nothing changed since the last run" in result.output
    before = out.read_bytes()
    perturb(folder / "model.safetensors")
    result, _ = tag(tmp_path, labels_file, folder)
    assert result.exit_code == 2, result.output
    assert "model weights changed" in result.output and "--full" in result.output
    assert "--revision" in result.output and out.read_bytes() == before
    result, _ = tag(tmp_path, labels_file, folder, "--full")
    assert result.exit_code == 0, result.output
    assert meta(out)["revision"] == identity.identity(folder)


# --- runs: the hub cache, offline ----------------------------------------------------------


def test_hub_model_offline_records_its_weights_and_refuses_new_ones(
    tmp_path, labels_file, hub_cache
):
    result, out = tag(tmp_path, labels_file, REPO)
    assert result.exit_code == 0, result.output
    assert meta(out)["revision"] == identity.identity(MODEL)
    card = tmp_path / "README.md"
    card.write_text("# better card\n")
    add_commit(hub_cache, C2, {**model_files(MODEL), "README.md": card})
    result, _ = tag(tmp_path, labels_file, REPO)
    assert result.exit_code == 0 and "nothing changed since the last run" in result.output

    new = copy_model(tmp_path, "new")
    perturb(new / "model.safetensors")
    add_commit(hub_cache, C3, model_files(new))
    result, _ = tag(tmp_path, labels_file, REPO)
    assert result.exit_code == 2 and "model weights changed" in result.output, result.output
    # Pinned to the commit that made the results: they hold (the pin is recorded).
    result, _ = tag(tmp_path, labels_file, REPO, "--revision", C1)
    assert result.exit_code == 0 and "3 unchanged files carried over" in result.output
    assert meta(out)["revision"] == identity.identity(MODEL)
    assert meta(out)["request"]["model_revision"] == C1
    result, _ = tag(tmp_path, labels_file, REPO, "--revision", C1)
    assert result.exit_code == 0 and "nothing changed since the last run" in result.output


def test_a_pin_that_is_not_cached_offline_is_a_usage_error(tmp_path, labels_file, hub_cache):
    result, out = tag(tmp_path, labels_file, REPO, "--revision", "v2")
    assert result.exit_code == 2 and "not in the local Hugging Face cache" in result.output
    assert "at revision v2" in result.output and not out.exists()
    result, _ = tag(tmp_path, labels_file, "other/model")
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in result.output


# --- outputs of older omni versions ----------------------------------------------------------


def legacy(out: Path, revision) -> None:
    """Rewrite `out` as an older omni recorded it: the model by commit, `unknown` or a stamp."""
    table = pq.read_table(out)
    m = metadata(out)
    m["revision"] = m["request"]["revision"] = revision
    m["request"].pop("model_revision", None)
    pq.write_table(table.replace_schema_metadata({b"omni": json.dumps(m).encode()}), out)


def test_older_outputs_carry_over_when_their_weights_can_be_checked(
    tmp_path, labels_file, hub_cache
):
    result, out = tag(tmp_path, labels_file, REPO)
    assert result.exit_code == 0
    legacy(out, C1)  # the commit whose snapshot is still cached: same weights, checked
    result, _ = tag(tmp_path, labels_file, REPO)
    assert result.exit_code == 0 and "3 unchanged files carried over" in result.output
    assert meta(out)["revision"] == identity.identity(MODEL)
    legacy(out, "unknown")  # an offline run of an older omni: the weights cannot be checked
    result, _ = tag(tmp_path, labels_file, REPO)
    assert result.exit_code == 2 and "older omni" in result.output and "--full" in result.output
    legacy(out, "f" * 40)  # a commit no longer cached
    result, _ = tag(tmp_path, labels_file, REPO)
    assert result.exit_code == 2 and f"--revision {'f' * 40}" in result.output


def test_older_local_stamp_carries_over_while_the_files_are_untouched(tmp_path, labels_file):
    folder = copy_model(tmp_path)
    result, out = tag(tmp_path, labels_file, folder)
    assert result.exit_code == 0
    legacy(out, identity.legacy_stamp(str(folder)))
    result, _ = tag(tmp_path, labels_file, folder)
    assert result.exit_code == 0 and "carried over" in result.output, result.output
    assert meta(out)["revision"] == identity.identity(folder)
    legacy(out, identity.legacy_stamp(str(folder)))
    os.utime(folder / "model.safetensors")  # the old stamp no longer matches: cannot check
    result, _ = tag(tmp_path, labels_file, folder)
    assert result.exit_code == 2 and "older omni" in result.output


# --- a misspelled --model, --revision where it means nothing, help -------------------------


@pytest.mark.parametrize("model", ["./tests/fixtures/tiny-clp", "tests/fixtures/tiny-clp",
                                   "models/clip", "org/two//slashes", "bad name"])  # fmt: skip
def test_a_misspelled_model_is_a_usage_error_before_any_work(tmp_path, labels_file, model,
                                                             monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so `models/clip` means a folder here
    result, out = tag(tmp_path, labels_file, model)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"omni: error: model not found: {model}")
    assert not out.exists()


def test_a_misspelled_model_imports_no_torch(tmp_path, labels_file):
    photos(tmp_path)
    script = (
        "import sys\n"
        "from omni_cli.cli import app\n"
        "for args in (['tag', 'photos', '-l', sys.argv[1], '--model', './tests/fixtures/tiny-clp'],"
        " ['vram', '--model', 'tests/fixtures/tiny-clp'], ['bench', '--model', 'models/x/y']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 2, (args, exc.code)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(labels_file)], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("model not found") == 3, done.stderr


def test_hub_ids_go_through_and_revision_needs_one(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.check("openai/clip-vit-large-patch14")  # online: left to the hub
    hub.check("openai/clip-vit-large-patch14", "refs/pr/3")
    for model, revision in ((str(MODEL), "main"), ("random:vit-b-32", "main"),
                            ("openai/clip-vit-large-patch14", "../../etc")):  # fmt: skip
        with pytest.raises(UsageError, match="--revision"):
            hub.check(model, revision)


def test_every_random_architecture_is_in_the_model_help():
    runner = CliRunner()
    for command in ("vram", "bench"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "--revision" in text
        for name in archs.ARCHS:
            assert f"random:{name}" in " ".join(text.split()), (command, name)


# --- prompts longer than the text model's positions ------------------------------------------


def test_a_prompt_longer_than_the_text_positions_is_cut_and_named(tmp_path):
    folder = copy_model(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]  # unset: transformers' huge default, no truncation
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    labels = tmp_path / "long.txt"
    long = "a photo of a red circle " + "on a light background " * 12  # ~90 words: > 77 tokens
    labels.write_text(f"red circle: {long}\nblue square\ngreen triangle\n")
    result, out = tag(tmp_path, labels, folder)
    assert result.exit_code == 0, result.output
    assert (
        "prompts longer than the model's 77 tokens were cut to fit, for labels: red circle\n"
        in (result.output)
    )
    assert pq.read_table(out).num_rows == 3


def test_search_says_when_the_model_the_file_names_is_gone(tmp_path, labels_file):
    folder = copy_model(tmp_path)
    result, out = tag(tmp_path, labels_file, folder, "--save-embeddings")
    assert result.exit_code == 0, result.output
    shutil.rmtree(folder)
    found = CliRunner().invoke(app, ["search", str(out), "red circle", "--device", "cpu"])
    assert found.exit_code == 1 and "model not found" in found.output
    assert "the model the file names" in found.output
