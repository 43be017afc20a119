"""Known CLIP and SigLIP architectures with random weights, for measuring speed and memory offline.

`--model random:vit-b-32` (or `random:vit-l-14`, `random:siglip-b-16`) builds the architecture
from its config with random weights: it times and fills memory exactly like the real model
(design.md section 4) and needs no download. Its tokenizer maps bytes to ids, enough to encode
prompts, and its image processor is its family's hub default; the scores mean nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:  # imported where a model is built: the CLI reads ARCHS for its help
    import torch

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
    # google/siglip-base-patch16-224: no class token, attention-pooling head, text pools the
    # last of 64 positions (prompts padded to max_length)
    "siglip-b-16": {
        "family": "siglip",
        "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, patch_size=16, image_size=224),
        "text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, vocab_size=32000, max_position_embeddings=64),
    },
}  # fmt: skip
PREFIX = "random:"


def is_random(model: str) -> bool:
    return model.startswith(PREFIX)


def _arch(model: str) -> dict:
    name = model[len(PREFIX) :]
    if name not in ARCHS:
        raise ModelError(
            f"unknown architecture {model}; known: " + ", ".join(PREFIX + n for n in ARCHS)
        )
    return ARCHS[name]


def _siglip(model: str) -> bool:
    return _arch(model).get("family") == "siglip"


def config_for(model: str):
    """The CLIPConfig (or SiglipConfig) of `random:NAME`."""
    arch = _arch(model)
    if _siglip(model):
        from transformers import SiglipConfig

        eos = SIGLIP_BYTES.eos
        text = dict(arch["text"], eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
        return SiglipConfig(text_config=text, vision_config=arch["vision"])
    from transformers import CLIPConfig

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
    """A CLIPModel (or SiglipModel) of the named architecture with random weights, in `dtype`,
    on `device`.

    Built on the device itself: initialising ViT-L/14's 428M weights there takes a fraction of
    the CPU's seconds. The weights depend on the device's random generator, not on the seed
    alone; they only need to time and fill memory like the real ones.
    """
    import torch
    from transformers import CLIPModel, SiglipModel

    torch.manual_seed(0)
    cls = SiglipModel if _siglip(model) else CLIPModel
    with torch.device(device):
        return cls(config_for(model)).to(dtype)


def tokenizer(model: str) -> ByteTokenizer:
    """The byte tokenizer of `random:NAME`, shaped like its family's hub tokenizer."""
    return SIGLIP_BYTES if _siglip(model) else ByteTokenizer()


def processor(model: str):
    """The image processor of `random:NAME`: its family's hub defaults, PIL backend.

    CLIP: short side to 224, centre crop, OpenAI mean/std. SigLIP: straight to 224x224, 0.5.
    """
    import transformers

    name = "SiglipImageProcessor" if _siglip(model) else "CLIPImageProcessor"
    pil = getattr(transformers, name + "Pil", None)  # transformers before the PIL/torchvision split
    return (pil or getattr(transformers, name))()


class ByteTokenizer:
    """Bytes to ids, returning what the family's tokenizer does.

    CLIP (the defaults): start token, bytes, end token, padded with the end token, with an
    attention mask. SigLIP: bytes shifted past the special ids, end token, padded with it
    (to `length` with `padding="max_length"`, as SigLIP is used), no attention mask.
    """

    bos, eos = 49406, 49407

    def __init__(self, bos: int | None = 49406, eos: int = 49407, *, length: int = 77,
                 offset: int = 0, mask: bool = True):  # fmt: skip
        self.bos, self.eos, self.length, self.offset, self.mask = bos, eos, length, offset, mask

    def __call__(self, texts, padding=True, truncation=True, return_tensors="pt",
                 max_length=None, verbose=True):  # fmt: skip
        import torch
        from transformers import BatchEncoding

        start = [] if self.bos is None else [self.bos]
        length = min(self.length, max_length or self.length)
        room = length - len(start) - 1 if truncation else None
        rows = [[*start, *(b + self.offset for b in t.encode()[:room]), self.eos] for t in texts]
        if return_tensors is None:  # lists, as a transformers tokenizer returns them
            return {"input_ids": rows}
        width = length if padding == "max_length" else max(map(len, rows))
        ids = torch.full((len(rows), width), self.eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        out = {"input_ids": ids, "attention_mask": mask} if self.mask else {"input_ids": ids}
        return BatchEncoding(out)


# SigLIP's hub tokenizer: <pad> 0, </s> 1 (end and padding), <unk> 2, 64 positions.
SIGLIP_BYTES = ByteTokenizer(None, 1, length=64, offset=3, mask=False)
