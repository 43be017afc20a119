"""Labels files, templates and the text classifier matrix."""

from __future__ import annotations

import shutil

import pytest
import torch

from omni_cli.errors import LabelsError, UsageError
from omni_cli.model.labels import (
    IMAGENET_TEMPLATES,
    NEUTRAL_LEVELS,
    cached_classifier,
    cached_content_free,
    classifier,
    content_free_pixels,
    prompts_for,
    read_labels,
)


def write(tmp_path, text: str, encoding="utf-8"):
    path = tmp_path / "labels.txt"
    path.write_bytes(text.encode(encoding))
    return path


def test_comments_blanks_bom_and_custom_prompts(tmp_path):
    path = write(tmp_path, "\ufeff# heading\n\n  cat  \ndog: a dog. | a puppy.\n# end\n")
    labels = read_labels(path)
    assert [lab.name for lab in labels] == ["cat", "dog"]
    assert labels[1].prompts == ("a dog.", "a puppy.")
    assert prompts_for(labels, "a photo of a {}.") == [
        ("a photo of a cat.",),
        ("a dog.", "a puppy."),
    ]


def test_duplicates_name_both_lines(tmp_path):
    path = write(tmp_path, "cat\n\ndog\ncat: a cat.\n")
    with pytest.raises(LabelsError, match="duplicate label 'cat' on lines 1 and 4"):
        read_labels(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no labels"),
        ("# nothing\n\n", "has no labels"),
        ("dog:\n", "has no prompts"),
        (": a cat\n", "needs a label"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    with pytest.raises(LabelsError, match=message):
        read_labels(write(tmp_path, text))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(b"cat\ncaf\xe9\n")
    with pytest.raises(LabelsError, match=":2: not valid UTF-8"):
        read_labels(path)


def test_imagenet_ensemble_has_the_80_prompts_of_the_paper():
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    prompts = prompts_for(read_labels_from(["goldfish"]), "imagenet")[0]
    assert len(prompts) == 80 and "itap of a goldfish." in prompts


def test_template_needs_a_placeholder():
    with pytest.raises(UsageError):
        prompts_for(read_labels_from(["cat"]), "a photo")


def read_labels_from(names):
    from omni_cli.model.labels import Label

    return [Label(n) for n in names]


def fake_encoder(calls):
    table = {"a": [1.0, 0.0], "b": [0.0, 2.0], "c": [3.0, 3.0]}

    def encode(texts):
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    return encode


def test_classifier_normalises_averages_and_normalises_again():
    matrix = classifier(fake_encoder([]), [("a", "b"), ("c",)])
    assert matrix.shape == (2, 2)  # (dim, labels)
    s = 2**-0.5
    assert torch.allclose(matrix[:, 0], torch.tensor([s, s]))  # mean of (1,0) and (0,1), normalised
    assert torch.allclose(matrix[:, 1], torch.tensor([s, s]))
    assert torch.allclose(matrix.norm(dim=0), torch.ones(2))


def test_classifier_cache_is_keyed_by_model_and_prompts(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path))
    calls = []
    first, hit = cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@1")
    assert not hit and len(calls) == 1
    again, hit = cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@1")
    assert hit and len(calls) == 1 and torch.equal(first, again)
    _, hit = cached_classifier(fake_encoder(calls), [("a",), ("c",)], "model@1")
    assert not hit
    _, hit = cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@2")
    assert not hit


def test_content_free_images_hold_no_colour_and_are_cached_per_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path))
    pixels = content_free_pixels(4)
    assert pixels.shape == (len(NEUTRAL_LEVELS) + 4 + 2, 3, 4, 4) and pixels.dtype == torch.uint8
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])
    flat = pixels[: len(NEUTRAL_LEVELS)]  # first the flat greys
    assert [int(p.min()) for p in flat] == [int(p.max()) for p in flat] == list(NEUTRAL_LEVELS)
    seen = []

    def encode(batch):  # (n, 3, H, W) -> (n, 2): brightness, and a constant
        seen.append(len(batch))
        level = batch.float().mean(dim=(1, 2, 3)) / 255
        return torch.stack([level, torch.ones_like(level)], dim=1)

    want = encode(pixels)
    seen.clear()
    blank, hit = cached_content_free(encode, 4, "model@1")
    assert not hit and torch.allclose(blank, want)
    again, hit = cached_content_free(encode, 4, "model@1")
    assert hit and torch.equal(blank, again) and seen == [len(pixels)]
    assert not cached_content_free(encode, 4, "model@2")[1]


def cache_files(tmp_path, kind="labels"):
    return sorted((tmp_path / kind).glob("*.pt"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "other tensor"])
def test_a_damaged_cache_file_is_recomputed_and_rewritten(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path))
    calls = []
    first, _ = cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@1")
    (path,) = cache_files(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04 this is not a pickle \x00" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a loadable file with the wrong shape, as an older omni wrote it (no key)
        torch.save(torch.zeros(2, 5), path)
    again, hit = cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@1")
    assert not hit and len(calls) == 2 and torch.equal(first, again)
    assert cache_files(tmp_path) == [path] and not list(tmp_path.glob("labels/*.tmp"))
    _, hit = cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@1")
    assert hit and len(calls) == 2  # rewritten whole


def test_a_cache_file_for_other_prompts_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path))
    calls = []
    cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@1")
    (path,) = cache_files(tmp_path)
    cached_classifier(fake_encoder(calls), [("c",), ("b",)], "model@1")
    other = next(p for p in cache_files(tmp_path) if p != path)
    shutil.copy(other, path)  # same shape, another key: e.g. a file copied between machines
    _, hit = cached_classifier(fake_encoder(calls), [("a",), ("b",)], "model@1")
    assert not hit and calls[-1] == ["a", "b"]


def test_an_unknown_model_identity_is_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_CACHE_DIR", str(tmp_path))
    calls = []
    for _ in range(2):
        assert not cached_classifier(fake_encoder(calls), [("a",)], None)[1]
    assert len(calls) == 2 and not cache_files(tmp_path)


def test_new_weights_key_new_label_embeddings(tmp_path):
    from omni_cli.config import ModelConfig
    from omni_cli.model.loading import load_encoder

    from .test_hub import copy_model, perturb

    folder = copy_model(tmp_path)
    cfg = ModelConfig(model=str(folder), device="cpu", precision="fp32")
    before = load_encoder(cfg)
    prompts = [("a photo of a red circle.",), ("a photo of a blue square.",)]
    old, _ = cached_classifier(before.encode_texts, prompts, before.cache_key)
    perturb(folder / "model.safetensors")
    after = load_encoder(cfg)
    assert after.cache_key != before.cache_key
    new, hit = cached_classifier(after.encode_texts, prompts, after.cache_key)
    assert not hit and not torch.equal(old, new)
