"""Encoder runtimes on the CPU, side by side in one run: images/s and parity to eager.

For each precision asked, loads the model once per runtime (eager, and every other runtime
installed here: compile, onnx, openvino), encodes the same decoded views (synthetic 1024x768
JPEGs through omni's CPU decode), and alternates the runtimes over `--rounds` rounds so that a
noisy shared machine slows them alike. Prints, per runtime: the best and median images/s over
the rounds, the ratio to eager at the same precision, and the max |Δ similarity| to eager over
the views x 9 label prompts (the fast path's tolerance is 1e-4 at fp32, 0.02 at bf16).

    python benchmarks/runtimes_cpu.py [--model random:vit-b-32] [--precision fp32,bf16]
        [--runtimes eager,onnx,openvino] [--views 64] [--batch 32] [--rounds 6]

The first load of onnx/openvino exports the vision tower into the omni cache (once per model
and precision); `compile` spends a minute compiling on a 2-core CPU before its first forward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a bare checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._machine import describe  # noqa: E402
from omni_cli.config import ModelConfig  # noqa: E402
from omni_cli.inputs import decode  # noqa: E402
from omni_cli.model.loading import load_encoder  # noqa: E402
from omni_cli.model.runtimes import installed  # noqa: E402
from omni_cli.tools.bench import synthesise  # noqa: E402
from omni_cli.tools.synthetic import LABELS  # noqa: E402


def views(n: int, size: int) -> torch.Tensor:
    """`n` decoded views (n, 3, size, size) uint8 of synthetic photo-like JPEGs."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthesise(Path(tmp), n, (1024, 768))
        spec = decode.Preprocess(size=size, shortest_edge=size)
        return torch.from_numpy(np.concatenate([decode.load(str(p), spec).pixels for p in paths]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:vit-b-32")
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--runtimes", default=None, help="default: every one installed here")
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    names = args.runtimes.split(",") if args.runtimes else installed(torch.device("cpu"))
    names = ["eager"] + [n for n in names if n != "eager"]
    print(describe())
    print(f"model {args.model}, {args.views} views per round, batch {args.batch}, "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}")  # fmt: skip
    for precision in args.precision.split(","):
        encoders, loads = {}, {}
        for name in names:
            started = time.perf_counter()
            cfg = ModelConfig(model=args.model, device="cpu", precision=precision,
                              batch=args.batch, runtime=name)  # fmt: skip
            encoders[name] = load_encoder(cfg)
            loads[name] = time.perf_counter() - started
        eager = encoders["eager"]
        pixels = views(args.views, eager.preprocess.size)
        prompts = [f"a photo of a {label}." for label in LABELS]
        texts = eager.encode_texts(prompts).T  # (dim, labels): one text side for all
        sims, rates = {}, {name: [] for name in names}
        for name, enc in encoders.items():  # warm-up (compile compiles here) and parity
            started = time.perf_counter()
            sims[name] = enc.encode_images(pixels) @ texts
            loads[name] += time.perf_counter() - started
        for _ in range(args.rounds):
            for name, enc in encoders.items():
                started = time.perf_counter()
                enc.encode_images(pixels)
                rates[name].append(len(pixels) / (time.perf_counter() - started))
        base = max(rates["eager"])
        print(f"\n{precision}:")
        print(f"  {'runtime':<9} {'best/s':>8} {'median/s':>9} {'vs eager':>9} "
              f"{'max|Δsim|':>10} {'top-1 same':>10} {'load+warm s':>11}")  # fmt: skip
        for name in names:
            delta = (sims[name] - sims["eager"]).abs().max().item()
            same = (sims[name].argmax(-1) == sims["eager"].argmax(-1)).float().mean().item()
            best, median = max(rates[name]), statistics.median(rates[name])
            print(f"  {name:<9} {best:>8.1f} {median:>9.1f} {best / base:>8.2f}x "
                  f"{delta:>10.2e} {same:>10.1%} {loads[name]:>11.1f}")  # fmt: skip
        del encoders


if __name__ == "__main__":
    main()
