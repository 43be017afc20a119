"""The `omni` command line: parse options, build a config, call the core, print.

Nothing here decides how work is done. Each command turns its options into the frozen config
of `config.py`, calls the public API, and renders progress events (a Rich bar on a terminal,
nothing otherwise) and a one-line summary. The project's errors become a message on stderr and
the exit code design.md lists; an interrupted run exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import __version__
from .config import DEFAULT_MODEL, DecodeConfig, ModelConfig, TagConfig
from .errors import OmniError

app = typer.Typer(
    help="Batch zero-shot image tagging with CLIP: folders of images in, Parquet out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"omni {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),  # fmt: skip
) -> None:
    """Batch zero-shot image tagging with CLIP."""


def _batch(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter("must be a positive integer or 'auto'") from None


@app.command()
def tag(
    paths: list[Path] = typer.Argument(..., help="Folders or image files to tag."),
    labels: Path = typer.Option(..., "--labels", "-l", help="Labels file: one label per line."),
    output: Path = typer.Option(Path("tags.parquet"), "--output", "-o", help="Parquet file to write."),
    model: str = typer.Option(DEFAULT_MODEL, help="Hugging Face hub id or local model folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16, bf16 (int8, nf4: reserved)."),
    batch: str = typer.Option("auto", help="Images per encoder batch, or 'auto'."),
    workers: int = typer.Option(None, help="Decode worker processes (default: one per core, at most 8)."),
    template: str = typer.Option("a photo of a {}.", help="Prompt with {}, or 'imagenet' (80)."),
    top_k: int = typer.Option(5, help="Tags kept in top_labels."),
    threshold: float = typer.Option(None, help="Keep only top tags with probability >= this."),
    recursive: bool = typer.Option(True, help="Descend into sub-folders."),
    exact: bool = typer.Option(False, help="No JPEG draft decoding: match transformers' preprocessing."),
    tiles: str = typer.Option("off", help="off, auto or RxC: also score square tiles."),
    tile_overlap: float = typer.Option(0.2, help="Overlap between neighbouring tiles."),
    max_pixels: int = typer.Option(DecodeConfig.max_pixels, help="Refuse larger images."),
    save_embeddings: bool = typer.Option(False, help="Store every view's embedding (float16)."),
    resume: bool = typer.Option(True, help="Pick up rows flushed by an interrupted run."),
    full: bool = typer.Option(False, help="Re-tag everything, ignoring the previous output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
) -> None:
    """Tag every image under PATHS with its similarity to each label, into one Parquet file.

    Exit codes: 0 all tagged; 1 fatal error; 2 usage error; 3 finished, but some files could
    not be read (they are `error` rows); 4 another run holds the output's lock.
    """
    from .pipeline import tag as run_tag

    def build() -> TagConfig:
        return TagConfig(
            inputs=tuple(paths),
            labels_file=labels,
            output=output,
            model=ModelConfig(model=model, device=device, precision=precision,
                              batch=_batch(batch)),  # fmt: skip
            decode=DecodeConfig(exact=exact, tiles=tiles, tile_overlap=tile_overlap,
                                max_pixels=max_pixels),  # fmt: skip
            workers=workers,
            template=template,
            top_k=top_k,
            threshold=threshold,
            recursive=recursive,
            save_embeddings=save_embeddings,
            resume=resume,
            full=full,
        )

    cfg = _guard(build)
    show_bar = not quiet and sys.stderr.isatty()
    with _Reporter(show_bar, quiet) as reporter:
        result = _guard(lambda: run_tag(cfg, reporter))
    if not quiet:
        rate = f"{result.images_per_second:,.1f} images/s"
        carried = f", {result.carried:,} carried over" if result.carried else ""
        typer.echo(
            f"omni: {result.files:,} files, {result.tagged:,} tagged{carried}, "
            f"{len(result.errors):,} errors, {rate} ({result.precision}, batch {result.batch})"
            f" -> {result.output}"
        )
        for root, path, reason in result.errors[:20]:
            err.print(f"  error: {Path(root) / path}: {reason}", markup=False)
        if len(result.errors) > 20:
            err.print(f"  ... {len(result.errors) - 20:,} more: see status = 'error' rows")
    raise typer.Exit(result.exit_code)


def _guard(fn):
    """Run fn; turn the project's errors and interrupts into a message and an exit code."""
    try:
        return fn()
    except OmniError as exc:
        err.print(f"omni: error: {exc}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("omni: interrupted; finished rows are saved, rerun to resume")
        raise typer.Exit(130) from None
    except _Terminated:
        err.print("omni: terminated; finished rows are saved, rerun to resume")
        raise typer.Exit(143) from None
    except Exception as exc:  # a bug: one line for cron, the traceback with OMNI_DEBUG=1
        if os.environ.get("OMNI_DEBUG"):
            raise
        err.print(f"omni: internal error: {type(exc).__name__}: {exc} "
                  "(rerun with OMNI_DEBUG=1 for the traceback)", markup=False)  # fmt: skip
        raise typer.Exit(1) from None


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the pipeline flushes like on Ctrl-C."""


class _Reporter:
    """Renders pipeline Progress events: a Rich bar on a terminal, notes otherwise."""

    def __init__(self, bar: bool, quiet: bool):
        self.quiet = quiet
        self.progress = (
            Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TextColumn("{task.fields[errors]} errors"), TimeRemainingColumn(),
                     console=err, transient=True)  # fmt: skip
            if bar
            else None
        )
        self.task = None

    def __enter__(self):
        signal.signal(signal.SIGTERM, _raise_terminated)
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __call__(self, event) -> None:
        if event.stage == "note":
            if not self.quiet:
                err.print(f"omni: {event.message}", markup=False)
            return
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("", total=None, errors=0)
        total = event.total if event.stage == "tag" else None
        self.progress.update(self.task, description=event.message or event.stage,
                             completed=event.done, total=total, errors=event.errors)  # fmt: skip


def _raise_terminated(signum, frame):
    raise _Terminated()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
