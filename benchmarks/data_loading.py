"""Images/s decoding + preprocessing from files versus reading batches from the uint8 cache.

    python benchmarks/data_loading.py [--data ../shared/data/kneeKL224] [--n 1000] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, per_second  # noqa: E402

from klgrade.data.cache import decode_all, load_cached  # noqa: E402
from klgrade.data.io import read_image  # noqa: E402
from klgrade.data.preprocess import PreprocessConfig, to_uint8  # noqa: E402
from klgrade.data.sources import find_samples  # noqa: E402
from klgrade.train.batches import make_loader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kneeKL224"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    samples = [s for s in find_samples(args.data) if s.split == "train"][: args.n]
    config = PreprocessConfig(size=args.size)
    print(f"machine: {machine()}")
    print(f"{len(samples)} kneeKL224 train JPEGs, {args.size}x{args.size} uint8")

    serial = per_second(lambda: [to_uint8(read_image(s.path), config) for s in samples], len(samples), repeats=1)
    threaded = per_second(lambda: decode_all(samples, config), len(samples), repeats=1)
    with tempfile.TemporaryDirectory() as cache_dir:
        load_cached(samples, config, cache_dir)
        cached = load_cached(samples, config, cache_dir)
        loader = make_loader(np.asarray(cached), np.zeros(len(samples), dtype=int), 64, shuffle=True)
        from_cache = per_second(lambda: [batch for batch in loader], len(samples), repeats=5)
        reopened = per_second(lambda: np.array(load_cached(samples, config, cache_dir)), len(samples), repeats=3)
    print(f"{'path':45s} {'images/s':>10s} {'vs files':>9s}")
    for name, rate in [("decode files, 1 thread", serial), ("decode files, thread pool", threaded),
                       ("open cache memmap into RAM", reopened), ("batches of 64 from cache (shuffled)", from_cache)]:
        print(f"{name:45s} {rate:10.0f} {rate / serial:8.1f}x")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
