"""Known CLIP architectures with random weights, for measuring speed and memory offline.

`--model random:vit-b-32` (or `random:vit-l-14`) builds the architecture from its config with
random weights: it times and fills memory exactly like the real model (design.md section 4)
and needs no download. Its tokenizer maps bytes to ids, enough to encode prompts; the scores
mean nothing.
"""

from __future__ import annotations

import torch

from .errors import ModelError

ARCHS: dict[str, dict] = {
    "vit-b-32": {
        "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, patch_size=32, image_size=224),
        "text": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                     intermediate_size=2048),
        "projection_dim": 512,
    },
    "vit-l-14": {
        "vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, patch_size=14, image_size=224),
        "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072),
        "projection_dim": 768,
    },
}  # fmt: skip
PREFIX = "random:"


def is_random(model: str) -> bool:
    return model.startswith(PREFIX)


def config_for(model: str):
    """The CLIPConfig of `random:NAME`."""
    from transformers import CLIPConfig

    name = model[len(PREFIX) :]
    if name not in ARCHS:
        raise ModelError(
            f"unknown architecture {model}; known: " + ", ".join(PREFIX + n for n in ARCHS)
        )
    arch = ARCHS[name]
    text = dict(
        arch["text"],
        vocab_size=49408,
        max_position_embeddings=77,
        eos_token_id=ByteTokenizer.eos,
        bos_token_id=ByteTokenizer.bos,
        pad_token_id=1,
    )
    return CLIPConfig(
        text_config=text, vision_config=arch["vision"], projection_dim=arch["projection_dim"]
    )


def build(model: str, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """A CLIPModel of the named architecture with random weights, in `dtype`, on `device`.

    Built on the device itself: initialising ViT-L/14's 428M weights there takes a fraction of
    the CPU's seconds. The weights depend on the device's random generator, not on the seed
    alone; they only need to time and fill memory like the real ones.
    """
    from transformers import CLIPModel

    torch.manual_seed(0)
    with torch.device(device):
        return CLIPModel(config_for(model)).to(dtype)


class ByteTokenizer:
    """Bytes to ids between CLIP's start and end tokens; returns what CLIP's tokenizer does."""

    bos, eos = 49406, 49407

    def __call__(self, texts, padding=True, truncation=True, return_tensors="pt"):
        from transformers import BatchEncoding

        rows = [[self.bos, *list(t.encode())[:75], self.eos] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})
