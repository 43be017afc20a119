"""Tools: benchmarks, the memory model behind `omni vram`, and synthetic test images."""
