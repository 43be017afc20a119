"""Labels and prompts: from a labels file to the text side of the classifier.

A labels file is UTF-8 (a BOM is tolerated), one label per line; blank lines and `#` comments
are ignored, a duplicate label is an error that names both line numbers, and a line
`label: prompt one | prompt two` gives that label its own prompts instead of the template.
`classifier()` turns the prompts into one `(dim, labels)` matrix, the way open_clip's
zero-shot classifier does: fill templates, encode, L2-normalise, average per label, normalise
again. The matrix is cached on disk, keyed by the model's identity (its weights and
preprocessing, identity.py), precision, device kind and the exact prompts. Next to it, for
the per-label scores (scoring.label_scores), each label's baseline: its similarity to
content-free images (`content_free_pixels`), whose embeddings are cached per model. A
cache file that does not load or does not match its key, shape or dtype is recomputed and
rewritten (atomically): the cache only ever saves time, it never stops a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a classifier is built: parsing labels needs none
    import torch

from ..errors import LabelsError, UsageError
from .identity import cache_dir

DEFAULT_TEMPLATE = "a photo of a {}."

# Content-free images: flat greys from black to white. Their mean embedding is what the model
# sees when there is nothing to see; a label's similarity to it is that label's baseline.
NEUTRAL_LEVELS = (0, 64, 128, 192, 255)

# The 80 prompts of the CLIP paper's ImageNet ensemble (Radford et al., 2021).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)  # fmt: skip

NAMED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "none": ("{}",),  # the label itself is the prompt
}


@dataclass(frozen=True)
class Label:
    """One label and, when the file gave them, its own prompts."""

    name: str
    prompts: tuple[str, ...] = ()
    line: int = 0


def read_labels(path: Path) -> list[Label]:
    """Parse a labels file; raise LabelsError with the line number for anything wrong."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise LabelsError(f"labels file not found: {path}") from None
    except IsADirectoryError:
        raise LabelsError(f"labels file is a directory: {path}") from None
    except OSError as exc:
        raise LabelsError(f"cannot read labels file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LabelsError(f"{path}:{line}: not valid UTF-8") from None

    labels: list[Label] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, prompts = stripped, ()
        if ":" in stripped:
            head, _, tail = stripped.partition(":")
            prompts = tuple(p.strip() for p in tail.split("|") if p.strip())
            if not prompts:
                raise LabelsError(f"{path}:{number}: '{head.strip()}:' has no prompts after ':'")
            name = head.strip()
            if not name:
                raise LabelsError(f"{path}:{number}: a line with prompts needs a label before ':'")
        if name in seen:
            raise LabelsError(
                f"{path}: duplicate label '{name}' on lines {seen[name]} and {number}"
            )
        seen[name] = number
        labels.append(Label(name, prompts, number))
    if not labels:
        raise LabelsError(f"labels file has no labels: {path} (one label per line)")
    return labels


def resolve_template(template: str) -> tuple[str, ...]:
    """A template string with `{}`, or the name of an ensemble such as `imagenet`."""
    if template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[template]
    if "{}" not in template:
        names = ", ".join(sorted(NAMED_TEMPLATES))
        raise UsageError(f"--template must contain '{{}}' or be one of: {names}")
    return (template,)


def prompts_for(labels: Sequence[Label], template: str) -> list[tuple[str, ...]]:
    """The prompts of each label: its own, else the template(s) filled with its name."""
    templates = resolve_template(template)
    return [lab.prompts or tuple(t.replace("{}", lab.name) for t in templates) for lab in labels]


def long_labels(
    names: Sequence[str],
    prompts: Sequence[tuple[str, ...]],
    too_long: Callable[[list[str]], list[int]],
) -> list[str]:
    """The labels with a prompt that `too_long` (indexes of the texts it would cut) flags."""
    owner = [i for i, group in enumerate(prompts) for _ in group]
    flagged = {owner[j] for j in too_long([p for group in prompts for p in group])}
    return [names[i] for i in sorted(flagged)]


def classifier(
    encode_texts: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[tuple[str, ...]],
    *,
    batch: int = 256,
) -> torch.Tensor:
    """Encode every prompt, average per label and normalise: returns (dim, labels) float32."""
    import torch

    flat = [p for group in prompts for p in group]
    chunks = [encode_texts(flat[i : i + batch]) for i in range(0, len(flat), batch)]
    emb = torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)  # (prompts, dim)
    columns, start = [], 0
    for group in prompts:
        mean = emb[start : start + len(group)].mean(dim=0)
        columns.append(torch.nn.functional.normalize(mean, dim=0))
        start += len(group)
    return torch.stack(columns, dim=1)  # (dim, labels)


@dataclass(frozen=True)
class Classifier:
    """The label side of scoring: the (dim, labels) matrix and each label's baseline."""

    matrix: torch.Tensor  # (dim, labels)
    baseline: torch.Tensor | None = None  # (labels,) similarity to a content-free image
    tiled_lift: float = 0.0  # added to the baseline of a tiled image (scoring.tiled_lift)

    def to(self, device) -> Classifier:
        base = None if self.baseline is None else self.baseline.to(device)
        return replace(self, matrix=self.matrix.to(device), baseline=base)

    def cpu(self) -> Classifier:
        return self.to("cpu")


def content_free_pixels(size: int) -> torch.Tensor:
    """Images with nothing in them, (11, 3, size, size) uint8: the greys of NEUTRAL_LEVELS,
    grey noise (fine and in 8 px cells, full and light range), and a horizontal and a vertical
    grey ramp. No colour, no shapes: what every model can be shown to learn where a label's
    similarity sits when there is nothing to see, and how much it varies there."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = [torch.full((size, size), float(v)) for v in NEUTRAL_LEVELS]
    for cell in (1, 8):
        for lo, hi in ((0, 255), (96, 224)):
            side = size // cell + 1
            noise = torch.randint(lo, hi + 1, (side, side), generator=g).float()
            out.append(noise.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:size, :size])
    ramp = torch.linspace(0, 255, size)
    out += [ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size)]
    grey = torch.stack(out).round().clamp(0, 255).to(torch.uint8)
    return grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def cached_content_free(
    encode_images: Callable[[torch.Tensor], torch.Tensor], size: int, model_key: str | None
) -> tuple[torch.Tensor, bool]:
    """The embeddings (11, dim) of `content_free_pixels`, cached per model like the matrix."""
    return _cached(
        "content-free",
        [model_key, size, "greys, grey noise, grey ramps v1"],
        lambda v: v.dim() == 2,
        lambda: encode_images(content_free_pixels(size)).float(),
    )


def cached_classifier(
    encode_texts: Callable[[list[str]], torch.Tensor],
    prompts: Sequence[tuple[str, ...]],
    model_key: str | None,
) -> tuple[torch.Tensor, bool]:
    """`classifier()` behind an on-disk cache; returns (matrix on CPU, whether it was cached).

    A cache that cannot be read or written is ignored: it only ever saves time.
    """
    return _cached(
        "labels",
        [model_key, list(prompts)],
        lambda m: m.dim() == 2 and m.shape[1] == len(prompts),
        lambda: classifier(encode_texts, prompts),
    )


def _cached(kind: str, key, valid: Callable[[torch.Tensor], bool], compute):
    """`compute()` behind a file keyed by `key`, whose first item is the model's cache key
    (None: not cached); returns (value on the CPU, whether it came from the cache)."""
    if key[0] is None:  # the model's identity is unknown: nothing to key a cache by
        return compute().cpu(), False
    import torch

    text = json.dumps(key)
    path = cache_dir() / kind / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt"
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        value = stored.get("value") if isinstance(stored, dict) else None
        if (
            isinstance(value, torch.Tensor)
            and stored.get("key") == text
            and value.dtype == torch.float32
            and valid(value)
            and bool(torch.isfinite(value).all())
        ):
            return value, True
    except Exception:  # missing, truncated, garbage, another format: compute it again
        pass
    value = compute().float().cpu()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": text, "value": value}, tmp)
        os.replace(tmp, path)
    except Exception:  # a full disk or a read-only cache: the next run computes it again
        with contextlib.suppress(OSError):
            tmp.unlink()
    return value, False
