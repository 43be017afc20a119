"""Where a model comes from: a local folder, the Hugging Face hub or its local cache.

Torch-free, so that a rerun with nothing to do can name the model's identity (identity.py)
without importing torch or transformers, and a misspelled `--model` is a usage error before
any work. Local folders are checked here so that the message names the real problem (no
config.json, only pickled weights). A hub id, optionally pinned to a revision (a branch, tag or
commit, as transformers' `revision`), is looked up in the local cache (`$HF_HUB_CACHE`, else
`$HF_HOME/hub`: `refs/<revision>` names the snapshot). Online the hub is asked once, briefly,
whether it is reachable: offline, a cached copy is used as it is, and without one omni fails at
once with what to do instead of spending half a minute in the hub client's retries.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, UsageError
from . import identity as ident

HUB_TIMEOUT = 3.0  # seconds to wait for the hub before treating it as unreachable
_HUB_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Source:
    """What to hand `from_pretrained`: a folder or a hub id, and whether to stay offline."""

    name: str
    local_only: bool
    revision: str | None = None  # a hub branch, tag or commit; None: the default branch
    cache_dir: str | None = None  # the hub cache omni read the identity from


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
    """A local folder, checked (ModelError naming the problem), or a hub id as it is.

    A folder that does not exist, or a name that is neither a folder nor a hub id of the form
    org/name, is a usage error.
    """
    if not looks_local(model):
        if not is_hub_id(model):
            raise UsageError(not_found(model))
        head = model.split("/")[0]
        if "/" in model and os.path.isdir(head):  # `models/clip` with ./models/ here: a folder
            raise UsageError(f"model not found: {model}: no such folder in {head}/")
        return model
    path = Path(model).expanduser()
    if not path.exists():
        raise UsageError(not_found(model))
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


def not_found(model: str) -> str:
    return f"model not found: {model}: not a folder, and not a hub id of the form org/name"


def is_hub_id(model: str) -> bool:
    """`org/name` (or a legacy `name`) as the hub spells repository ids."""
    parts = model.split("/")
    return len(parts) <= 2 and all(
        _HUB_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts
    )


def check(model: str, revision: str | None = None) -> None:
    """Everything knowable about `--model` and `--revision` without torch or the network.

    A folder that is missing or not a model, a name that cannot be a hub id, a revision on
    something that is not a hub id: UsageError or ModelError. Offline (HF_HUB_OFFLINE=1), a hub
    id that is not in the local cache fails here too.
    """
    if model.startswith("random:"):
        if revision:
            raise UsageError("--revision pins a hub model; random: architectures have none")
        return
    check_revision(revision)
    check_source(model)
    if looks_local(model):
        if revision:
            raise UsageError(f"--revision pins a hub model; {model} is a local folder")
        return
    if _offline() and snapshot(model, revision) is None:
        raise UsageError(cache_miss(model, revision))


def check_revision(revision: str | None) -> None:
    if revision is None:
        return
    parts = revision.split("/")
    if not revision.strip() or any(p in ("", ".", "..") for p in parts) or "\\" in revision:
        raise UsageError(f"--revision must be a hub branch, tag or commit, not '{revision}'")


def resolve(model: str, revision: str | None = None) -> Source:
    """Where to load `model` from; fails fast when the hub is needed and unreachable."""
    check(model, revision)
    source = check_source(model)
    if looks_local(model):
        return Source(source, local_only=True)
    cache = str(hub_cache())
    if _offline() or snapshot(model, revision):
        # A cached copy loads without the network; asking the hub for a newer revision would
        # cost a timeout per file when it is unreachable. HF_HUB_OFFLINE=1 forces this.
        return Source(model, _offline() or not hub_reachable(), revision, cache)
    if hub_reachable():
        return Source(model, local_only=False, revision=revision, cache_dir=cache)
    raise ModelError(
        f"cannot reach the Hugging Face hub to download {model}, and it is not in the local "
        "cache: give --model a local folder (a model saved with save_pretrained, e.g. "
        "tests/fixtures/tiny-clip), or download it on a connected machine first "
        "(HF_HUB_OFFLINE=1 then uses only cached models)"
    )


def cache_miss(model: str, revision: str | None) -> str:
    at = f" at revision {revision}" if revision else ""
    return (
        f"model not found: {model}{at} is not in the local Hugging Face cache ({hub_cache()}) "
        "and HF_HUB_OFFLINE is set: download it on a connected machine first, or give --model "
        "a local folder"
    )


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """One quick request to the hub's endpoint (proxies respected); any answer counts."""
    try:
        from huggingface_hub import constants, get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:
        return False


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (read now, not at its import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        home = Path(xdg) / "huggingface"
    return Path(home).expanduser() / "hub"


def snapshot(model: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of hub model `model` at `revision` (default branch), if any.

    A branch or tag is read from `refs/<revision>`; a commit names its snapshot itself.
    """
    repo = hub_cache() / ("models--" + model.replace("/", "--"))
    revision = revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else None
    if commit is None:
        try:
            commit = (repo / "refs" / revision).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
    folder = repo / "snapshots" / commit
    return folder if commit and (folder / "config.json").exists() else None


def identity(model: str, revision: str | None = None) -> str | None:
    """The identity (identity.py) a load of `model` would record, from the disk alone.

    `random` for random architectures; None when it cannot be known before loading (a hub
    model not cached yet).
    """
    if model.startswith("random:"):
        return "random"
    if looks_local(model):
        return ident.identity(canonical(model))
    folder = snapshot(model, revision)
    return ident.identity(folder) if folder else None


def pickled_message(model: str, files: str) -> str:
    return (
        f"model {model} has only pickled weights ({files}); omni loads safetensors only, "
        "because unpickling a file can run arbitrary code. If you trust it, convert it once: "
        'python -c "from transformers import AutoModel; '
        f"AutoModel.from_pretrained('{model}').save_pretrained('{model}')\""
    )


def load_error(model: str, exc: Exception) -> ModelError | UsageError:
    """A transformers loading error as one line that says what went wrong."""
    text = str(exc)
    if "safetensors" in text.lower() and ("not found" in text or "does not appear" in text):
        return ModelError(pickled_message(model, "no model.safetensors on the hub"))
    if "is not a local folder and is not a valid model identifier" in text or "404" in text:
        return UsageError(f"model not found: '{model}' is neither a folder nor a hub model id")
    if "revision" in text.lower() and ("not found" in text.lower() or "invalid" in text.lower()):
        return UsageError(f"model {model}: {text.strip().splitlines()[0][:300]}")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ModelError(f"cannot load model {model}: {first[:300]}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
