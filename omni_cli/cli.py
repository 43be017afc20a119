"""The `omni` command line: parse options, build a config, call the core, print.

Nothing here decides how work is done. Each command turns its options into the frozen config
of `config.py` (options that several commands share go through the same parser), calls the
public API, and renders progress events (a Rich bar on a terminal, nothing otherwise) and a
one-line summary. Every usage mistake is one line `omni: error: ...` and exit 2, before any
work and before torch is imported; the project's errors become a line and the exit code
design.md lists; an interrupted run exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from typer.core import TyperGroup

from . import __version__
from .config import (
    ALL_PRECISIONS,
    DEFAULT_MODEL,
    DEFAULT_THRESHOLD,
    BenchConfig,
    DecodeConfig,
    ModelConfig,
    TagConfig,
    VramConfig,
    parse_batch,
    parse_bytes,
    parse_device,
    parse_overlap,
    parse_precision,
    parse_runtime,
    parse_size,
    parse_tiles,
)
from .errors import OmniError, Terminated, UsageError
from .model import archs, hub
from .text import json_printable, plural, printable


class _OptionError(typer.BadParameter):
    """A bad option value, said in omni's own words (click would prefix 'Invalid value')."""

    def format_message(self) -> str:
        return self.message


def _click_error(exc: BaseException) -> bool:
    """A click usage or command error (typer vendors click in some versions: no isinstance)."""
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


class _Group(TyperGroup):
    """Click's usage errors as one line on stderr and exit 2, like the project's own."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.Abort:
            _say("omni: interrupted", "error", exit_code=130)
            sys.exit(130)
        except Exception as exc:
            if not _click_error(exc):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # `omni` alone: the help
                exc.show()
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            command = " ".join(["omni", *ctx.command_path.split()[1:]]) if ctx else "omni"
            hint = f" (see '{command} --help')" if exc.exit_code == 2 else ""
            _say(f"omni: error: {exc.format_message()}{hint}", "error", exit_code=exc.exit_code)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="Batch zero-shot image tagging with CLIP: folders of images in, Parquet out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _plain_argument_help() -> None:
    """Typer 0.29 shows arguments as `{paths}...` and `<list[Path]>`: show them as click does.

    (Typer 0.27 also takes a metavar equal to the option's name in capitals for its name:
    `--MODEL`. No metavar here is one.)
    """
    argument = getattr(typer.core, "TyperArgument", None)
    if argument is None:
        return
    argument.display_type = lambda self, ctx: ""
    argument._usage_display_name = lambda self: (
        (self.metavar or self.name.upper()) + ("..." if self.nargs != 1 else "")
    )


_plain_argument_help()


def _check(parse: Callable, option: str):
    """A Typer callback running one of config.py's parsers: its message, exit 2."""

    def callback(value):
        if value is None:
            return None
        try:
            return parse(value, option)
        except UsageError as exc:
            raise _OptionError(str(exc)) from None

    return callback


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


# Options that several commands share: one definition, one parser.
def _model_option(default: str = DEFAULT_MODEL, extra: str = ""):
    return typer.Option(
        default, metavar="HUB_ID|DIR", help=f"Hugging Face hub id or local model folder{extra}."
    )


def _random_archs() -> str:
    """`, or random:vit-b-32 / ...`: every architecture `random:` builds (model/archs.py)."""
    return ", or " + " / ".join(archs.PREFIX + name for name in archs.ARCHS)


def _revision_option():
    return typer.Option(
        None,
        metavar="REV",
        help="Pin a hub model to a branch, tag or commit (as transformers' revision). Results "
        "record the model's weights, so a hub commit that only edits files around them "
        "changes nothing.",
    )


def _device_option():
    return typer.Option(
        "auto",
        metavar="auto|cpu|cuda[:N]|mps",
        callback=_check(parse_device, "--device"),
        help="auto, cpu, cuda, cuda:N or mps.",
    )


def _precision_option():
    return typer.Option(
        "auto",
        metavar="auto|fp32|fp16|bf16|int8|nf4",
        callback=_check(parse_precision, "--precision"),
        help="auto, fp32, fp16, bf16, int8 or nf4. auto: bf16 where the device "
        "computes it natively, else fp16 on GPUs, fp32 on CPUs.",
    )


def _batch_option():
    return typer.Option(
        "auto",
        metavar="N|auto",
        callback=_check(parse_batch, "--batch"),
        help="Views per encoder forward (an image is one view, more with "
        "--tiles), or auto: the most that fit on a GPU, 32 on a CPU.",
    )


def _runtime_option(bench: bool = False):
    check = _check(parse_runtime, "--runtime")
    return typer.Option(
        "auto",
        metavar="auto|eager|compile|onnx|openvino|tensorrt" + ("|all" if bench else ""),
        callback=(lambda v: v if v == "all" else check(v)) if bench else check,
        help="What runs the image encoder: PyTorch eager, torch.compile, ONNX Runtime, "
        "OpenVINO (CPU) or TensorRT (CUDA), each where installed. auto: OpenVINO on a "
        "CPU where installed (fp32, bf16), else eager."
        + (
            " all: time every installed one's encoder beside eager (tag uses auto)."
            if bench
            else ""
        ),  # fmt: skip
    )


def _tiles_option():
    return typer.Option(
        "off",
        metavar="off|auto|RxC",
        callback=_check(parse_tiles, "--tiles"),
        help="Also score square tiles of large images: auto, or a fixed grid "
        "of R rows and C columns.",
    )


def _overlap_option():
    return typer.Option(
        0.5,
        metavar="FRACTION",
        callback=_check(parse_overlap, "--tile-overlap"),
        help="Overlap between neighbouring tiles, in [0, 0.9).",
    )


def _workers_option():
    return typer.Option(
        None,
        metavar="N",
        min=0,
        help="Decode worker processes (default: on a GPU one per core but one; "
        "on a CPU cores // 8).",
    )


@app.command()
def tag(
    paths: list[Path] = typer.Argument(..., metavar="PATH", help="Folders or image files."),
    labels: Path = typer.Option(
        ..., "--labels", "-l", metavar="FILE", help="Labels file: one label per line."
    ),
    output: Path = typer.Option(
        Path("tags.parquet"),
        "--output",
        "-o",
        metavar="OUT",
        help="NAME.parquet: one Parquet file; any other name: an archive folder of parts, "
        "where a nightly run rewrites only the parts that changed.",
    ),
    model: str = _model_option(),
    revision: str = _revision_option(),
    device: str = _device_option(),
    precision: str = _precision_option(),
    batch: str = _batch_option(),
    max_gpu_memory: str = typer.Option(
        None,
        metavar="SIZE",
        callback=_check(parse_bytes, "--max-gpu-memory"),
        help="Cap on GPU memory for the model (e.g. 6GiB); the rest is placed on the CPU.",
    ),
    runtime: str = _runtime_option(),
    workers: int = _workers_option(),
    decode: str = typer.Option(
        "auto",
        metavar="auto|cpu|gpu",
        help="Where JPEGs are decoded. auto: on a CUDA GPU with nvImageCodec "
        "or torchvision's nvJPEG, split between the GPU and the CPU "
        "workers as measured while running; else the CPU. cpu or gpu pins "
        "each file's decoder, for runs that must reproduce exactly.",
    ),
    template: str = typer.Option(
        "a photo of a {}.",
        metavar="TEXT",
        help="Prompt with {} for the label; or imagenet (the CLIP "
        "paper's 80 prompts, averaged); or none (the label alone).",
    ),
    top_k: int = typer.Option(5, min=0, metavar="K", help="Most tags kept in top_labels."),
    threshold: float = typer.Option(
        DEFAULT_THRESHOLD,
        min=0.0,
        max=1.0,
        metavar="T",
        help="Tag the labels whose score (column scores: does this label apply, 0-1, "
        "independent of the other labels) reaches T; 0 keeps the top-k whatever their score.",
    ),
    recursive: bool = typer.Option(True, help="Descend into sub-folders."),
    exact: bool = typer.Option(
        False,
        help="Decode and resize exactly as transformers' PIL image processor does "
        "(slower: no JPEG draft decoding, the model's own filter; on the CPU).",
    ),
    tiles: str = _tiles_option(),
    tile_overlap: float = _overlap_option(),
    max_pixels: int = typer.Option(
        DecodeConfig.max_pixels,
        min=1,
        metavar="N",
        help="Refuse larger images (decompression bombs).",
    ),
    decode_timeout: float = typer.Option(
        DecodeConfig.decode_timeout,
        min=0.1,
        metavar="SECONDS",
        help="A file whose decode takes longer is an error row (decoder timed out); "
        "only with --workers >= 1.",
    ),
    save_embeddings: bool = typer.Option(
        False,
        help="Store every view's embedding (float16): for omni search, and to rescore "
        "new labels without decoding again.",
    ),
    resume: bool = typer.Option(True, help="Pick up rows flushed by an interrupted run."),
    full: bool = typer.Option(
        False,
        help="Re-tag everything: ignore the previous output and an interrupted run, "
        "even if they were made with other options.",
    ),
    allow_shrink: bool = typer.Option(
        False,
        "--allow-shrink",
        help="Let this run drop the rows of files that are gone even when that empties an "
        "input or drops more than half of the output (refused otherwise: an unmounted share "
        "looks like an empty folder).",
    ),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Read every file and compare its content hash with the one recorded by the "
        "last --verify run (kept in OUT.hashes): catches files rewritten with their size and "
        "mtime restored. Costs a read of the whole archive.",
    ),
    flush_rows: int = typer.Option(
        1024, min=1, metavar="N", help="Rows per crash-safe flush to OUT.partial/."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
    log_json: bool = typer.Option(
        False, "--log-json", help="JSON lines on stdout (notes, summary, errors) for machines."
    ),
    engine: str = typer.Option(
        "local", metavar="local|ray", help="ray: run on a Ray cluster (pip install -e '.[ray]')."
    ),
    ray_address: str = typer.Option(
        None,
        metavar="HOST:PORT",
        help="With --engine ray: the cluster's address (default: start a local one).",
    ),
    ray_tmp: Path = typer.Option(
        None,
        metavar="DIR",
        help="With --engine ray: the local cluster's temp folder.",
    ),
) -> None:
    """Tag every image under PATH... with its similarity to each label, into one Parquet file.

    Incremental: files unchanged since the last run are carried over; when nothing changed
    the output is left as it is, without loading the model. A previous output made with
    another model, precision, preprocessing or tiling is not replaced unless --full.

    Exit codes: 0 all tagged; 1 fatal error, or an input that is empty or unreadable while the
    output holds its rows (nothing touched); 2 usage error; 3 finished, but some files or
    folders could not be read (they are `error` rows, or their rows are kept); 4 another run
    holds the output's lock; 130/143 interrupted (finished rows are saved: rerun to resume).
    """
    if engine not in ("local", "ray"):
        raise _OptionError(f"--engine must be local or ray, not '{engine}'")
    if engine == "local" and (ray_address or ray_tmp):
        raise _OptionError("--ray-address and --ray-tmp need --engine ray")

    def build() -> TagConfig:
        return TagConfig(
            inputs=tuple(paths),
            labels_file=labels,
            output=output,
            model=ModelConfig(
                model=model,
                device=device,
                precision=precision,
                batch=batch,
                max_gpu_memory=max_gpu_memory,
                revision=revision,
                runtime=runtime,
            ),
            decode=DecodeConfig(
                decoder=decode,
                exact=exact,
                tiles=tiles,
                tile_overlap=tile_overlap,
                max_pixels=max_pixels,
                decode_timeout=decode_timeout,
            ),
            workers=workers,
            template=template,
            top_k=top_k,
            threshold=threshold,
            recursive=recursive,
            save_embeddings=save_embeddings,
            resume=resume,
            full=full,
            allow_shrink=allow_shrink,
            verify=verify,
            flush_rows=flush_rows,
        )

    _log.json = log_json
    cfg = _guard(build)
    from .pipeline import tag as run_tag

    if engine == "ray":
        from .ray_engine import tag_ray

        run_tag = functools.partial(tag_ray, address=ray_address, tmp_dir=ray_tmp)
    show_bar = not quiet and not log_json and sys.stderr.isatty()
    with _Reporter(show_bar, quiet) as reporter:
        result = _guard(lambda: run_tag(cfg, reporter))
    _summary(result, quiet, log_json)
    raise typer.Exit(result.exit_code)


def _summary(result, quiet: bool, log_json: bool) -> None:
    if log_json:
        _log.emit(
            "summary",
            output=str(result.output),
            files=result.files,
            tagged=result.tagged,
            failed=result.failed,
            carried=result.carried,
            unchanged=result.unchanged,
            errors=len(result.errors),
            seconds=round(result.seconds, 3),
            images_per_second=round(result.images_per_second, 2),
            precision=result.precision,
            batch=result.batch,
            exit_code=result.exit_code,
            error_files=[{"root": r, "path": p, "error": e} for r, p, e in result.errors[:1000]],
            unlisted=[{"root": r, "folder": f, "error": e} for r, f, e in result.unlisted],
        )
        return
    if quiet:
        return
    if result.unchanged:
        kept = f" ({plural(len(result.errors), 'error row')} kept)" if result.errors else ""
        _echo(
            f"omni: {plural(result.files, 'file')}, nothing changed since the last run{kept}: "
            f"{result.output} left as it was"
        )
    else:
        carried = f", {result.carried:,} carried over" if result.carried else ""
        rate = f"{result.images_per_second:,.1f} images/s" if result.tagged else "nothing to tag"
        if result.retopped:
            rate += f", {plural(result.retopped, 'carried row')} scored again"
        _echo(
            f"omni: {plural(result.files, 'file')}, {result.tagged:,} tagged, {result.failed:,} "
            f"failed{carried}; {rate} ({result.precision}, {plural(result.batch, 'view')} per "
            f"forward) -> {result.output}"
        )
    for root, folder, reason in result.unlisted[:20]:
        _say(f"  not listed: {Path(root) / folder}: {reason} (its rows are kept)")
    for root, path, reason in result.errors[:20]:
        _say(f"  error: {Path(root) / path}: {reason}")
    if len(result.errors) > 20:
        _say(f"  ... {len(result.errors) - 20:,} more: see status = 'error' rows")


class _Log:
    """Where messages go: plain lines on stderr, or JSON lines on stdout (--log-json)."""

    json = False

    def emit(self, event: str, **fields) -> None:
        typer.echo(json_printable(json.dumps({"event": event, **fields}, ensure_ascii=False)))


_log = _Log()


def _say(message: str, event: str = "note", **fields) -> None:
    """A line on stderr, never wrapped or styled: cron logs and scripts read these."""
    if _log.json:
        _log.emit(event, message=message.removeprefix("omni: "), **fields)
    else:
        _echo(message, err=True)


def _echo(message: str, err: bool = False) -> None:
    """Print a line whose file names are shown, not obeyed (see text.printable)."""
    typer.echo(printable(message), err=err)


def _guard(fn):
    """Run fn; turn the project's errors and interrupts into a message and an exit code."""
    try:
        return fn()
    except typer.Exit:
        raise
    except OmniError as exc:
        _say(f"omni: error: {exc}", "error", exit_code=exc.exit_code)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _say("omni: interrupted before any row was finished", "error", exit_code=130)
        raise typer.Exit(130) from None
    except Terminated:
        _say("omni: terminated before any row was finished", "error", exit_code=143)
        raise typer.Exit(143) from None
    except Exception as exc:  # a bug: one line for cron, the traceback with OMNI_DEBUG=1
        if _click_error(exc) or os.environ.get("OMNI_DEBUG"):
            raise  # a usage error: _Group reports it
        _say(
            f"omni: internal error: {type(exc).__name__}: {exc} "
            "(rerun with OMNI_DEBUG=1 for the traceback)",
            "error",
            exit_code=1,
        )
        raise typer.Exit(1) from None


class _Reporter:
    """Renders pipeline Progress events: a Rich bar on a terminal, notes otherwise."""

    def __init__(self, bar: bool, quiet: bool):
        self.quiet = quiet
        self.progress = _progress() if bar else None
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
        from rich.markup import escape

        self.progress.update(
            self.task,
            description=escape(printable(event.message or event.stage)),
            completed=event.done,
            total=total,
            errors=event.errors,
        )


def _progress(*columns):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = columns or (TextColumn("{task.fields[errors]} errors"),)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _raise_terminated(signum, frame):
    raise Terminated()


@app.command()
def bench(
    model: str = _model_option("random:vit-b-32", _random_archs()),
    revision: str = _revision_option(),
    device: str = _device_option(),
    precision: str = _precision_option(),
    batch: str = _batch_option(),
    runtime: str = _runtime_option(bench=True),
    workers: int = _workers_option(),
    images: Path = typer.Option(
        None, metavar="DIR", help="Folder of images to time (default: synthetic JPEGs)."
    ),
    synthetic: int = typer.Option(
        128, min=1, metavar="N", help="Synthesise this many JPEGs when no --images."
    ),
    resolution: str = typer.Option(
        "1024x768", metavar="SIZE", help="Synthetic size: 1080p, 4k, 720p or WxH."
    ),
    baseline: bool = typer.Option(
        False,
        help="Also time the naive loop: the model's image processor per batch of 8, full "
        "forward with texts, fp32.",
    ),
    exact: bool = typer.Option(False, help="Decode and resize as transformers does (slower)."),
    tiles: str = _tiles_option(),
    tile_overlap: float = _overlap_option(),
    decode: str = typer.Option(
        "all",
        metavar="all|auto|cpu|gpu",
        help="Decode modes to time: all (cpu, gpu and hybrid with a GPU JPEG decoder), or one.",
    ),
    repeat: int = typer.Option(1, min=1, metavar="N", help="Rounds; each stage keeps its best."),
    stages: str = typer.Option(
        "decode,encoder,tag", metavar="LIST", help="Stages to time: decode, encoder, tag."
    ),
    json_file: Path = typer.Option(
        None, "--json", metavar="FILE", help="Also write the report as JSON here."
    ),
) -> None:
    """Time decode only, encoder only and end-to-end `tag` side by side, and where time goes."""

    def build():
        return BenchConfig(
            model=ModelConfig(
                model=model,
                device=device,
                precision=precision,
                batch=batch,
                revision=revision,
                runtime="auto" if runtime == "all" else runtime,
            ),  # fmt: skip
            runtimes=runtime,
            images=images,
            synthetic=synthetic,
            resolution=resolution,
            workers=workers,
            baseline=baseline,
            exact=exact,
            tiles=tiles,
            tile_overlap=tile_overlap,
            decode=decode,
            repeat=repeat,
            stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
        )

    cfg = _guard(build)
    _guard(lambda: hub.check(model, revision))  # a misspelled --model: before torch
    from rich.console import Console

    from .tools.bench import render, run_bench

    err = Console(stderr=True, highlight=False)
    report = _guard(
        lambda: run_bench(cfg, lambda m: err.print(f"omni: {printable(m)}", markup=False))
    )
    render(report, _console())
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def _console():
    """stdout for tables: as wide as a terminal, or wide enough when piped to a file."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


@app.command()
def vram(
    model: str = _model_option(extra=_random_archs()),
    revision: str = _revision_option(),
    precision: str = typer.Option(
        "all", metavar="PRECISIONS", help="all, or a comma list of fp32,fp16,bf16,int8,nf4."
    ),
    batch: str = typer.Option(
        "1,16,64,256", metavar="N,N,...", help="Views per forward to estimate, as tag --batch."
    ),
    tiles: str = _tiles_option(),
    tile_overlap: float = _overlap_option(),
    image: str = typer.Option(
        "3840x2160",
        metavar="WxH",
        callback=_check(parse_size, "--image"),
        help="Image size the tiles are counted for.",
    ),
    budget: str = typer.Option(
        None,
        metavar="SIZE",
        callback=_check(parse_bytes, "--budget"),
        help="Memory to fit in, e.g. 8GiB (default: free memory).",
    ),
    device: str = typer.Option(
        "auto",
        metavar="auto|cpu|cuda[:N]|mps",
        callback=_check(parse_device, "--device"),
        help="auto, cpu, cuda or cuda:N.",
    ),
    measure: bool = typer.Option(False, help="Also run the model and measure the peaks."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Will it fit? Weight and activation memory per precision, and the most views per forward."""

    def build():
        try:
            batches = tuple(parse_batch(b.strip(), "--batch") for b in batch.split(","))
        except UsageError:
            raise UsageError(
                f"--batch takes whole numbers of views, e.g. 1,16,256, not '{batch}'"
            ) from None
        precisions = ALL_PRECISIONS if precision == "all" else tuple(precision.split(","))
        return VramConfig(
            model=model,
            precisions=precisions,
            batches=batches,
            tiles=tiles,
            tile_overlap=tile_overlap,
            image=image,
            budget=budget,
            device=device,
            measure=measure,
            revision=revision,
        )

    cfg = _guard(build)
    _guard(lambda: hub.check(model, revision))  # a misspelled --model: before torch
    from .tools.vram import estimate, render

    report = _guard(lambda: estimate(cfg))
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    render(report, _console(), measured=measure)


@app.command()
def report(
    source: Path = typer.Argument(..., metavar="OUT.parquet", help="An `omni tag` output."),
    output: Path = typer.Option(
        Path("report.html"), "--output", "-o", metavar="FILE", help="HTML file to write."
    ),
    per_label: int = typer.Option(
        24, min=1, metavar="N", help="Images shown per label, highest scores first."
    ),
    labels: str = typer.Option(
        None, metavar="A,B,...", help="Comma list of the labels to show (default: all)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite the -o file even if it is not an omni report."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
) -> None:
    """Write one self-contained HTML page to look at a tag output.

    Per label, the images that score highest and a histogram of the scores; the images that
    got no tag; the error rows and their reasons. It opens from disk, with no server and no
    network. Only the images shown are opened; a file that is gone shows a placeholder.
    """
    from .look.report import ReportConfig, build_report

    def build() -> ReportConfig:
        wanted = (
            None if labels is None else tuple(x.strip() for x in labels.split(",") if x.strip())
        )
        return ReportConfig(
            source=source, output=output, per_label=per_label, labels=wanted, force=force
        )

    cfg = _guard(build)
    with _bar(not quiet and sys.stderr.isatty(), "thumbnails") as progress:
        result = _guard(lambda: build_report(cfg, progress))
    if not quiet:
        for note in result.notes:
            _say(f"omni: {note}")
        if result.replaced:
            _say(f"omni: replaced {result.output}")
        lost = [f"{result.missing:,} not found"] if result.missing else []
        lost += [f"{result.unreadable:,} unreadable"] if result.unreadable else []
        lost = f" ({', '.join(lost)})" if lost else ""
        _echo(
            f"omni: {plural(result.rows, 'row')}, {plural(result.thumbnails, 'image')} shown"
            f"{lost}, {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s -> {result.output}"
        )


@app.command()
def search(
    source: Path = typer.Argument(
        ..., metavar="OUT.parquet", help="An output of `omni tag --save-embeddings`."
    ),
    query: str = typer.Argument(None, metavar="TEXT", help="What to look for, in words."),
    image: Path = typer.Option(
        None, "--image", metavar="FILE", help="Look for images like this one instead."
    ),
    k: int = typer.Option(20, "-k", metavar="N", help="How many images to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    model: str = typer.Option(
        None,
        metavar="HUB_ID|DIR",
        help="Model for the query (default: the one named in the file, which made them).",
    ),
    revision: str = _revision_option(),
    device: str = _device_option(),
) -> None:
    """Rank the images of a tag output by similarity to a text or to an image.

    Uses the embeddings stored by `omni tag --save-embeddings`: nothing in the archive is
    decoded again, only the query is encoded (by the model that tagged the file). The first
    search builds an index beside the output (OUT.index/, one segment per Parquet file);
    later ones read it, rebuilding only the segments of files that changed. Scores are
    cosine similarities. With tiles an image has several views (global, squares, tiles) and
    its score is its best view's, so a small object seen by one tile is found.

    Exit codes: 0 found; 1 fatal error; 2 usage error, including a file without embeddings.
    """
    from .look.search import search as run_search

    with _bar(sys.stderr.isatty(), "indexing embeddings") as progress:
        found = _guard(
            lambda: run_search(
                source, text=query, image=image, k=k, model=model, device=device,
                revision=revision, progress=progress,
            )
        )  # fmt: skip
    if found.index.rebuilt:
        files = plural(len(found.index.segments), "file")
        _say(f"omni: indexed {found.index.rebuilt:,} of {files} -> {found.index.folder}")
    for note in found.notes:
        _say(f"omni: {note}")
    hits = found.hits
    if as_json:
        rows = [{**dataclasses.asdict(h), "score": round(h.score, 4)} for h in hits]
        typer.echo(json_printable(json.dumps(rows, ensure_ascii=False, indent=2)))
        return
    typer.echo("rank  score   path")
    for h in hits:
        _echo(f"{h.rank:>4}  {h.score:.4f}  {h.file}")


@contextlib.contextmanager
def _bar(show: bool, description: str):
    """A Rich bar on stderr fed by (done, total) callbacks; None where there is no terminal."""
    if not show:
        yield None
        return
    with _progress() as progress:
        task = progress.add_task(description, total=None, errors=0)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
