"""A model's identity: the content of its weights and of the files that preprocess its inputs.

Two runs tagged with the same identity computed the same embeddings, whatever the hub's commit
history did in between (a commit that only edits the model card keeps it; new weights change
it), online or offline. Torch-free and cheap enough for the nightly no-change check:

- weights: the safetensors files transformers loads (the shards of `model.safetensors.index.json`,
  else `model.safetensors`, else every `*.safetensors`), by their sha256. In the Hugging Face
  cache a snapshot's files are links to blobs named by that sha256, so nothing is read; a plain
  file is hashed once and its hash cached under the omni cache dir, keyed by path, size and
  mtime (`weights_digest`).
- preprocessing: `config.json` (minus bookkeeping such as the transformers version or dtype,
  which omni sets itself), the image processor's and the tokenizer's files, by content.

The identity reads `sha256:<weights>+<preprocessing>`: the first 24 hex digits of the weights'
sha256 (for one file, the hub's own LFS hash of it) and 8 of the preprocessing's, so a message
can say which of the two changed. `reconcile` reads what older omni versions recorded instead
(a hub commit, `unknown` offline, a `local:` stamp of sizes and mtimes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..errors import UsageError

PREFIX = "sha256:"
# Files besides the weights that change what the model computes from an image or a prompt.
CONFIGS = ("config.json", "preprocessor_config.json", "processor_config.json",
           "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")  # fmt: skip
# The fast tokenizer reads tokenizer.json alone; these only when there is none.
TOKENIZER_FILES = ("tokenizer.json",)
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                        "sentencepiece.bpe.model", "tokenizer.model")  # fmt: skip
# Keys of the JSON configs that do not change what the model computes.
IGNORED_KEYS = frozenset({"transformers_version", "_name_or_path", "name_or_path",
                          "_commit_hash", "torch_dtype", "dtype", "tokenizer_file"})  # fmt: skip
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 22


def cache_dir() -> Path:
    """omni's cache: $OMNI_CACHE_DIR, else $XDG_CACHE_HOME/omni (label embeddings, hashes)."""
    if os.environ.get("OMNI_CACHE_DIR"):
        return Path(os.environ["OMNI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "omni"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers would load from `folder`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
            return [folder / name for name in sorted(set(shards))]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("*.safetensors"))


def files(folder: str | Path) -> dict[str, str] | None:
    """`{file name: sha256}` of what makes the model in `folder`; None without weights."""
    folder = Path(folder)
    weights = weight_files(folder) if folder.is_dir() else []
    if not weights:
        return None
    try:
        table = {p.name: weights_digest(p) for p in weights}
        names = CONFIGS + (TOKENIZER_FILES if (folder / "tokenizer.json").exists()
                           else SLOW_TOKENIZER_FILES)  # fmt: skip
        for name in names:
            if (folder / name).is_file():
                table[name] = content_digest(folder / name)
    except OSError:
        return None
    return table


def identity(folder: str | Path) -> str | None:
    """`sha256:<weights>+<preprocessing>` of the model in `folder`; None when unreadable."""
    table = files(folder)
    if table is None:
        return None
    weights = sorted(k for k in table if k.endswith(".safetensors"))
    rest = sorted(k for k in table if k not in weights)
    if len(weights) == 1:
        head = table[weights[0]]
    else:
        head = _digest(json.dumps({k: table[k] for k in weights}, sort_keys=True).encode())
    tail = _digest(json.dumps({k: table[k] for k in rest}, sort_keys=True).encode())
    return f"{PREFIX}{head[:24]}+{tail[:8]}"


def is_identity(value) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def weights_digest(path: Path) -> str:
    """sha256 of a weights file: a hub blob's name, else hashed once and cached by stat."""
    if path.is_symlink():
        name = os.path.basename(os.readlink(path))
        if _SHA256.fullmatch(name):
            return name  # the hub cache names LFS blobs by their sha256
    real = path.resolve()
    st = real.stat()
    stamp = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    record = cache_dir() / "hashes" / (_digest(str(real).encode())[:32] + ".json")
    try:
        cached = json.loads(record.read_text(encoding="utf-8"))
        if {k: cached.get(k) for k in stamp} == stamp and _SHA256.fullmatch(cached["sha256"]):
            return cached["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    _write_atomic(record, json.dumps({**stamp, "sha256": value}))
    return value


def content_digest(path: Path) -> str:
    """sha256 of a small file; a JSON config canonically, without its bookkeeping keys."""
    raw = path.read_bytes()
    if path.suffix == ".json" and path.name != "tokenizer.json":
        try:
            clean = _drop_ignored(json.loads(raw.decode("utf-8")))
            raw = json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()
        except (UnicodeDecodeError, ValueError):
            pass
    return _digest(raw)


def _drop_ignored(value):
    if isinstance(value, dict):
        return {k: _drop_ignored(v) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_drop_ignored(v) for v in value]
    return value


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """Best effort: a cache that cannot be written only costs time."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def legacy_stamp(folder: str) -> str | None:
    """What omni before weights identities recorded for a local folder (names, sizes, mtimes)."""
    weights = sorted(Path(folder).glob("*.safetensors")) if os.path.isdir(folder) else []
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return "local:" + _digest(repr(stamp).encode())[:16] if stamp else None


def changed(model: str, was: str, now: str) -> str:
    """The message for a model whose identity changed between two runs."""
    what = "weights" if was.partition("+")[0] != now.partition("+")[0] else "preprocessing"
    detail = "" if what == "weights" else " (its tokenizer, image processor or config)"
    return (
        f"model {what} changed{detail}: {model} was {was}, is now {now}: nothing was touched. "
        "Rerun with --full to retag everything with it, or pin the model that made the "
        "results with --revision"
    )


def reconcile(have: dict, want: dict, snapshot: Callable[[str, str], Path | None]) -> dict:
    """`have` (the model recorded by earlier results) as comparable with `want` (this run's).

    Same identity: as it is. Another model: as it is (the caller names the difference).
    New weights or preprocessing: UsageError saying so. An older omni's record is checked
    against the disk: a `local:` stamp of the same sizes and mtimes, or a hub commit whose
    snapshot (`snapshot(model, commit)`) is still cached and holds the same files, is read as
    this identity (the results are carried over and recorded with it); `unknown`, or a commit
    whose snapshot is gone, cannot be checked and refuses once, saying why: carrying rows of
    other weights over would mix two models' results in one file.
    """
    was, now, model = have.get("revision"), want.get("revision"), want.get("model")
    if was == now or have.get("model") != model or not is_identity(now):
        return have
    if is_identity(was):
        raise UsageError(changed(model, was, now))
    if _legacy_same(model, was, now, snapshot):
        return {**have, "revision": now}
    how = f"hub commit {was}" if _is_commit(was) else f"revision '{was}'"
    raise UsageError(
        f"the existing results were made with {model} at {how}, recorded by an older omni that "
        "did not identify models by their weights, and they cannot be checked against the "
        f"weights now ({now}): nothing was touched. Rerun once with --full to retag everything "
        "(later runs compare the weights themselves)"
        + (f", or pin --revision {was} to keep that commit" if _is_commit(was) else "")
    )


def _legacy_same(model: str, was, now: str, snapshot) -> bool:
    if not isinstance(was, str):
        return False
    if was.startswith("local:"):
        return legacy_stamp(model) == was
    if _is_commit(was):
        folder = snapshot(model, was)
        return folder is not None and identity(folder) == now
    return False


def _is_commit(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}", value) is not None
