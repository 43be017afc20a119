"""Identity: what makes a run's rows what they are, defined once for every check that asks.

A run's metadata (`pipeline.run_metadata`) describes it; the keys in `IDENTITY` are those that
decide its rows, in groups by what a difference costs: `ENCODING` (another model, precision,
preprocessing or tiling: stored embeddings are not this run's, so the run refuses), `SCORING`
(other labels or scoring rule: rows are rescored from stored embeddings), `STORED` (what the
rows hold) and `TOPS` (top tags picked again from the stored scores).

The same identity as *asked for* (before loading the model resolves `--precision auto` and the
hub's revision; the rules fixed by the omni version) is `request()`: the no-change fast path
compares it with the one stored, without importing torch. Both are made here from one list.
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import __version__
from ..config import TagConfig
from ..model import hub

# Whether a stored embedding is still the one this run would compute ...
ENCODING = ("model", "revision", "precision", "preprocess", "tiles", "tile_overlap")
# ... whether its similarity and scores are those this run would compute from that embedding
# (rows of an output written by another scoring or tiling rule, or before the `scores` column
# existed, are rescored from their stored embeddings, or tagged again without them) ...
SCORING = ("labels", "prompts", "scores", "tile_rule")
# ... what the rows store ...
STORED = ("embedding",)
# ... and whether their top tags are (else they are picked again from the stored scores).
TOPS = ("top_k", "threshold")
IDENTITY = (*ENCODING, *SCORING, *STORED, *TOPS)
# Identity keys whose value only the omni version decides (the rules' texts).
RULES = ("scores", "tile_rule")


def fingerprint(meta: dict) -> dict:
    """The identity of the run that `meta` (an output's metadata) describes."""
    return {k: meta.get(k) for k in IDENTITY}


def request(cfg: TagConfig, labels: Sequence, prompts) -> dict:
    """The identity as this run asks for it, knowable without torch, plus what else the rows
    depend on (the pixel cap, the omni version that fixes the rules): equal requests over
    unchanged files give the same output, so a rerun can stop before loading anything."""
    asked = {
        "model": hub.canonical(cfg.model.model),
        "revision": hub.identity(cfg.model.model, cfg.model.revision),  # weights, not commit
        "precision": cfg.model.precision,
        "preprocess": "exact" if cfg.decode.exact else "draft",
        "tiles": cfg.decode.tiles,
        "tile_overlap": cfg.decode.tile_overlap,
        "labels": [lab.name for lab in labels],
        "prompts": [list(p) for p in prompts],
        "embedding": cfg.save_embeddings,
        "top_k": cfg.top_k,
        "threshold": cfg.threshold,
    }
    assert set(asked) == set(IDENTITY) - set(RULES)  # one list: a new key is asked for here
    return {
        # stored under these names since the first version that stored a request
        **{("embeddings" if k == "embedding" else k): v for k, v in asked.items()},
        "model_revision": cfg.model.revision,  # --revision: the hub revision pinned
        "max_pixels": cfg.decode.max_pixels,
        "omni_version": __version__,
    }


def differences(have: dict, want: dict, keys: Sequence[str]) -> list[str]:
    """`name was -> now` for every key that differs."""
    return [f"{k} {_show(have.get(k))} -> {_show(want.get(k))}" for k in keys
            if have.get(k) != want.get(k)]  # fmt: skip


def _show(value) -> str:
    return "none" if value is None else str(value)
