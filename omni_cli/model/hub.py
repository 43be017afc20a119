"""Where a model comes from: a local folder, the Hugging Face hub or its local cache.

Torch-free, so that a rerun with nothing to do can name the model's revision without importing
torch or transformers. Local folders are checked here so that the message names the real
problem (no config.json, only pickled weights). For a hub id, the hub is asked once, briefly,
whether it is reachable: offline, a cached copy is used as it is, and without one omni fails at
once with what to do instead of spending half a minute in the hub client's retries.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

HUB_TIMEOUT = 3.0  # seconds to wait for the hub before treating it as unreachable


@dataclass(frozen=True)
class Source:
    """What to hand `from_pretrained`: a folder or a hub id, and whether to stay offline."""

    name: str
    local_only: bool


def looks_local(model: str) -> bool:
    return (
        os.path.exists(model)
        or model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def canonical(model: str) -> str:
    """How a model is named in an output: a local folder by its absolute path (the same model
    given as `./m` or `/work/m` is one model), a hub id or `random:ARCH` as it is."""
    if model.startswith("random:") or not looks_local(model):
        return model
    return str(Path(model).expanduser().resolve())


def check_source(model: str) -> str:
    """A local folder, checked (ModelError naming the problem), or a hub id as it is."""
    if not looks_local(model):
        return model
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model not found: {model} (no such folder, and not a hub id)")
    if not path.is_dir():
        raise ModelError(f"model {model} is a file; give the folder that holds config.json")
    if not (path / "config.json").exists():
        raise ModelError(f"model folder {model} has no config.json: not a transformers model")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:
            raise ModelError(pickled_message(model, ", ".join(pickled)))
        raise ModelError(f"model folder {model} holds no *.safetensors weights")
    return str(path)


def resolve(model: str) -> Source:
    """Where to load `model` from; fails fast when the hub is needed and unreachable."""
    source = check_source(model)
    if looks_local(model):
        return Source(source, local_only=True)
    if _offline() or cached_revision(model):
        # A cached copy loads without the network; asking the hub for a newer revision would
        # cost a timeout per file when it is unreachable. HF_HUB_OFFLINE=1 forces this.
        return Source(model, local_only=_offline() or not hub_reachable())
    if hub_reachable():
        return Source(model, local_only=False)
    raise ModelError(
        f"cannot reach the Hugging Face hub to download {model}, and it is not in the local "
        "cache: give --model a local folder (a model saved with save_pretrained, e.g. "
        "tests/fixtures/tiny-clip), or download it on a connected machine first "
        "(HF_HUB_OFFLINE=1 then uses only cached models)"
    )


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """One quick request to the hub's endpoint (proxies respected); any answer counts."""
    try:
        from huggingface_hub import constants, get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def cached_revision(model: str) -> str | None:
    """The commit of the cached snapshot of a hub model, if one is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model, "config.json")
    except Exception:
        return None
    if not isinstance(path, str):
        return None
    return Path(path).parent.name  # .../snapshots/<commit>/config.json


def local_revision(folder: str) -> str | None:
    """A stamp of a local folder's weights (names, sizes, mtimes): changes when they do."""
    weights = sorted(Path(folder).glob("*.safetensors")) if os.path.isdir(folder) else []
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return "local:" + hashlib.sha256(repr(stamp).encode()).hexdigest()[:16] if stamp else None


def revision(model: str) -> str | None:
    """The revision a load of `model` would record, from the disk alone (None: unknown)."""
    if model.startswith("random:"):
        return "random"
    if looks_local(model):
        return local_revision(canonical(model))
    return cached_revision(model)


def pickled_message(model: str, files: str) -> str:
    return (
        f"model {model} has only pickled weights ({files}); omni loads safetensors only, "
        "because unpickling a file can run arbitrary code. If you trust it, convert it once: "
        'python -c "from transformers import AutoModel; '
        f"AutoModel.from_pretrained('{model}').save_pretrained('{model}')\""
    )


def load_error(model: str, exc: Exception) -> ModelError:
    """A transformers loading error as one line that says what went wrong."""
    text = str(exc)
    if "safetensors" in text.lower() and ("not found" in text or "does not appear" in text):
        return ModelError(pickled_message(model, "no model.safetensors on the hub"))
    if "is not a local folder and is not a valid model identifier" in text or "404" in text:
        return ModelError(f"model not found: '{model}' is neither a folder nor a hub model id")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ModelError(f"cannot load model {model}: {first[:300]}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
