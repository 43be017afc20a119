"""`omni tag` through the CLI: behaviour with the fixture model, exit codes and messages."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from omni_cli.output.layout import metadata

from .conftest import LABELS, MODEL, omni_tag

run = omni_tag


def tag_args(folder, labels, out, *extra):
    return (
        folder,
        "--labels",
        labels,
        "-o",
        out,
        "--model",
        MODEL,
        "--workers",
        0,
        "--precision",
        "fp32",
        *extra,
    )


def test_each_sample_gets_its_true_label_as_top1(tmp_path, images, labels_file):
    out = tmp_path / "tags.parquet"
    result = run(*tag_args(tmp_path / "photos", labels_file, out))
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(images)
    for row in rows:
        assert row["status"] == "ok"
        assert row["top_labels"][0] == images[row["path"]], row["path"]
        assert row["views"] == 1 and (row["width"], row["height"]) == (320, 240)
        assert abs(sum(row["probs"]) - 1) < 1e-4
    assert "9 files, 9 tagged" in result.output


def test_bad_files_become_error_rows_beside_good_ones(tmp_path, images, labels_file):
    folder = tmp_path / "photos"
    good = (folder / "red_circle.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a JPEG")
    (folder / "readme.txt").write_text("not an image name: no row")
    (folder / ".hidden.jpg").write_bytes(good)
    out = tmp_path / "tags.parquet"
    result = run(*tag_args(folder, labels_file, out))
    assert result.exit_code == 3, result.output
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == set(images) | {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert rows["truncated.jpg"]["error"] == "truncated JPEG"
    assert rows["empty.jpg"]["error"] == "empty file"
    assert rows["notes.jpg"]["error"] == "not an image"
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        assert rows[name]["status"] == "error" and rows[name]["similarity"] == [None] * 9
    for name, label in images.items():
        assert rows[name]["status"] == "ok" and rows[name]["top_labels"][0] == label
    assert "truncated.jpg: truncated JPEG" in result.output


# README.md, "Output": the best label of every image, named through the file's own metadata.
README_QUERY = """
SELECT t.path, m.labels[list_position(t.similarity, list_max(t.similarity))] AS best
FROM 'tags.parquet' AS t,
     (SELECT json_extract_string(decode(value), '$.labels[*]') AS labels
      FROM parquet_kv_metadata('tags.parquet') WHERE decode(key) = 'omni') AS m
WHERE t.status = 'ok'
"""


def test_output_reads_in_pandas_duckdb_with_labels_from_metadata(tmp_path, images, labels_file):
    duckdb = pytest.importorskip("duckdb")  # a test extra; not on every GPU image
    out = tmp_path / "tags.parquet"
    assert run(*tag_args(tmp_path / "photos", labels_file, out)).exit_code == 0
    meta = metadata(out)
    assert meta["labels"] == list(LABELS)
    assert meta["prompts"][0] == ["a photo of a red circle."]
    assert meta["precision"] == "fp32" and meta["model"] == str(MODEL)
    frame = pd.read_parquet(out)
    assert len(frame) == 9 and len(frame["similarity"][0]) == len(LABELS)
    best = duckdb.sql(README_QUERY.replace("tags.parquet", str(out))).fetchall()
    assert len(best) == 9
    for path, label in best:  # the README's query names the labels from the file alone
        assert label == images[path]


def test_non_ascii_labels_and_custom_prompts_are_kept(tmp_path, images, labels_file):
    labels = tmp_path / "labels.txt"
    labels.write_text(
        "\ufeff# colours and shapes\n\nred circle\ncercle vert: a photo of a green circle. |"
        " green circle\n青い三角形: a photo of a blue triangle.\n",
        encoding="utf-8",
    )
    out = tmp_path / "tags.parquet"
    assert run(*tag_args(tmp_path / "photos", labels, out, "--top-k", 1)).exit_code == 0
    meta = metadata(out)
    assert meta["labels"] == ["red circle", "cercle vert", "青い三角形"]
    assert meta["prompts"][1] == ["a photo of a green circle.", "green circle"]
    top = {images[r["path"]]: r["top_labels"] for r in pq.read_table(out).to_pylist()}
    assert top["green circle"] == ["cercle vert"]
    assert top["blue triangle"] == ["青い三角形"]
    assert top["red circle"] == ["red circle"]


def test_threshold_and_top_k(tmp_path, images, labels_file):
    out = tmp_path / "tags.parquet"
    assert (
        run(
            *tag_args(tmp_path / "photos", labels_file, out, "--top-k", 3, "--threshold", 0.5)
        ).exit_code
        == 0
    )
    for row in pq.read_table(out).to_pylist():
        ranked = sorted(zip(row["scores"], LABELS, strict=True), reverse=True)[:3]
        assert row["top_labels"] == [label for p, label in ranked if p >= 0.5]
        assert row["top_scores"] == [pytest.approx(p) for p, _ in ranked if p >= 0.5]
        assert row["top_labels"][0] == images[row["path"]]  # the model is sure of these


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("missing_labels", 2, "labels file not found"),
        ("empty_labels", 2, "has no labels"),
        ("duplicate_labels", 2, "duplicate label 'red circle' on lines 1 and 3"),
        ("missing_input", 2, "input not found"),
        ("unknown_model", 2, "model not found"),
        ("pickled_model", 1, "only pickled weights"),
        ("bad_precision", 2, "--precision must be one of"),
        ("bad_template", 2, "--template must contain"),
        ("output_is_a_folder", 2, "is a folder that is not an omni archive"),
        ("output_not_parquet", 2, "--output must end in .parquet"),
    ],
)
def test_bad_input_gets_a_message_and_exit_code(
    tmp_path, images, labels_file, setup, code, message
):
    folder, labels, out = tmp_path / "photos", labels_file, tmp_path / "out.parquet"
    extra = []
    model = MODEL
    if setup == "missing_labels":
        labels = tmp_path / "nope.txt"
    elif setup == "empty_labels":
        labels.write_text("# only a comment\n\n")
    elif setup == "duplicate_labels":
        labels.write_text("red circle\nblue square\nred circle\n")
    elif setup == "missing_input":
        folder = tmp_path / "no-such-folder"
    elif setup == "unknown_model":
        model = tmp_path / "no-such-model"
    elif setup == "pickled_model":
        model = tmp_path / "pickled"
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif setup == "bad_precision":
        extra = ["--precision", "fp8"]
    elif setup == "bad_template":
        extra = ["--template", "no placeholder"]
    elif setup == "output_is_a_folder":
        out = tmp_path
    elif setup == "output_not_parquet":
        out = tmp_path / "out.csv"
    args = [folder, "--labels", labels, "-o", out, "--model", model, "--workers", 0, *extra]
    result = run(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.is_file()


def test_empty_folder_says_so_and_writes_an_empty_valid_output(tmp_path, labels_file):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "tags.parquet"
    result = run(*tag_args(tmp_path / "empty", labels_file, out))
    assert result.exit_code == 0, result.output
    assert "no image files found under" in result.output
    table = pq.read_table(out)
    assert table.num_rows == 0 and metadata(out)["labels"] == list(LABELS)
