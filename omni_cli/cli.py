"""The `omni` command line: parse options, build a config, call the core, print.

Nothing here decides how work is done. Each command turns its options into the frozen config
of `config.py`, calls the public API, and renders progress events (a Rich bar on a terminal,
nothing otherwise) and a one-line summary. The project's errors become a message on stderr and
the exit code design.md lists; an interrupted run exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import functools
import json
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
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Batch zero-shot image tagging with CLIP."""
    _log.json = False  # per invocation: `tag --log-json` turns it on for its own run


def _batch(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter("must be a positive integer or 'auto'") from None


def _bytes(value: str | None, option: str) -> int | None:
    from .vram import parse_bytes

    return None if value is None else parse_bytes(value, option)


@app.command()
def tag(
    paths: list[Path] = typer.Argument(..., help="Folders or image files to tag."),
    labels: Path = typer.Option(..., "--labels", "-l", help="Labels file: one label per line."),
    output: Path = typer.Option(
        Path("tags.parquet"), "--output", "-o", help="Parquet file to write."
    ),
    model: str = typer.Option(DEFAULT_MODEL, help="Hugging Face hub id or local model folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16, bf16, int8 or nf4."),
    batch: str = typer.Option("auto", help="Images per encoder batch, or 'auto'."),
    max_gpu_memory: str = typer.Option(
        None, help="Cap on GPU memory for the model (e.g. 6GiB); the rest is placed on the CPU."
    ),
    workers: int = typer.Option(
        None, help="Decode worker processes (default: GPU one per core, at most 8; CPU cores // 8)."
    ),
    template: str = typer.Option("a photo of a {}.", help="Prompt with {}, or 'imagenet' (80)."),
    top_k: int = typer.Option(5, help="Tags kept in top_labels."),
    threshold: float = typer.Option(None, help="Keep only top tags with probability >= this."),
    recursive: bool = typer.Option(True, help="Descend into sub-folders."),
    exact: bool = typer.Option(
        False, help="Decode and resize exactly as transformers does (slower; no JPEG draft)."
    ),
    tiles: str = typer.Option("off", help="off, auto or RxC: also score square tiles."),
    tile_overlap: float = typer.Option(0.5, help="Overlap between neighbouring tiles (fraction)."),
    max_pixels: int = typer.Option(DecodeConfig.max_pixels, help="Refuse larger images."),
    save_embeddings: bool = typer.Option(False, help="Store every view's embedding (float16)."),
    resume: bool = typer.Option(True, help="Pick up rows flushed by an interrupted run."),
    full: bool = typer.Option(False, help="Re-tag everything, ignoring the previous output."),
    flush_rows: int = typer.Option(1024, help="Rows per crash-safe flush to OUT.partial/."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
    log_json: bool = typer.Option(
        False, "--log-json", help="JSON lines on stdout (notes, summary, errors) for machines."
    ),
    engine: str = typer.Option("local", help="local, or ray: run on a Ray cluster (extra [ray])."),
    ray_address: str = typer.Option(
        None, help="With --engine ray: the cluster's HOST:PORT (default: start a local one)."
    ),
    ray_tmp: Path = typer.Option(
        None, help="With --engine ray: the local cluster's temp folder (default: TMP/omni-ray)."
    ),
) -> None:
    """Tag every image under PATHS with its similarity to each label, into one Parquet file.

    Exit codes: 0 all tagged; 1 fatal error; 2 usage error; 3 finished, but some files could
    not be read (they are `error` rows); 4 another run holds the output's lock.
    """
    from .pipeline import tag as run_tag

    if engine not in ("local", "ray"):
        raise typer.BadParameter("must be local or ray", param_hint="--engine")
    if engine == "local" and (ray_address or ray_tmp):
        raise typer.BadParameter("needs --engine ray", param_hint="--ray-address/--ray-tmp")
    if engine == "ray":
        from .ray_engine import tag_ray

        run_tag = functools.partial(tag_ray, address=ray_address, tmp_dir=ray_tmp)

    def build() -> TagConfig:
        return TagConfig(
            inputs=tuple(paths),
            labels_file=labels,
            output=output,
            model=ModelConfig(
                model=model,
                device=device,
                precision=precision,
                batch=_batch(batch),
                max_gpu_memory=_bytes(max_gpu_memory, "--max-gpu-memory"),
            ),
            decode=DecodeConfig(
                exact=exact, tiles=tiles, tile_overlap=tile_overlap, max_pixels=max_pixels
            ),
            workers=workers,
            template=template,
            top_k=top_k,
            threshold=threshold,
            recursive=recursive,
            save_embeddings=save_embeddings,
            resume=resume,
            full=full,
            flush_rows=flush_rows,
        )

    _log.json = log_json
    cfg = _guard(build)
    show_bar = not quiet and not log_json and sys.stderr.isatty()
    with _Reporter(show_bar, quiet) as reporter:
        result = _guard(lambda: run_tag(cfg, reporter))
    if log_json:
        _log.emit(
            "summary",
            output=str(result.output),
            files=result.files,
            tagged=result.tagged,
            carried=result.carried,
            errors=len(result.errors),
            seconds=round(result.seconds, 3),
            images_per_second=round(result.images_per_second, 2),
            precision=result.precision,
            batch=result.batch,
            exit_code=result.exit_code,
            error_files=[{"root": r, "path": p, "error": e} for r, p, e in result.errors[:1000]],
        )
    elif not quiet:
        rate = f"{result.images_per_second:,.1f} images/s"
        carried = f", {result.carried:,} carried over" if result.carried else ""
        typer.echo(
            f"omni: {result.files:,} files, {result.tagged:,} tagged{carried}, "
            f"{len(result.errors):,} errors, {rate} ({result.precision}, batch {result.batch})"
            f" -> {result.output}"
        )
        for root, path, reason in result.errors[:20]:
            _say(f"  error: {Path(root) / path}: {reason}")
        if len(result.errors) > 20:
            _say(f"  ... {len(result.errors) - 20:,} more: see status = 'error' rows")
    raise typer.Exit(result.exit_code)


class _Log:
    """Where messages go: plain lines on stderr, or JSON lines on stdout (--log-json)."""

    json = False

    def emit(self, event: str, **fields) -> None:
        typer.echo(json.dumps({"event": event, **fields}, ensure_ascii=False))


_log = _Log()


def _say(message: str, event: str = "note", **fields) -> None:
    """A line on stderr, never wrapped or styled: cron logs and scripts read these."""
    if _log.json:
        _log.emit(event, message=message.removeprefix("omni: "), **fields)
    else:
        typer.echo(message, err=True)


def _guard(fn):
    """Run fn; turn the project's errors and interrupts into a message and an exit code."""
    try:
        return fn()
    except OmniError as exc:
        _say(f"omni: error: {exc}", "error", exit_code=exc.exit_code)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _say("omni: interrupted; finished rows are saved, rerun to resume", "error", exit_code=130)
        raise typer.Exit(130) from None
    except _Terminated:
        _say("omni: terminated; finished rows are saved, rerun to resume", "error", exit_code=143)
        raise typer.Exit(143) from None
    except Exception as exc:  # a bug: one line for cron, the traceback with OMNI_DEBUG=1
        if os.environ.get("OMNI_DEBUG"):
            raise
        _say(
            f"omni: internal error: {type(exc).__name__}: {exc} "
            "(rerun with OMNI_DEBUG=1 for the traceback)",
            "error",
            exit_code=1,
        )
        raise typer.Exit(1) from None


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the pipeline flushes like on Ctrl-C."""


class _Reporter:
    """Renders pipeline Progress events: a Rich bar on a terminal, notes otherwise."""

    def __init__(self, bar: bool, quiet: bool):
        self.quiet = quiet
        self.progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[errors]} errors"),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
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
                _say(f"omni: {event.message}")
            return
        if self.progress is None:
            return
        if self.task is None:
            self.task = self.progress.add_task("", total=None, errors=0)
        total = event.total if event.stage == "tag" else None
        self.progress.update(
            self.task,
            description=event.message or event.stage,
            completed=event.done,
            total=total,
            errors=event.errors,
        )


def _raise_terminated(signum, frame):
    raise _Terminated()


@app.command()
def bench(
    model: str = typer.Option("random:vit-b-32", help="Hub id, local folder or random:ARCH."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", help="auto, fp32, fp16, bf16."),
    batch: str = typer.Option("auto", help="Images per encoder batch, or 'auto'."),
    workers: int = typer.Option(None, help="Decode worker processes (default: as `tag`)."),
    images: Path = typer.Option(None, help="Folder of images to time (default: synthetic)."),
    synthetic: int = typer.Option(128, help="Synthesise this many JPEGs when no --images."),
    resolution: str = typer.Option("1024x768", help="Synthetic size: 1080p, 4k, 720p or WxH."),
    baseline: bool = typer.Option(False, help="Also time the naive loop (processor, fp32)."),
    exact: bool = typer.Option(False, help="Decode and resize as transformers does (slower)."),
    tiles: str = typer.Option("off", help="off, auto or RxC, as `tag --tiles`."),
    tile_overlap: float = typer.Option(0.5, help="Overlap between neighbouring tiles."),
    repeat: int = typer.Option(1, help="Rounds; each stage reports its fastest."),
    json_file: Path = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Time decode-only, encoder-only, end-to-end `tag` (and the naive loop) side by side."""
    from .bench import BenchConfig, render, run_bench

    def build() -> BenchConfig:
        return BenchConfig(
            model=ModelConfig(
                model=model,
                device=device,
                precision=precision,
                batch=_batch(batch),
            ),
            images=images,
            synthetic=synthetic,
            resolution=resolution,
            workers=workers,
            baseline=baseline,
            exact=exact,
            tiles=tiles,
            tile_overlap=tile_overlap,
            repeat=repeat,
        )

    cfg = _guard(build)
    report = _guard(lambda: run_bench(cfg, lambda m: err.print(f"omni: {m}", markup=False)))
    render(report, Console(highlight=False))
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


@app.command()
def vram(
    model: str = typer.Option(DEFAULT_MODEL, help="Hub id, local folder or random:ARCH."),
    precision: str = typer.Option("all", help="all, or a comma list of fp32,fp16,bf16,int8,nf4."),
    batch: str = typer.Option("1,16,64,256", help="Batch sizes (images) to estimate, comma list."),
    tiles: str = typer.Option("off", help="off, auto or RxC: views per image as `tag` makes."),
    tile_overlap: float = typer.Option(0.5, help="Overlap between neighbouring tiles, as `tag`."),
    image: str = typer.Option("3840x2160", help="WIDTHxHEIGHT the tiles are counted for."),
    budget: str = typer.Option(None, help="Memory to fit in, e.g. 8GiB (default: free memory)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    measure: bool = typer.Option(False, help="Also run the model and measure peaks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Will it fit? Weight and activation memory per precision, and the largest batch."""
    from .vram import ALL_PRECISIONS, VramConfig, estimate, human, parse_bytes

    def build() -> VramConfig:
        try:
            batches = tuple(int(b) for b in batch.split(","))
            size = tuple(int(n) for n in image.lower().split("x"))
        except ValueError:
            raise typer.BadParameter("--batch takes integers, --image WIDTHxHEIGHT") from None
        if len(size) != 2:
            raise typer.BadParameter("--image must be WIDTHxHEIGHT, e.g. 3840x2160")
        precisions = ALL_PRECISIONS if precision == "all" else tuple(precision.split(","))
        return VramConfig(
            model=model,
            precisions=precisions,
            batches=batches,
            tiles=tiles,
            tile_overlap=tile_overlap,
            image=size,
            budget=parse_bytes(budget) if budget else None,
            device=device,
            measure=measure,
        )

    report = _guard(lambda: estimate(_guard(build)))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    from rich.table import Table

    views = f", {report.views} views per image" if report.views > 1 else ""
    table = Table(title=f"{report.model} on {report.device}: budget {human(report.budget)} "
                  f"({report.budget_source}){views}")  # fmt: skip
    table.add_column("precision")
    table.add_column("weights", justify="right")
    table.add_column("per image", justify="right")
    for b in report.rows[0].estimates:
        table.add_column(f"batch {b}", justify="right")
    table.add_column("max batch", justify="right")
    for row in report.rows:
        cells = []
        for b, est in row.estimates.items():
            got = row.measured.get(b)
            cells.append(human(est) + (f" ({human(got)})" if got else ""))
        fits = "offload" if row.offload else str(row.max_batch)
        table.add_row(row.precision, human(row.weights), human(row.per_image), *cells, fits)
    console = Console(highlight=False)
    console.print(table)
    if measure:
        console.print("estimate (measured peak) per batch; peaks are weights + activations")
    for row in report.rows:
        if row.note:
            console.print(f"{row.precision}: {row.note}", markup=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
