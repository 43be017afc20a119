"""Memory model and probes behind `omni vram`: will this model, at this precision, fit?

Weight memory is exact: the architecture is built from its config on the `meta` device (no
weights are read) and every tensor is counted in the format it would be stored in (fp32, fp16,
bf16, PyTorch dynamic int8, bitsandbytes LLM.int8 or NF4). Activation memory per view is an
analytic formula over the vision tower's shape, checked against measured peaks
(`benchmarks/vram_check.py`): on CUDA `max_memory_allocated`, on the CPU the peak resident-set
growth of a fresh process whose allocator returns freed blocks to the OS. The largest batch that
fits is what the budget (free GPU memory, available RAM on the CPU, or `--budget`) leaves after
the weights, less a headroom for allocator fragmentation.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import torch

from ..config import VramConfig
from ..errors import ModelError, UsageError
from ..inputs import tiling
from ..model import archs

ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}
HEADROOM = 0.10  # of the budget, kept free for allocator fragmentation
CUDA_WORKSPACE = 64 << 20  # cuBLAS workspace and allocator rounding on CUDA, bytes
NF4_BLOCK = 64  # bitsandbytes 4-bit: one fp32 absmax per 64 weights


def human(n: float) -> str:
    """Bytes in binary units, three significant figures (no exponent): `1.23 GiB`, `1000 KiB`."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


@dataclass
class Row:
    """One precision: weights, activations per image, what batches cost and which fits."""

    precision: str
    weights: int  # bytes, whole model (both towers, as `omni tag` loads it)
    per_view: int  # activation bytes per encoded view
    per_image: int  # per_view x views of one image
    estimates: dict[int, int]  # views per forward -> estimated peak bytes
    max_batch: int  # most views per forward that fit the budget; 0 = weights do not fit
    offload: bool  # weights alone exceed the budget: needs --max-gpu-memory (CPU offload)
    measured: dict[int, int] = field(default_factory=dict)  # batch -> measured peak bytes
    note: str = ""


@dataclass
class Report:
    model: str
    device: str
    budget: int
    budget_source: str
    views: int
    image_size: int
    rows: list[Row]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "device": self.device,
            "budget": self.budget,
            "budget_source": self.budget_source,
            "headroom": HEADROOM,
            "views_per_image": self.views,
            "input_size": self.image_size,
            "rows": [
                {"precision": r.precision, "weights": r.weights,
                 "activation_per_view": r.per_view, "activation_per_image": r.per_image,
                 "estimated_peak": {str(b): v for b, v in r.estimates.items()},
                 "measured_peak": {str(b): v for b, v in r.measured.items()},
                 "max_batch": r.max_batch, "max_images_per_forward": r.max_batch // self.views,
                 "needs_offload": r.offload, "note": r.note}
                for r in self.rows
            ],
        }  # fmt: skip


def estimate(cfg: VramConfig) -> Report:
    """The memory model for every precision in `cfg`; measures too with `cfg.measure`."""
    device = _device(cfg.device)
    config = model_config(cfg.model, cfg.revision)
    meta = meta_model(config)
    vision = config.vision_config
    views = views_per_image(cfg.tiles, cfg.image, cfg.tile_overlap, vision.image_size)
    budget, source = (cfg.budget, "--budget") if cfg.budget else detect_budget(device)
    rows = []
    for precision in cfg.precisions:
        weights = weight_bytes(meta, precision, device)
        per_view = activation_bytes(vision, precision, device)
        fixed = CUDA_WORKSPACE if device.type == "cuda" else 0
        per_image = per_view * views
        estimates = {b: weights + fixed + b * per_view for b in cfg.batches}
        room = budget * (1 - HEADROOM) - weights - fixed
        max_batch = max(0, int(room // per_view))
        row = Row(precision, weights, per_view, per_image, estimates, max_batch,
                  offload=weights + fixed > budget * (1 - HEADROOM))  # fmt: skip
        if row.offload:
            row.note = "weights exceed the budget: needs --max-gpu-memory (layers on the CPU)"
        if cfg.measure:
            row.measured, row.note = _measure_row(cfg, precision, device, views, row.note)
        rows.append(row)
    return Report(cfg.model, str(device), budget, source, views, vision.image_size, rows)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to PyTorch")
    return torch.device(name)


def model_config(model: str, revision: str | None = None):
    """The model's config, from `random:NAME`, a local folder or the hub; no weights read."""
    if archs.is_random(model):
        return archs.config_for(model)
    from transformers import AutoConfig

    from ..model.hub import resolve
    from ..model.loading import pretrained_kwargs

    try:
        source = resolve(model, revision)
        return AutoConfig.from_pretrained(source.name, **pretrained_kwargs(source))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {model}: {str(exc).splitlines()[0]}") from None


def meta_model(config) -> torch.nn.Module:
    """The architecture on the `meta` device: shapes and dtypes, no memory."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    if not hasattr(model, "get_image_features"):
        raise ModelError(f"{type(model).__name__} is not a CLIP-style model")
    return model


def views_per_image(tiles: str, image: tuple[int, int], overlap: float, input_size: int) -> int:
    """The views `tag` encodes for an image of this size (see tiling.py)."""
    return tiling.view_count(image[0], image[1], tiles, overlap, input_size)


def detect_budget(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {torch.cuda.get_device_name(device)}"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM"


def weight_bytes(model: torch.nn.Module, precision: str, device: torch.device) -> int:
    """Bytes of every parameter and buffer as loaded at `precision` on `device`.

    fp32/fp16/bf16: floating tensors in that dtype, integer buffers as they are. int8 on the
    CPU (PyTorch dynamic): Linear weights 1 byte each plus fbgemm's int32 column offsets, bias
    fp32. int8 on CUDA (LLM.int8): 1 byte each plus an fp32 scale per output row. nf4: half a
    byte each plus an fp32 absmax per 64 weights and a 16-entry fp32 code book. Layers that
    transformers leaves unquantised (the last one, tied weights) stay in the compute dtype.
    """
    from ..model.precision import compute_dtype

    dtype_size = torch.empty(0, dtype=compute_dtype(precision, device)).element_size()
    quantised = set()
    if precision in ("int8", "nf4"):
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = (
            set()
            if device.type == "cpu" and precision == "int8"
            else set(get_keys_to_not_convert(model))
        )
        # Exactly nn.Linear, as both quantisers match: not the out_proj of nn.MultiheadAttention
        # (SigLIP's pooling head), a Linear subclass whose weight attention reads directly.
        quantised = {name for name, m in model.named_modules()
                     if type(m) is torch.nn.Linear and name not in skip}  # fmt: skip
    dynamic_int8 = device.type == "cpu" and precision == "int8"
    total = 0
    for name, module in model.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for pname, tensor in own:
            n = tensor.numel()
            if name in quantised and pname == "weight":
                total += _quantised_weight(n, tensor.shape[0], precision, device)
            elif name in quantised and pname == "bias" and dynamic_int8:
                total += n * 4  # fbgemm keeps the bias fp32
            elif tensor.is_floating_point():
                total += n * dtype_size
            else:
                total += n * tensor.element_size()
    return total


def _quantised_weight(n: int, rows: int, precision: str, device: torch.device) -> int:
    if precision == "nf4":
        return math.ceil(n / 2) + math.ceil(n / NF4_BLOCK) * 4 + 16 * 4
    if device.type == "cpu":  # fbgemm packed int8 + per-output-column offsets
        return n + rows * 4
    return n + rows * 4  # LLM.int8: int8 + fp32 SCB per row


def activation_bytes(vision, precision: str, device: torch.device) -> int:
    """Peak activation bytes per view of the vision tower in inference, as `Encoder` runs it.

    With S the input side, T = (S/P)^2 + 1 tokens (no class token in SigLIP), D the width, I
    the MLP width and e the compute dtype's size: the input normalised on the device stays
    alive through the forward (3 S^2 e) and the peak is inside one transformer layer, where the
    residual stream, the layer norm, q/k/v and the attention output (4 T D e together) meet the
    MLP's hidden activation and QuickGELU's temporaries (3 T I e; a fused GELU such as
    SigLIP's keeps two, 2 T I e). SigLIP's attention-pooling head has one query: it adds less
    than a layer. Attention runs through SDPA, whose
    flash / memory-efficient kernels keep no T x T matrix; an `eager` model adds 2 H T^2 e.
    Before the forward, normalising in fp32 holds three float copies of the input (12 S^2),
    which bounds the peak for small models (measured exact on the CPU for the fixture). On
    CUDA the uint8 input is copied to the device (3 S^2); on the CPU it is the caller's memory.
    int8 adds an int8 copy of each Linear input (T x max(D, I) bytes).
    """
    from ..model.precision import compute_dtype

    e = torch.empty(0, dtype=compute_dtype(precision, device)).element_size()
    side, patch = vision.image_size, vision.patch_size
    siglip = vision.model_type.startswith("siglip")
    tokens = (side // patch) ** 2 + (0 if siglip else 1)
    width, mlp = vision.hidden_size, vision.intermediate_size
    pixels = 3 * side * side
    hidden = 3 if vision.hidden_act == "quick_gelu" else 2  # MLP-wide tensors alive at once
    layer = tokens * (4 * width + hidden * mlp) * e
    if getattr(vision, "_attn_implementation", "sdpa") == "eager":
        layer += 2 * vision.num_attention_heads * tokens * tokens * e
    if precision == "int8":
        layer += tokens * max(width, mlp)  # the int8 copy of the widest Linear input
    uint8_on_device = pixels if device.type == "cuda" else 0
    forward = pixels * e + layer
    normalise = pixels * 12  # x, x - mean, (x - mean) / std; the cast comes after x is freed
    return uint8_on_device + max(forward, normalise)


def _measure_row(cfg: VramConfig, precision: str, device: torch.device, views: int, note: str):
    from ..model.precision import resolve_precision

    try:
        resolve_precision(precision, device)
    except UsageError as exc:
        return {}, str(exc)
    measured = {}
    for batch in cfg.batches:
        try:
            measured[batch] = measure_peak(cfg.model, precision, device, batch, cfg.revision)
        except torch.OutOfMemoryError:
            break  # larger batches do not fit either
    return measured, note


def measure_peak(model: str, precision: str, device: torch.device, views: int,
                 revision: str | None = None) -> int:  # fmt: skip
    """Measured peak bytes (weights + activations) of one forward over `views` blank views.

    CUDA: `max_memory_allocated` in this process. CPU: a fresh process (see `_cpu_probe`).
    """
    if device.type == "cuda":
        return _cuda_probe(model, precision, device, views, revision)
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_probe, (model, precision, views, revision))


def _load(model: str, precision: str, device: str, revision: str | None = None):
    from ..config import ModelConfig
    from ..model.loading import load_encoder

    cfg = ModelConfig(model=model, device=device, precision=precision, batch=1 << 20,
                      revision=revision)  # fmt: skip
    return load_encoder(cfg)


def _cuda_probe(model: str, precision: str, device: torch.device, views: int,
                revision: str | None = None) -> int:  # fmt: skip
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    enc = _load(model, precision, str(device), revision)
    side = enc.preprocess.size
    pixels = torch.zeros(views, 3, side, side, dtype=torch.uint8)
    with torch.inference_mode():
        enc.forward(pixels)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del enc
    gc.collect()
    torch.cuda.empty_cache()
    return int(peak)


def _cpu_probe(model: str, precision: str, views: int, revision: str | None = None) -> int:
    """In a fresh process: tensor bytes of the loaded model + peak RSS growth of a forward.

    glibc is told to serve every block over 64 KiB by mmap, so freed activations leave the
    resident set at once and its high-water mark (reset through /proc/self/clear_refs) is
    the peak of live memory. A first forward at the same size warms thread pools and caches.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 64 << 10)  # M_TRIM_THRESHOLD
    enc = _load(model, precision, "cpu", revision)
    side = enc.preprocess.size
    pixels = torch.zeros(views, 3, side, side, dtype=torch.uint8)
    with torch.inference_mode():
        enc.forward(pixels)
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _status("VmRSS")
        enc.forward(pixels)
        peak = _status("VmHWM")
    return model_bytes(enc.model) + peak - before


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the loaded model's tensors hold, quantised formats included."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            add(t)
            state = getattr(t, "quant_state", None)
            if state is not None:
                add(state.absmax)
                add(state.code)
            add(getattr(t, "SCB", None))
        if type(module).__module__.startswith("torch.ao.nn.quantized.dynamic"):
            weight, bias = module._weight_bias()  # PyTorch dynamic int8: packed by fbgemm
            total += weight.numel() * weight.element_size() + weight.shape[0] * 4
            total += bias.numel() * 4 if bias is not None else 0
    return total


def render(report: Report, console, *, measured: bool = False) -> None:
    """The report as a Rich table: a row per precision, a column per views-per-forward."""
    from rich.table import Table

    views = f", {report.views} views per image" if report.views > 1 else ""
    table = Table(title=f"{report.model} on {report.device}: budget {human(report.budget)} "
                  f"({report.budget_source}){views}", title_justify="left")  # fmt: skip
    table.add_column("precision")
    table.add_column("weights", justify="right")
    table.add_column("per view", justify="right")
    for b in report.rows[0].estimates:
        table.add_column(f"{b} views", justify="right")
    table.add_column("most views/forward", justify="right")
    if report.views > 1:
        table.add_column("images/forward", justify="right")
    for row in report.rows:
        cells = []
        for b, est in row.estimates.items():
            got = row.measured.get(b)
            cells.append(human(est) + (f" ({human(got)})" if got else ""))
        most = ["offload" if row.offload else f"{row.max_batch:,}"]
        if report.views > 1:
            most.append("-" if row.offload else f"{row.max_batch // report.views:,}")
        table.add_row(row.precision, human(row.weights), human(row.per_view), *cells, *most)
    console.print(table)
    if measured:
        console.print("estimate (measured peak) per forward; peaks are weights + activations")
    for row in report.rows:
        if row.note:
            console.print(f"{row.precision}: {row.note}", markup=False)
