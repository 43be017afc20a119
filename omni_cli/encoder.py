"""Encoder: load a CLIP-style model at a precision on a device, and encode in chunks.

Weights load from safetensors only, with remote code off; a model folder holding only pickled
weights is refused. Images arrive as uint8 views; they are moved to the device and normalised
there, then encoded in chunks of at most `batch` views. When the device runs out of memory the
chunk size halves and the same views are retried, so no image is dropped or encoded twice.
Both sides return L2-normalised float32 embeddings, ready for one matrix product.

Precisions: fp32, fp16 and bf16 put the weights themselves in that dtype. int8 and nf4 quantise
the Linear layers: on CUDA through bitsandbytes (`quantization_config`), on the CPU int8 is
PyTorch dynamic int8 quantisation (about 2x fp32 for ViT-B/32 on a 2-core EPYC) and nf4 is
bitsandbytes' CPU backend, whose per-call warnings are silenced.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import archs
from .config import ModelConfig
from .decode import Preprocess
from .errors import ModelError, UsageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTISED = ("int8", "nf4")
DEFAULT_BATCH = {"cpu": 32, "cuda": 128, "mps": 32}
AUTO_BATCH_START = 512  # `--batch auto` on CUDA probes down from here, halving on OOM
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda, else mps, else cpu; an explicit device that is absent is a usage error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible to PyTorch")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to load at; `auto` follows a documented rule, and says what it picked.

    `auto`: CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16. MPS: fp16.
    CPU: bf16 where the CPU has native bf16 instructions (AVX512-BF16 or AMX), measured 1.9x
    faster than fp32 for ViT-B/32 on a 2-core EPYC; else fp32, since emulated bf16 is slower.
    `auto` never picks int8 or nf4: they save memory but cost accuracy, and on a GPU speed too.
    int8 and nf4 need CUDA or the CPU (not MPS) and, except int8 on the CPU, bitsandbytes.
    """
    if precision in QUANTISED:
        if device.type not in ("cuda", "cpu"):
            raise UsageError(f"--precision {precision} needs a CUDA GPU or the CPU, not {device}")
        needs_bnb = device.type == "cuda" or precision == "nf4"
        if needs_bnb and not _has_bitsandbytes():
            where = "on CUDA" if device.type == "cuda" else "(on the CPU too)"
            raise UsageError(
                f"--precision {precision} {where} needs bitsandbytes: pip install bitsandbytes"
            )
        return precision
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if _cpu_has_bf16() else "fp32"


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype activations run in: the weights' own, or what quantised layers compute in."""
    if precision in DTYPES:
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # dynamic int8 and bitsandbytes nf4 on the CPU take fp32 inputs


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _cpu_has_bf16() -> bool:
    check = getattr(torch.backends.mkldnn, "is_bf16_supported", None)
    try:
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return bool(native or amx) and (check is None or bool(check()))
    except Exception:
        return False


@dataclass
class Encoder:
    """A loaded model and what scoring needs to know about it."""

    model: torch.nn.Module
    tokenizer: Callable
    device: torch.device
    precision: str
    preprocess: Preprocess
    mean: torch.Tensor  # (1, 3, 1, 1) on device
    std: torch.Tensor
    logit_scale: float
    logit_bias: float | None  # SigLIP-style models score with a sigmoid
    model_id: str
    revision: str
    batch: int
    text_padding: str | bool = True
    on_backoff: Callable[[int], None] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.precision, self.device)

    @property
    def cache_key(self) -> str:
        return f"{self.model_id}@{self.revision}|{self.precision}"

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(views, 3, H, W) uint8 -> (views, dim) float32, L2-normalised, on the device."""
        out, start = [], 0
        while start < len(pixels):
            chunk = pixels[start : start + self.batch]
            try:
                out.append(self._forward(chunk))
            except torch.OutOfMemoryError:
                if self.batch == 1:
                    raise ModelError(
                        "out of memory even at batch 1; try a lower --precision"
                    ) from None
                self.batch = max(1, self.batch // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.on_backoff:
                    self.on_backoff(self.batch)
                continue
            start += len(chunk)
        if not out:
            return torch.empty(0, 0, device=self.device)
        return torch.cat(out)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        x = chunk.to(self.device, non_blocking=True).float().div_(255.0)
        x = ((x - self.mean) / self.std).to(self.dtype)
        feats = _pooled(self.model.get_image_features(pixel_values=x))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> (n, dim) float32, L2-normalised, on the device."""
        tokens = self.tokenizer(
            texts, padding=self.text_padding, truncation=True, return_tensors="pt"
        ).to(self.device)
        feats = _pooled(self.model.get_text_features(**tokens))
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_encoder(cfg: ModelConfig, *, exact: bool = False) -> Encoder:
    """Load `cfg.model` (hub id or folder) for inference; ModelError with a reason otherwise."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    max_gpu_memory = cfg.max_gpu_memory
    if archs.is_random(cfg.model):
        model = archs.build(cfg.model, compute_dtype(precision, device)).eval()
        model = quantise(model, precision, device)
        tokenizer, processor = archs.tokenizer(cfg.model), archs.processor(cfg.model)
        enc = _assemble(cfg, model, tokenizer, processor, device, precision, exact)
    else:
        enc = _load_pretrained(cfg, device, precision, exact, max_gpu_memory)
    if cfg.batch is None and device.type == "cuda":
        enc.batch = probe_batch(enc)
    return enc


def _load_pretrained(cfg, device, precision, exact, max_gpu_memory) -> Encoder:
    source = _check_source(cfg.model)
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    kwargs = load_kwargs(precision, device, max_gpu_memory)
    try:
        with _quiet():
            model = AutoModel.from_pretrained(
                source, **kwargs, use_safetensors=True, trust_remote_code=False
            )
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.model, exc) from None
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ModelError(f"{cfg.model} is a {type(model).__name__}, not a CLIP-style model")
    model.eval()
    if "device_map" not in kwargs:  # bitsandbytes and offloaded models are placed by the loader
        model = quantise(model.to(device), precision, device)
    return _assemble(cfg, model, tokenizer, processor, device, precision, exact, source)


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
                enc._forward(torch.zeros(batch, 3, side, side, dtype=torch.uint8))
            return batch
        except torch.OutOfMemoryError:
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
        model_id=cfg.model,
        revision=_revision(source, model) if source else "random",
        batch=cfg.batch or DEFAULT_BATCH.get(device.type, 32),
        text_padding="max_length" if siglip else True,
    )


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


def _looks_local(model: str) -> bool:
    return (
        os.path.exists(model)
        or model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def _check_source(model: str) -> str:
    """Local folders are checked here, so the message names the real problem."""
    if not _looks_local(model):
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
            raise ModelError(_pickled_message(model, ", ".join(pickled)))
        raise ModelError(f"model folder {model} holds no *.safetensors weights")
    return str(path)


def _pickled_message(model: str, files: str) -> str:
    return (
        f"model {model} has only pickled weights ({files}); omni loads safetensors only, "
        "because unpickling a file can run arbitrary code. If you trust it, convert it once: "
        'python -c "from transformers import AutoModel; '
        f"AutoModel.from_pretrained('{model}').save_pretrained('{model}')\""
    )


def _load_error(model: str, exc: Exception) -> ModelError:
    text = str(exc)
    if "safetensors" in text.lower() and ("not found" in text or "does not appear" in text):
        return ModelError(_pickled_message(model, "no model.safetensors on the hub"))
    if "is not a local folder and is not a valid model identifier" in text or "404" in text:
        return ModelError(f"model not found: '{model}' is neither a folder nor a hub model id")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ModelError(f"cannot load model {model}: {first[:300]}")


def _revision(source: str, model) -> str:
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    weights = sorted(Path(source).glob("*.safetensors")) if os.path.isdir(source) else []
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    return "local:" + hashlib.sha256(repr(stamp).encode()).hexdigest()[:16] if stamp else "unknown"


@contextlib.contextmanager
def _quiet():
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
