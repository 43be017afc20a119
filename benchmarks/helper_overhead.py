"""The crash-safe helper process against decoding in the main process: loader throughput.

    python benchmarks/helper_overhead.py --n 160 --rounds 10

Synthesises N JPEGs of 1024x768, then iterates the loader over them with 0 workers, in this
process and through the lockstep helper (loader.CrashSafeLoader, the default on small CPUs),
alternating the order every round; prints each run's images/s and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from omni_cli.inputs import decode
from omni_cli.inputs.loader import make_loader
from omni_cli.inputs.sources import discover
from omni_cli.tools.bench import synthesise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synthesise(Path(tmp), args.n, (1024, 768), 0)
        entries = list(discover([Path(tmp)]))
        spec = decode.Preprocess()
        rates: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for helper in (False, True) if round_ % 2 == 0 else (True, False):
                started = time.perf_counter()
                loader = make_loader(entries, spec, files=16, workers=0, helper=helper)
                count = sum(len(batch.items) for batch in loader)
                rates[helper].append(count / (time.perf_counter() - started))
    for helper, name in ((False, "in-process"), (True, "helper")):
        runs = ", ".join(f"{r:.0f}" for r in rates[helper])
        print(f"{name:>10}: median {statistics.median(rates[helper]):.0f} images/s ({runs})")


if __name__ == "__main__":
    main()
