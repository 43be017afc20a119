"""`omni report`: the page a person looks at, checked through its HTML and in a real browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from omni_cli.cli import app
from omni_cli.look import report as report_module
from omni_cli.look.report import ReportConfig, build_report

from . import browser
from .conftest import LABELS, MODEL, omni_tag, shape_image


def omni(*args):
    return CliRunner().invoke(app, [*map(str, args)])


class _Page(HTMLParser):
    """The galleries of a report: section label -> [(path, missing?)], in page order."""

    def __init__(self):
        super().__init__()
        self.galleries: dict[str, list[tuple[str, bool]]] = {}
        self.section = None
        self.text: list[str] = []
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.attributes |= set(attrs)
        if tag == "section":
            self.section = attrs.get("data-label") or attrs.get("id")
            self.galleries.setdefault(self.section, [])
        elif tag == "figure" and "data-path" in attrs:
            self.galleries[self.section].append([attrs["data-path"], False])
        elif attrs.get("data-missing"):
            self.galleries[self.section][-1][1] = True

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.galleries = {k: [tuple(x) for x in v] for k, v in page.galleries.items()}
    return page


def paths(page: _Page, section: str) -> list[str]:
    return [p for p, _ in page.galleries[section]]


def write_output(path: Path, rows: list[dict], labels, *, scores: bool, threshold=None,
                 cwd: str | None = None) -> Path:  # fmt: skip
    """An omni output made by hand: rows give root, path, status, error, probs, scores, top."""
    n = len(labels)
    fields = [
        ("root", pa.string()),
        ("path", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("views", pa.int16()),
        ("similarity", pa.list_(pa.float32(), n)),
        ("probs", pa.list_(pa.float32(), n)),
    ]
    if scores:
        fields.append(("scores", pa.list_(pa.float32(), n)))
    fields += [("top_labels", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float32()))]
    meta = {
        "labels": list(labels),
        "model": "test-model",
        "precision": "fp32",
        "tiles": "off",
        "top_k": 5,
        "threshold": threshold,
        "created": "2026-01-02T03:04:05+00:00",
        "cwd": cwd,
    }
    schema = pa.schema(fields, metadata={b"omni": json.dumps(meta)})
    columns = {name: [] for name, _ in fields}
    for row in rows:
        ok = row.get("status", "ok") == "ok"
        columns["root"].append(row.get("root", str(path.parent)))
        columns["path"].append(row["path"])
        columns["status"].append(row.get("status", "ok"))
        columns["error"].append(row.get("error"))
        columns["views"].append(1 if ok else None)
        nulls = [None] * n  # what omni writes for an error row (not a null list: see rows.py)
        columns["similarity"].append(row.get("probs") or nulls)
        columns["probs"].append(row.get("probs") or nulls)
        if scores:
            columns["scores"].append(row.get("scores") or nulls)
        columns["top_labels"].append(row.get("top", []) if ok else None)
        columns["top_scores"].append([0.5] * len(row.get("top", [])) if ok else None)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def picture(folder: Path, name: str, label: str = "red circle", seed: int = 0) -> str:
    shape_image(label, seed=seed).save(folder / name)
    return name


def test_galleries_rank_by_scores_when_the_column_exists(tmp_path):
    labels = ["cat", "dog"]
    rows = []
    for i in range(6):  # probs and scores disagree on the order
        name = picture(tmp_path, f"img{i}.jpg", seed=i)
        probs = [i / 10, 1 - i / 10]
        scores = [1 - i / 10, i / 10]
        rows.append({"path": name, "probs": probs, "scores": scores, "top": ["cat"]})
    out = write_output(tmp_path / "t.parquet", rows, labels, scores=True)
    result = build_report(ReportConfig(out, tmp_path / "r.html", per_label=3))
    page = parse((tmp_path / "r.html").read_text())
    assert paths(page, "cat") == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert paths(page, "dog") == ["img5.jpg", "img4.jpg", "img3.jpg"]
    assert "galleries ranked by" in "".join(page.text) and "scores" in "".join(page.text)
    assert result.rows == 6 and result.thumbnails == 6 and result.missing == 0


def test_galleries_rank_by_probs_without_scores(tmp_path):
    rows = [
        {"path": picture(tmp_path, f"img{i}.jpg", seed=i), "probs": [i / 10, 1 - i / 10]}
        for i in range(5)
    ]
    out = write_output(tmp_path / "t.parquet", rows, ["cat", "dog"], scores=False)
    build_report(ReportConfig(out, tmp_path / "r.html", per_label=2))
    page = parse((tmp_path / "r.html").read_text())
    assert paths(page, "cat") == ["img4.jpg", "img3.jpg"]
    assert paths(page, "dog") == ["img0.jpg", "img1.jpg"]


def test_streaming_in_small_batches_gives_the_same_page(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    rows = []
    for i in range(50):
        p = rng.random(3)
        rows.append({"path": f"f{i:02d}.jpg", "probs": list(p), "scores": list(p[::-1])})
    rows[10] = {"path": "err.jpg", "status": "error", "error": "truncated JPEG"}
    out = write_output(tmp_path / "t.parquet", rows, labels, scores=True)
    build_report(ReportConfig(out, tmp_path / "one.html", per_label=5))
    monkeypatch.setattr(report_module, "BATCH_ROWS", 7)
    build_report(ReportConfig(out, tmp_path / "many.html", per_label=5))
    one = parse((tmp_path / "one.html").read_text()).galleries
    many = parse((tmp_path / "many.html").read_text()).galleries
    assert one == many
    scores = np.array([r["scores"] for r in rows if "scores" in r])
    names = [r["path"] for r in rows if "scores" in r]
    for j, label in enumerate(labels):
        expected = [names[i] for i in np.argsort(-scores[:, j], kind="stable")[:5]]
        assert [p for p, _ in many[label]] == expected


def test_error_rows_with_null_or_all_null_scores_are_listed_not_shown(tmp_path):
    rows = [
        {"path": picture(tmp_path, "good.jpg"), "probs": [0.9, 0.1], "scores": [0.9, 0.1]},
        {"path": "null-slot.jpg", "status": "error", "error": "truncated JPEG"},
        {
            "path": "null-items.jpg",
            "status": "error",
            "error": "not an image",
            "probs": [None, None],
            "scores": [None, None],
        },
        {"path": "no-reason.jpg", "status": "error"},
    ]
    out = write_output(tmp_path / "t.parquet", rows, ["cat", "dog"], scores=True)
    result = build_report(ReportConfig(out, tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    page = parse(html)
    assert paths(page, "cat") == ["good.jpg"] and paths(page, "dog") == ["good.jpg"]
    text = "".join(page.text)
    for name, reason in [
        ("null-slot.jpg", "truncated JPEG"),
        ("null-items.jpg", "not an image"),
        ("no-reason.jpg", "(no reason given)"),
    ]:
        assert name in text and reason in text
    assert "3 files could not be read" in text
    assert result.rows == 4


def test_missing_and_unreadable_files_get_placeholders(tmp_path):
    rows = [
        {"path": picture(tmp_path, "here.jpg"), "probs": [0.9, 0.1]},
        {"path": "gone.jpg", "probs": [0.8, 0.2]},
        {"path": "garbage.jpg", "probs": [0.7, 0.3]},
        {"path": "sub", "probs": [0.6, 0.4]},  # a folder where a file was
    ]
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (tmp_path / "sub").mkdir()
    out = write_output(tmp_path / "t.parquet", rows, ["cat", "dog"], scores=False)
    result = omni("report", out, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "4 images shown (1 not found, 2 unreadable)" in result.output
    page = parse((tmp_path / "r.html").read_text())
    assert page.galleries["cat"] == [
        ("here.jpg", False),
        ("gone.jpg", True),
        ("garbage.jpg", True),
        ("sub", True),
    ]


def test_relative_roots_are_found_beside_the_output(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    picture(tmp_path / "photos", "a.jpg")
    rows = [{"root": "photos", "path": "a.jpg", "probs": [0.9, 0.1]}]
    out = write_output(tmp_path / "t.parquet", rows, ["cat", "dog"], scores=False)
    monkeypatch.chdir(tmp_path.parent)  # `photos` does not resolve from here
    build_report(ReportConfig(out, tmp_path / "r.html"))
    assert parse((tmp_path / "r.html").read_text()).galleries["cat"] == [("a.jpg", False)]


def test_relative_roots_are_found_from_the_folder_tag_ran_in(tmp_path, monkeypatch):
    """`omni tag photos -o out/t.parquet` run in `work`, the report made from anywhere."""
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    (work / "out").mkdir()
    picture(work / "photos", "a.jpg")
    rows = [
        {"root": "photos", "path": "a.jpg", "probs": [0.9, 0.1]},
        {"root": "photos", "path": "gone.jpg", "probs": [0.8, 0.2]},
        {"root": "old", "path": "b.jpg", "probs": [0.7, 0.3]},
    ]
    out = write_output(work / "out" / "t.parquet", rows, ["cat", "dog"], scores=False,
                       cwd=str(work))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    result = omni("report", out, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    page = parse((tmp_path / "r.html").read_text())
    assert page.galleries["cat"] == [("a.jpg", False), ("gone.jpg", True), ("b.jpg", True)]
    assert "3 images shown (2 not found)" in result.stdout
    note = result.stderr.splitlines()[0]
    assert note.startswith("omni: input folder 'old' (a relative path) was not found under ")
    for where in (work, work / "out", tmp_path):
        assert str(where) in note


def test_a_folder_output_gives_the_same_page_as_one_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rows = [{"path": f"f{i:02d}.jpg", "probs": list(rng.random(3)), "top": ["a"] if i % 3 else []}
            for i in range(30)]  # fmt: skip
    rows[4] = {"path": "err.jpg", "status": "error", "error": "truncated JPEG"}
    one = write_output(tmp_path / "t.parquet", rows, ["a", "b", "c"], scores=False,
                       threshold=0.5)  # fmt: skip
    folder = tmp_path / "v1"
    folder.mkdir()
    table = pq.read_table(one)
    (folder / "_omni.json").write_bytes(table.schema.metadata[b"omni"])
    plain = table.replace_schema_metadata(None)
    pq.write_table(plain.slice(0, 11), folder / "part-00000.parquet")
    pq.write_table(plain.slice(11), folder / "part-00001.parquet")
    (tmp_path / "tags").symlink_to("v1")
    monkeypatch.setattr(report_module, "BATCH_ROWS", 4)
    build_report(ReportConfig(one, tmp_path / "one.html", per_label=5))
    result = build_report(ReportConfig(tmp_path / "tags", tmp_path / "parts.html", per_label=5))
    assert result.rows == 30
    one_page = parse((tmp_path / "one.html").read_text())
    parts_page = parse((tmp_path / "parts.html").read_text())
    assert one_page.galleries == parts_page.galleries and "errors" in parts_page.galleries
    text = "".join(parts_page.text)
    assert "err.jpg" in text and "1 file could not be read" in text


def test_an_earlier_report_is_replaced_anything_else_is_kept(tmp_path):
    out = write_output(tmp_path / "t.parquet", [{"path": "a.jpg", "probs": [1.0]}], ["cat"],
                       scores=False)  # fmt: skip
    page = tmp_path / "r.html"
    first = omni("report", out, "-o", page)
    assert first.exit_code == 0 and "replaced" not in first.output
    again = omni("report", out, "-o", page)
    assert again.exit_code == 0 and f"omni: replaced {page}" in again.stderr
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my own notes</html>")
    refused = omni("report", out, "-o", mine)
    assert refused.exit_code == 2 and "not an omni report" in refused.output
    assert "--force" in refused.output and mine.read_text() == "<html>my own notes</html>"
    forced = omni("report", out, "-o", mine, "--force")
    assert forced.exit_code == 0 and "omni report" in mine.read_text()


def test_counts_of_one_are_singular(tmp_path):
    rows = [{"path": picture(tmp_path, "a.jpg"), "probs": [0.9, 0.1], "top": []},
            {"path": "b.jpg", "status": "error", "error": "not an image"}]  # fmt: skip
    out = write_output(tmp_path / "t.parquet", rows, ["cat", "dog"], scores=False, threshold=0.95)
    result = omni("report", out, "-o", tmp_path / "r.html")
    assert "omni: 2 rows, 1 image shown," in result.stdout
    text = " ".join("".join(parse((tmp_path / "r.html").read_text()).text).split())
    assert "the highest of 1 score" in text and "1 image got no label" in text
    assert "1 file could not be read" in text and "the least sure, with its best score" in text
    for wrong in ("1 images", "1 scores", "1 files", "1 rows"):
        assert wrong not in text


def test_user_data_is_escaped_and_the_page_is_self_contained(tmp_path):
    evil_label = '<img src=x onerror="alert(1)">'
    evil_name = "<script>alert(1)</script>.jpg"  # a folder `<script>alert(1)<` and a file
    (tmp_path / "<script>alert(1)<").mkdir()
    picture(tmp_path, evil_name)
    rows = [
        {"path": evil_name, "probs": [0.9, 0.1], "top": [evil_label]},
        {"path": "x.jpg", "status": "error", "error": "<marquee>bad</marquee>"},
    ]
    out = write_output(tmp_path / "t.parquet", rows, [evil_label, "dog"], scores=False)
    build_report(ReportConfig(out, tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    page = parse(html)
    assert "script" not in page.tags and "marquee" not in page.tags  # no markup from the data
    assert not [a for a in page.attributes if a.startswith("on")]  # no event handlers
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in html and "&lt;marquee&gt;bad" in html
    assert paths(page, evil_label) == [evil_name]
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    sources = [line for line in html.split('src="')[1:]]
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)


def test_labels_option_per_label_and_no_tag_section(tmp_path):
    labels = ["cat", "dog", "bird"]
    rows = []
    for i in range(8):
        top = [] if i >= 6 else ["cat"]
        rows.append({"path": f"f{i}.jpg", "probs": [0.1 * i, 0.5, 0.2], "top": top})
    out = write_output(tmp_path / "t.parquet", rows, labels, scores=False, threshold=0.65)
    result = omni(
        "report", out, "-o", tmp_path / "r.html", "--labels", "bird, cat", "--per-label", 2
    )
    assert result.exit_code == 0, result.output
    page = parse((tmp_path / "r.html").read_text())
    shown = [k for k in page.galleries if k not in ("no-tag", "errors", "pairs")]
    assert shown == ["bird", "cat"]
    assert paths(page, "cat") == ["f7.jpg", "f6.jpg"]
    # f6 and f7 got no tag; the least sure (lowest best score) first
    assert paths(page, "no-tag") == ["f6.jpg", "f7.jpg"]
    assert "2 images got no label" in "".join(page.text)

    bad = omni("report", out, "-o", tmp_path / "r.html", "--labels", "cat,fish")
    assert bad.exit_code == 2 and "fish" in bad.output and "cat, dog, bird" in bad.output


def test_labels_given_together_with_a_threshold(tmp_path):
    rows = [
        {"path": "a.jpg", "probs": [0.9, 0.8, 0.0], "top": ["cat", "dog"]},
        {"path": "b.jpg", "probs": [0.9, 0.8, 0.0], "top": ["cat", "dog"]},
        {"path": "c.jpg", "probs": [0.9, 0.0, 0.0], "top": ["cat"]},
    ]
    out = write_output(tmp_path / "t.parquet", rows, ["cat", "dog", "bird"], scores=False,
                       threshold=0.5)  # fmt: skip
    build_report(ReportConfig(out, tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    assert "Labels given together" in html
    assert 'title="cat and dog: 2 images"' in html and 'title="cat: 3 images"' in html


def test_threshold_0_shows_close_calls(tmp_path):
    """With threshold 0 every top-k label passes: the pairs are close calls, as without one."""
    rows = [
        {"path": "a.jpg", "probs": [0.5, 0.4, 0.1], "top": ["cat", "dog", "bird"]},
        {"path": "b.jpg", "probs": [0.5, 0.4, 0.1], "top": ["cat", "dog", "bird"]},
        {"path": "c.jpg", "probs": [0.1, 0.2, 0.7], "top": ["bird", "dog", "cat"]},
    ]
    out = write_output(tmp_path / "t.parquet", rows, ["cat", "dog", "bird"], scores=False,
                       threshold=0)  # fmt: skip
    build_report(ReportConfig(out, tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    assert 'id="pairs"' in html and "Close calls" in html
    assert 'title="best cat, runner-up dog: 2 images"' in html
    assert "0 (every top-k label passes)" in html and 'class="thumb below"' not in html


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"not parquet at all", "not a Parquet file"),
        ("plain", "not an `omni tag` output"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path, content, message):
    path = tmp_path / "x.parquet"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "plain":
        pq.write_table(pa.table({"a": [1]}), path)
    result = omni("report", path, "-o", tmp_path / "r.html")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "r.html").exists()


def test_bad_options_are_usage_errors(tmp_path):
    out = write_output(tmp_path / "t.parquet", [{"path": "a.jpg", "probs": [1.0]}], ["cat"],
                       scores=False)  # fmt: skip
    assert omni("report", out, "--per-label", 0).exit_code == 2
    result = omni("report", out, "-o", tmp_path / "nowhere" / "r.html")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_help_and_report_do_not_import_torch(tmp_path):
    out = write_output(tmp_path / "t.parquet", [{"path": "a.jpg", "probs": [1.0]}], ["cat"],
                       scores=False)  # fmt: skip
    report_args = ["report", str(out), "-o", str(tmp_path / "r.html")]
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from omni_cli.cli import app\n"
        "for args in (['report', '--help'], ['search', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
        f"assert CliRunner().invoke(app, {report_args!r}).exit_code == 0\n"
        "assert 'torch' not in sys.modules, 'report imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# End to end: a real `omni tag` output, looked at in Chromium.


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> Path:
    """A folder of 5 red circles, one image of every other label and a broken file, tagged."""
    base = tmp_path_factory.mktemp("tagged")
    folder = base / "photos"
    folder.mkdir()
    for i in range(5):
        shape_image("red circle", seed=100 + i).save(folder / f"red_circle_{i}.jpg")
    for i, label in enumerate(LABELS[1:]):
        shape_image(label, seed=i).save(folder / f"{label.replace(' ', '_')}.png")
    good = (folder / "red_circle_0.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])
    labels = base / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = base / "tags.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNI_CACHE_DIR", str(base / "cache"))
        args = [folder, "--labels", labels, "-o", out, "--model", MODEL, "--workers", 0]
        result = omni_tag(*args, "--precision", "fp32")
    assert result.exit_code == 3, result.output  # the broken file
    return out


def test_report_of_a_real_run_shows_each_label_first(tagged, tmp_path):
    result = omni("report", tagged, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "14 rows, 13 images shown" in result.output
    page = parse((tmp_path / "r.html").read_text())
    assert set(paths(page, "red circle")[:5]) == {f"red_circle_{i}.jpg" for i in range(5)}
    for label in LABELS[1:]:
        assert paths(page, label)[0] == f"{label.replace(' ', '_')}.png"
    assert "broken.jpg" in "".join(page.text) and "truncated JPEG" in "".join(page.text)


SCRIPT = """JSON.stringify({
  galleries: Object.fromEntries([...document.querySelectorAll('section.label')].map(s =>
    [s.dataset.label, [...s.querySelectorAll('figure.thumb')].map(f => f.dataset.path)])),
  broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length,
  images: document.images.length,
  placeholders: document.querySelectorAll('[data-missing]').length,
  histograms: document.querySelectorAll('.hist svg rect').length,
  errors: [...document.querySelectorAll('table.error-rows td.path')].map(td => td.textContent),
  width: document.documentElement.scrollWidth,
})"""


@pytest.mark.skipif(browser.chromium() is None, reason="chromium is not installed")
def test_the_page_in_a_real_browser(tagged, tmp_path):
    (tagged.parent / "photos" / "red_circle_4.jpg").rename(tmp_path / "moved.jpg")
    try:
        result = omni("report", tagged, "-o", tmp_path / "r.html")
    finally:
        (tmp_path / "moved.jpg").rename(tagged.parent / "photos" / "red_circle_4.jpg")
    assert result.exit_code == 0, result.output
    seen = browser.visit(tmp_path / "r.html", SCRIPT, width=1280, height=900)
    shots = os.environ.get("OMNI_SCREENSHOTS")  # a folder to keep the screenshot in, to look at
    if shots:
        Path(shots, "report.png").write_bytes(seen.screenshot)
    assert seen.problems == []
    dom = json.loads(seen.value)
    red = dom["galleries"]["red circle"]
    assert set(red[:5]) == {f"red_circle_{i}.jpg" for i in range(5)}, red
    for label in LABELS[1:]:
        assert dom["galleries"][label][0] == f"{label.replace(' ', '_')}.png"
    assert dom["broken"] == 0 and dom["images"] > 0  # every embedded thumbnail decodes
    assert dom["placeholders"] == 9  # the moved red circle, in each of the 9 galleries
    assert dom["histograms"] > 0
    assert [Path(e).name for e in dom["errors"]] == ["broken.jpg"]
    assert dom["width"] <= 1280  # nothing overflows sideways
    assert seen.screenshot.startswith(b"\x89PNG") and len(seen.screenshot) > 10_000


CAPTIONS = """JSON.stringify([...document.querySelectorAll('section.label figure.thumb')].map(f => {
  const span = f.querySelector('figcaption span'), box = span.getBoundingClientRect();
  const text = span.textContent, node = (span.querySelector('bdi') || span).firstChild;
  const range = document.createRange();
  const lefts = [...text].map((_, i) => { range.setStart(node, i); range.setEnd(node, i + 1);
                                          return range.getBoundingClientRect().left; });
  return {text, lefts, boxLeft: box.left, boxRight: box.right,
          lastRight: (range.setStart(node, text.length - 1), range.getBoundingClientRect().right)};
}))"""


@pytest.mark.skipif(browser.chromium() is None, reason="chromium is not installed")
def test_captions_keep_the_order_of_a_name_and_show_its_end(tmp_path):
    short, long = "04/00018.jpg", "a_folder_with_a_long_name/and_a_long_file_name_0123456789.jpg"
    for name in (short, long):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        picture(tmp_path, name)
    rows = [{"path": short, "probs": [0.9]}, {"path": long, "probs": [0.8]}]
    out = write_output(tmp_path / "t.parquet", rows, ["cat"], scores=False)
    build_report(ReportConfig(out, tmp_path / "r.html"))
    seen = browser.visit(tmp_path / "r.html", CAPTIONS, width=1280, height=900)
    captions = {c["text"]: c for c in json.loads(seen.value)}
    assert set(captions) == {short, long}
    for c in captions.values():  # characters laid out left to right in their own order
        assert c["lefts"] == sorted(c["lefts"]), c
    fits = captions[short]
    assert fits["lefts"][0] >= fits["boxLeft"] - 0.5  # a short name is shown whole
    cut = captions[long]
    assert cut["lefts"][0] < cut["boxLeft"]  # a long name loses its start ...
    assert cut["lastRight"] <= cut["boxRight"] + 0.5  # ... and keeps its end
