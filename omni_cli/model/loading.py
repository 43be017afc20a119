"""Loading: a hub id, a local folder or `random:ARCH` in, a ready `Encoder` out.

Weights load from safetensors only, with remote code off; a model folder holding only pickled
weights is refused with the command that converts it. Precisions: fp32, fp16 and bf16 put the
weights themselves in that dtype. int8 and nf4 quantise the Linear layers: on CUDA through
bitsandbytes (`quantization_config`), on the CPU int8 is PyTorch dynamic int8 quantisation
(about 2x fp32 for ViT-B/32 on a 2-core EPYC) and nf4 is bitsandbytes' CPU backend, whose
per-call warnings are silenced. `--batch auto` on CUDA probes the largest forward that fits.
The image processor's resize, crop and normalisation become a `Preprocess` and the mean/std.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from ..config import ModelConfig
from ..errors import ModelError, UsageError
from ..inputs.decode import Preprocess
from . import archs, hub, identity
from .encoder import Encoder, is_out_of_memory
from .precision import compute_dtype, resolve_device, resolve_precision

DEFAULT_BATCH = {"cpu": 32, "cuda": 128, "mps": 32}  # views per forward without --batch
AUTO_BATCH_START = 512  # `--batch auto` on CUDA probes down from here, halving on OOM
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_encoder(cfg: ModelConfig, *, exact: bool = False) -> Encoder:
    """Load `cfg.model` (hub id or folder) for inference; ModelError with a reason otherwise."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    max_gpu_memory = cfg.max_gpu_memory
    if archs.is_random(cfg.model):
        on = device if precision not in ("int8", "nf4") else "cpu"  # quantised: placed later
        model = archs.build(cfg.model, compute_dtype(precision, device), on).eval()
        model = quantise(model, precision, device)
        tokenizer, processor = archs.tokenizer(cfg.model), archs.processor(cfg.model)
        enc = _assemble(cfg, model, tokenizer, processor, device, precision, exact)
    else:
        enc = _load_pretrained(cfg, device, precision, exact, max_gpu_memory)
    use_runtime(enc, cfg.runtime)
    if cfg.batch is None and device.type == "cuda":
        enc.batch = probe_batch(enc)
    return enc


def use_runtime(enc: Encoder, requested: str) -> Encoder:
    """Run the vision tower on runtime `requested` (runtimes.py); `auto` picks by rule."""
    from . import runtimes

    name = runtimes.resolve(requested, enc.device, enc.precision)
    enc.vision = runtimes.build(name, enc.model, size=enc.preprocess.size,
                                precision=enc.precision, device=enc.device,
                                identity=f"{enc.model_id}@{enc.revision}")  # fmt: skip
    enc.runtime = name
    return enc


def _load_pretrained(cfg, device, precision, exact, max_gpu_memory) -> Encoder:
    source = hub.resolve(cfg.model, cfg.revision)
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    kwargs = load_kwargs(precision, device, max_gpu_memory)
    common = pretrained_kwargs(source)
    try:
        with quiet():
            model = AutoModel.from_pretrained(source.name, **kwargs, **common, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(source.name, **common)
            processor = AutoImageProcessor.from_pretrained(source.name, **common)
    except (OSError, ValueError) as exc:
        raise hub.load_error(cfg.model, exc) from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ModelError(f"{cfg.model} is a {type(model).__name__}, not a CLIP-style model")
    model.eval()
    if "device_map" not in kwargs:  # bitsandbytes and offloaded models are placed by the loader
        model = quantise(model.to(device), precision, device)
    return _assemble(cfg, model, tokenizer, processor, device, precision, exact, source)


def pretrained_kwargs(source: hub.Source) -> dict:
    """What every `from_pretrained` of a model gets: no remote code, offline or not, the
    pinned revision and the hub cache its identity is read from."""
    kwargs = {"trust_remote_code": False, "local_files_only": source.local_only}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.cache_dir:
        kwargs["cache_dir"] = source.cache_dir
    return kwargs


def _uses_bitsandbytes(precision: str, device: torch.device) -> bool:
    return precision == "nf4" or (precision == "int8" and device.type == "cuda")


def load_kwargs(precision: str, device: torch.device, max_gpu_memory: int | None = None) -> dict:
    """`from_pretrained` arguments for a precision on a device (besides the safety flags).

    bitsandbytes formats go through `quantization_config`. `max_gpu_memory` (bytes, CUDA only)
    caps what the GPU holds: accelerate's device map puts the layers that do not fit on the CPU.
    """
    kwargs: dict = {"dtype": compute_dtype(precision, device)}
    bnb = _uses_bitsandbytes(precision, device)
    if bnb:
        from transformers import BitsAndBytesConfig

        _quiet_bitsandbytes()
        offload = bool(max_gpu_memory) and device.type == "cuda"
        if precision == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=kwargs["dtype"],
                llm_int8_enable_fp32_cpu_offload=offload,
            )  # fmt: skip
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload
            )
        kwargs["device_map"] = {"": str(device)}
    if max_gpu_memory and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {index: int(max_gpu_memory), "cpu": _cpu_memory()}
    return kwargs


def _cpu_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def quantise(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """Quantise the Linear layers of a model already in its compute dtype, then place it.

    int8 on the CPU: PyTorch dynamic int8 (weights int8, activations quantised per call).
    nf4, and int8 on CUDA: bitsandbytes layers, skipping what transformers' loader would skip.
    Other precisions: only moved to `device`.
    """
    if precision == "int8" and device.type == "cpu":
        return _dynamic_int8(model.to(device))
    if not _uses_bitsandbytes(precision, device):
        return model.to(device)
    return _bnb_replace(model, precision, compute_dtype(precision, device)).to(device)


def _dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            raise UsageError(
                "--precision int8 on the CPU needs torch.ao.quantization, which this PyTorch lacks"
            ) from None
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _bnb_replace(model: torch.nn.Module, precision: str, dtype: torch.dtype) -> torch.nn.Module:
    """Swap nn.Linear for bitsandbytes layers (quantised when moved to the device)."""
    _quiet_bitsandbytes()
    import bitsandbytes as bnb
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            # Exactly nn.Linear, as transformers' own replacement: nn.MultiheadAttention (SigLIP's
            # pooling head) reads its out_proj (a Linear subclass) weight directly.
            if type(child) is not torch.nn.Linear or full in skip:
                continue
            bias = child.bias is not None
            weight = child.weight.data
            if precision == "nf4":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                        compute_dtype=dtype, compress_statistics=False,
                                        quant_type="nf4", device="meta")  # fmt: skip
                new.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, quant_type="nf4", compress_statistics=False
                )  # as transformers does
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias,
                                          has_fp16_weights=False, device="meta")  # fmt: skip
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if bias:
                new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, new)
    return model


def _quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning on every CPU call (input casts, missing kernels): silence it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def probe_batch(enc: Encoder, start: int = AUTO_BATCH_START) -> int:
    """`--batch auto` on CUDA: the largest power of two <= start whose forward fits in memory.

    Runs the encoder on blank views at the model's input size, halving on out-of-memory.
    """
    side = enc.preprocess.size
    batch = start
    while True:
        try:
            with torch.inference_mode():
                enc.forward(torch.zeros(batch, 3, side, side, dtype=torch.uint8))
            return batch
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            if batch == 1:
                raise ModelError("out of memory even at batch 1; try a lower --precision") from None
            batch //= 2
        finally:
            if enc.device.type == "cuda":
                torch.cuda.empty_cache()


def _assemble(cfg, model, tokenizer, processor, device, precision, exact, source=None) -> Encoder:
    """The Encoder around a loaded model; `processor` None means CLIP's standard 224 px."""
    if processor is None:
        preprocess = Preprocess(draft=not exact)
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        preprocess = preprocess_from(processor, exact=exact)
        mean, std = processor.image_mean, processor.image_std
    siglip = model.config.model_type.startswith("siglip")
    bias = getattr(model, "logit_bias", None)
    return Encoder(
        model=model,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        preprocess=preprocess,
        mean=torch.tensor(mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(std, device=device).view(1, 3, 1, 1),
        logit_scale=float(model.logit_scale.detach().float().exp()),
        logit_bias=float(bias.detach().float()) if siglip and bias is not None else None,
        model_id=hub.canonical(cfg.model),
        revision=_identity(cfg, source, model) if source else "random",
        batch=cfg.batch or DEFAULT_BATCH.get(device.type, 32),
        text_padding="max_length" if siglip else True,
        text_length=text_length(model, tokenizer),
    )


def text_length(model, tokenizer) -> int | None:
    """Tokens a prompt may have: the text model's positions, or the tokenizer's own limit when
    smaller (a tokenizer's `model_max_length` is often unset, i.e. huge, or too large)."""
    text = getattr(model.config, "text_config", None) or model.config
    limits = [getattr(text, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]  # fmt: skip
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


def preprocess_from(processor, *, exact: bool) -> Preprocess:
    """Read resize/crop/resample from a transformers image processor (PIL or torchvision)."""
    crop = _get(processor, "crop_size") if getattr(processor, "do_center_crop", False) else None
    size = _get(processor, "size")
    if crop and _get(size, "shortest_edge"):
        shortest, side = int(_get(size, "shortest_edge")), int(_get(crop, "height"))
    else:  # resized straight to a square (SigLIP and friends)
        shortest, side = None, int(_get(size, "height") or _get(size, "shortest_edge"))
    resample = processor.resample
    resample = int(getattr(resample, "value", resample)) if resample is not None else 3
    if resample > 5:  # a torchvision InterpolationMode: bilinear=2 / bicubic=3 in PIL's numbering
        resample = 3
    return Preprocess(size=side, shortest_edge=shortest, resample=resample, draft=not exact)


def _get(obj, key):
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _identity(cfg: ModelConfig, source: hub.Source, model) -> str:
    """The identity (identity.py) of the files loaded: a local folder's, or the hub snapshot's
    that transformers read (its commit), as `hub.identity` computes it before loading."""
    if not source.cache_dir:
        return identity.identity(source.name) or "unknown"
    commit = getattr(model.config, "_commit_hash", None)
    folder = hub.snapshot(cfg.model, commit or cfg.revision)
    return (identity.identity(folder) if folder else None) or "unknown"


@contextlib.contextmanager
def quiet():
    """Silence library chatter (warnings, progress bars) while loading."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
