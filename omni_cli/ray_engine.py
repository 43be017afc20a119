"""Ray engine: the same `omni tag` job on a Ray cluster, for archives that outgrow one machine.

The driver does what the local engine does around the tagging: it checks the labels, inputs and
output, takes the output's lock, lists the files and plans the work (`pipeline.prepare`,
`sources.discover`, `pipeline.plan_run`, so resume and incremental rules are the same), and
writes every row through the same crash-safe `Sink`. In between, Ray Data reads and decodes the
files in tasks (`loader.ImageDataset`, so a bad file becomes the same error record) and an actor
pool encodes them (`pipeline.load_model` and `rows.Tagger`: the same encoder, scoring and row
code). Each actor takes one GPU on a cluster with GPUs, half a CPU on a CPU-only one. Before any
work the cluster is checked: an unreachable address, or `--device cuda` on a cluster without
GPUs, fails at once instead of waiting for resources that never come. A local cluster keeps its
files under the system temp folder (or `tmp_dir`), and Ray is shut down on success, error and
Ctrl-C when this run started it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import TagConfig
from .errors import OmniError, UsageError
from .inputs.decode import Decoded, Preprocess
from .inputs.feed import Fed
from .inputs.loader import ImageDataset, collate
from .inputs.sources import FileEntry
from .output.lock import OutputLock
from .output.rows import Tagger
from .pipeline import (
    Progress,
    TagResult,
    decode_spec,
    list_inputs,
    load_model,
    plan_run,
    prepare,
    write_rows,
)

CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's address before giving up
ENCODER_CPUS = 0.5  # CPUs an encoder actor reserves on a CPU-only cluster
DECODE_BATCH = 16  # files per decode task
DEFAULT_PORT = 6379  # what `ray start --head` listens on

# The columns a decoded file travels in, from the decode tasks to the encoder actors.
DECODED = pa.schema(
    [
        ("root", pa.string()),
        ("rel", pa.string()),
        ("path", pa.string()),
        ("bytes", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("error", pa.string()),  # the reason it has no pixels: stat or decode failed
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("views", pa.int32()),
        ("pixels", pa.large_binary()),  # (views, 3, size, size) uint8, C order
    ]
)


class ClusterError(OmniError):
    """The Ray cluster cannot be reached or started."""


@dataclass(frozen=True)
class Placement:
    """Where the encoder actors run: the device they load on, and what each one reserves."""

    device: str  # cuda or cpu
    actors: int  # the most actors at once
    num_gpus: float
    num_cpus: float


def tag_ray(
    cfg: TagConfig,
    on_progress: Callable[[Progress], None] | None = None,
    address: str | None = None,
    tmp_dir: Path | None = None,
) -> TagResult:
    """Run one `omni tag` job on Ray (a new local cluster, or the one at `address`)."""
    ray = _import_ray()
    emit = on_progress or (lambda event: None)
    labels, prompts = prepare(cfg)
    if address:
        check_reachable(address)
    with OutputLock(cfg.output):
        listing = list_inputs(cfg, labels, prompts, emit)
        if listing.result is not None:  # nothing to do: no cluster to start
            return listing.result
        total = len(listing.entries)
        emit(Progress("model", total=total, message="starting Ray"))
        started_here = _start(ray, address, tmp_dir)
        try:
            place = placement(ray.cluster_resources(), cfg.model.device)
            emit(Progress("model", total=total, message=f"loading {cfg.model.model}"))
            actor_cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, device=place.device)
            )
            encoder, classifier = _loaded(ray, actor_cfg, place, prompts)
            plan, tagger = plan_run(cfg, listing, encoder, classifier, labels, prompts, emit)
            listing = listing.planned(cfg)
            result = _run(ray, cfg, actor_cfg, place, plan, tagger, encoder, prompts, labels,
                          emit)  # fmt: skip
            result.unlisted = listing.unlisted
            listing.done(cfg)
            return result
        finally:
            if started_here:
                ray.shutdown()


def _run(ray, cfg: TagConfig, actor_cfg: TagConfig, place: Placement, plan, tagger, encoder,
         prompts, labels, emit) -> TagResult:  # fmt: skip
    """Tag the plan's files on the cluster and write the output (under the driver's lock)."""
    names = [lab.name for lab in labels]
    tables = _dataset(ray, actor_cfg, place, plan, encoder, prompts, names) if plan.todo else []
    rows = (
        pa.RecordBatch.from_arrays(batch.columns, schema=plan.schema)
        for table in tables
        for batch in table.to_batches()
    )
    return write_rows(cfg, plan, encoder, rows, emit, tagger=tagger)


def _loaded(ray, actor_cfg: TagConfig, place: Placement, prompts):
    """The encoder and classifier the actors will load (precision, revision, batch, label
    classifier): the driver needs them for the output's metadata and for rescoring carried
    rows, and may have no GPU, so one worker placed like an actor loads them."""
    describe = ray.remote(_describe).options(num_cpus=place.num_cpus, num_gpus=place.num_gpus)
    return ray.get(describe.remote(actor_cfg, prompts))


def _dataset(ray, cfg: TagConfig, place: Placement, plan, encoder, prompts, names):
    """Ray Data: todo entries -> decode tasks -> encoder actors -> output tables, in order."""
    from ray.data import ActorPoolStrategy, DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.preserve_order = True  # rows in listing order, as the local engine
    items = [dataclasses.asdict(e) | {"identity": None} for e in plan.todo]
    blocks = max(1, min(len(items) // DECODE_BATCH, 1000))
    spec = decode_spec(cfg, encoder)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_files, fn_kwargs={"spec": spec}, batch_size=DECODE_BATCH, batch_format="pyarrow"
    )
    with warnings.catch_warnings():  # Ray 2.60 names no parameter for max_restarts yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={
                "cfg": cfg,
                "prompts": prompts,
                "names": names,
                "schema": plan.schema,
                "side": spec.size,
            },
            batch_size=encoder.batch,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=place.actors),
            num_gpus=place.num_gpus,
            num_cpus=place.num_cpus,
            # Restarting an actor whose constructor arguments sit in the object store is unreliable
            # in Ray (ray-project/ray#53727) and logs an error line per pool; a lost actor fails the
            # run instead, and the rerun resumes from the rows already flushed to OUT.partial/.
            max_restarts=0,
        )
    return ds.iter_batches(batch_size=None, batch_format="pyarrow")


def decode_files(files: pa.Table, spec: Preprocess) -> pa.Table:
    """Decode task: file entries -> their views as bytes, or the reason there are none."""
    entries = [FileEntry(**row) for row in files.to_pylist()]
    dataset = ImageDataset(entries, spec)
    rows = {name: [] for name in DECODED.names}
    for i, entry in enumerate(entries):
        _, result = dataset[i]
        for name in ("root", "rel", "path", "bytes", "mtime_ns"):
            rows[name].append(getattr(entry, name))
        bad = isinstance(result, str)
        rows["error"].append(result if bad else None)
        rows["width"].append(None if bad else result.width)
        rows["height"].append(None if bad else result.height)
        rows["views"].append(None if bad else len(result.pixels))
        rows["pixels"].append(None if bad else result.pixels.tobytes())
    return pa.Table.from_pydict(rows, schema=DECODED)


class EncodeActor:
    """Encoder actor: loads the model once, then turns decoded files into output rows."""

    def __init__(self, cfg: TagConfig, prompts, names: list[str], schema: pa.Schema, side: int):
        encoder, classifier = load_model(cfg, prompts)
        self.tagger = Tagger(
            encoder, classifier, names, schema, top_k=cfg.top_k, threshold=cfg.threshold
        )
        self.side = side

    def __call__(self, decoded: pa.Table) -> pa.Table:
        items = []
        for row in decoded.to_pylist():
            entry = FileEntry(*(row[k] for k in ("root", "rel", "path", "bytes", "mtime_ns")))
            if row["error"] is not None:
                items.append((entry, row["error"]))
                continue
            pixels = np.frombuffer(row["pixels"], np.uint8)
            pixels = pixels.reshape(row["views"], 3, self.side, self.side)  # (views, 3, H, W)
            items.append((entry, Decoded(pixels, row["width"], row["height"])))
        batch = collate(items)
        fed = Fed(batch.items, batch.pixels.to(self.tagger.encoder.device))
        return pa.Table.from_batches([self.tagger.rows(fed)])


def _describe(cfg: TagConfig, prompts):
    """On a worker placed like an actor: the loaded encoder without its model, and the classifier.

    Scoring carried rows and the output's metadata need only the encoder's settings, so the
    weights stay on the worker.
    """
    import torch

    encoder, classifier = load_model(cfg, prompts)
    cpu = torch.device("cpu")
    light = dataclasses.replace(
        encoder,
        model=None,
        tokenizer=None,
        vision=None,  # the runtime's engine (runtimes.py) stays with the weights
        device=cpu,
        mean=encoder.mean.cpu(),
        std=encoder.std.cpu(),
    )
    return light, classifier.cpu()


def placement(resources: dict, device: str) -> Placement:
    """Decide the actors' device and reservations from the cluster's resources."""
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    if device == "mps":
        raise UsageError("--engine ray runs on CUDA GPUs or CPUs, not mps")
    if device.startswith("cuda") and not gpus:
        raise UsageError(
            f"--device {device}: the Ray cluster has no GPUs ({cpus:g} CPUs); "
            "use --device cpu or auto, or add GPU nodes"
        )
    if cpus < ENCODER_CPUS and not gpus:
        raise UsageError("the Ray cluster has no CPUs to run on")
    if gpus and device != "cpu":
        return Placement("cuda", actors=gpus, num_gpus=1, num_cpus=1 if cpus >= 2 * gpus else 0)
    # CPU-only: half the cores encode (one thread each), the other half decode.
    return Placement("cpu", actors=max(1, int(cpus // 2)), num_gpus=0, num_cpus=ENCODER_CPUS)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail at once if nothing listens at `address` (Ray itself retries for minutes)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":") if ":" in target else (target, "", "")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise UsageError(f"--ray-address must be HOST:PORT, not '{address}'") from None
    try:
        with socket.create_connection((host, number), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer in {timeout:g} s"
        raise ClusterError(
            f"cannot reach the Ray cluster at {address}: {reason} "
            "(is `ray start --head` running there, and the port open?)"
        ) from None


def _start(ray, address: str | None, tmp_dir: Path | None) -> bool:
    """Connect to `address` or start a local cluster; True if this call started Ray."""
    if ray.is_initialized():
        return False  # the caller's session (a library user, a test): use it, leave it running
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            folder = Path(tmp_dir) if tmp_dir else Path(tempfile.gettempdir()) / "omni-ray"
            folder.mkdir(parents=True, exist_ok=True)
            ray.init(_temp_dir=str(folder.resolve()), **quiet)
    except ConnectionError as exc:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    return True


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(
            "--engine ray needs Ray: pip install -e '.[ray]' (the ray extra of omni-cli)"
        ) from None
    return ray
