"""omni: batch zero-shot image tagging with CLIP."""

__version__ = "0.1.0"
