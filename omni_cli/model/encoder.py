"""Encoder: a loaded CLIP-style model at run time, encoding views and prompts in chunks.

Images arrive as uint8 views, on the host or already on the device; they are moved to the
device and normalised there, then encoded in chunks of at most `batch` views. When the device
runs out of memory (PyTorch's OutOfMemoryError, or a cuBLAS/cuDNN allocation failure) the chunk
size halves and the same views are retried, so no image is dropped or encoded twice. Both sides
return L2-normalised float32 embeddings, ready for one matrix product. Loading lives in
`loading.py`, the precision policy in `precision.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ModelError
from ..inputs.decode import Preprocess
from ..inputs.devdecode import is_out_of_memory  # one definition, for decoder and encoder
from .precision import compute_dtype


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
    batch: int  # views per forward
    text_padding: str | bool = True
    text_length: int | None = None  # tokens a prompt may have (the text model's positions)
    on_backoff: Callable[[int], None] | None = None
    runtime: str = "eager"  # what runs the vision tower (runtimes.py)
    vision: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the model, eagerly

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.precision, self.device)

    @property
    def cache_key(self) -> str | None:
        """What a cached label matrix depends on: the model's identity (its weights and
        preprocessing), its precision and the device kind. None (do not cache) when the
        identity is unknown."""
        if not self.revision or self.revision == "unknown":
            return None
        return f"{self.model_id}@{self.revision}|{self.precision}|{self.device.type}"

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(views, 3, H, W) uint8 -> (views, dim) float32, L2-normalised, on the device."""
        out, start = [], 0
        while start < len(pixels):
            chunk = pixels[start : start + self.batch]
            try:
                out.append(self.forward(chunk))
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                self.back_off()
                continue
            start += len(chunk)
        if not out:
            return torch.empty(0, 0, device=self.device)
        return out[0] if len(out) == 1 else torch.cat(out)

    def back_off(self) -> None:
        """Halve the views per forward after an out-of-memory error; give up below one."""
        if self.batch == 1:
            raise ModelError("out of memory even at batch 1; try a lower --precision") from None
        self.batch = max(1, self.batch // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.on_backoff:
            self.on_backoff(self.batch)

    def forward(self, chunk: torch.Tensor) -> torch.Tensor:
        """One forward of (n, 3, H, W) uint8 views -> (n, dim) float32, L2-normalised."""
        x = chunk.to(self.device, non_blocking=True).float().div_(255.0)
        x = ((x - self.mean) / self.std).to(self.dtype)
        if self.vision is not None:
            feats = self.vision(x).to(self.device)
        else:
            feats = _pooled(self.model.get_image_features(pixel_values=x))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> (n, dim) float32, L2-normalised, on the device."""
        tokens = self.tokenizer(texts, padding=self.text_padding, truncation=True,
                                max_length=self.text_length, return_tensors="pt")  # fmt: skip
        feats = _pooled(self.model.get_text_features(**tokens.to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def too_long(self, texts: list[str]) -> list[int]:
        """Indexes of the texts longer than `text_length` tokens (encode_texts cuts them)."""
        if not self.text_length:
            return []
        # A token covers at least one byte: only texts about that long can be too long.
        suspects = [i for i, t in enumerate(texts) if len(t.encode()) + 4 > self.text_length]
        if not suspects:
            return []
        ids = self.tokenizer([texts[i] for i in suspects], padding=False, truncation=False,
                             return_tensors=None, verbose=False)["input_ids"]  # fmt: skip
        return [i for i, row in zip(suspects, ids, strict=True) if len(row) > self.text_length]


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output
