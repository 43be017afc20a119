"""Model: views to scores. Resolve and load a CLIP/SigLIP at a precision, encode images and
label prompts, and turn embeddings into similarities, probabilities and per-label scores."""
