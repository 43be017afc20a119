"""Finish: turn a run's flushed rows and the previous output's kept rows into the new output.

One file (`-o tags.parquet`) is written whole to `OUT.tmp` and renamed over `OUT`; an archive
(`-o tags`) gets a new version in which only the parts that hold a change are written
(`archive.publish`). Either way the new output appears atomically, and `OUT.partial/` is
removed only once it has.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import OutputError
from . import archive
from .layout import is_archive
from .sink import Sink
from .state import Plan


def recover(output: Path) -> None:
    """Under the output's lock, before anything else: clear what a killed run left behind."""
    if is_archive(output):
        archive.recover(output)


def finish(output: Path, plan: Plan, sink: Sink, rescore: Callable | None = None, *,
           before_switch: Callable[[], None] | None = None) -> int:  # fmt: skip
    """Write the new output from `plan`'s kept rows and the sink's parts; returns its rows."""
    if not is_archive(output):
        return sink.finish(plan.carried(rescore), keep=plan.matches)
    sink.close()
    new = archive.NewRows(sink.folder, plan.schema, plan.matches)
    try:
        rows, _ = archive.publish(output, plan.schema, plan.carried_from(rescore), new,
                                  before_switch=before_switch)  # fmt: skip
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    shutil.rmtree(sink.folder, ignore_errors=True)
    return rows
