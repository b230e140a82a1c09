"""Peak memory of reading a labelled set as it grows: images decoded `data.cache.CHUNK` at a time (as shipped) vs the
whole set at once (as before). Three readers: `evaluate` (graded chunk by chunk, only the answers kept; whole before
session 18), `cache` (the image cache, written chunk by chunk: what training and reproduce's validation sets
read; whole before session 19) and `calibrate` (a calibration set, `evaluate --calibrate-on`'s and `klgrade
calibrate`'s, only the outputs and image statistics kept; whole before session 20). Each run is a fresh process
(peak RSS, `ru_maxrss`).

    python benchmarks/decode_memory.py [--knees 1000 4000] [--readers evaluate cache calibrate] [--threads 2]

The set: kneeKL224 val images repeated until `--knees`, each copy a distinct file (one pixel changed, its own name),
so that every one is scored; graded by the shipped model at its own resolution.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

READERS = ("evaluate", "cache", "calibrate")
DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kneeKL224").resolve()


def write_set(folder: Path, knees: int) -> None:
    """`knees` distinct labelled files in grade folders, made from val's images."""
    sources = sorted((DATA / "val").glob("*/*.jpg"))
    for index in range(knees):
        source = sources[index % len(sources)]
        pixels = np.array(Image.open(source).convert("L"))
        pixels[0, index % pixels.shape[1]] ^= 1 + index // pixels.shape[1] % 255
        target = folder / source.parent.name / f"knee{index:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target)


def child(reader: str, data: str, chunk: int | None, threads: int) -> None:
    """One read of the set in this process; prints its peak RSS and time as JSON."""
    import torch

    from klgrade.data import cache
    from klgrade.data.sources import find_samples
    from klgrade.evaluate import evaluation
    from klgrade.infer.grading import load_model

    torch.set_num_threads(threads)
    predictor = load_model()
    if chunk is not None:
        evaluation.CHUNK = cache.CHUNK = chunk
    start = time.perf_counter()
    if reader == "evaluate":
        n = evaluation.evaluate(predictor, data, n_boot=0).metrics["n"]
    elif reader == "calibrate":
        evaluation.calibrate(predictor, data, scored=[])
        n = len(predictor.conformal_grades)
    else:
        with tempfile.TemporaryDirectory() as folder:
            n = len(cache.load_cached(find_samples(data), predictor.preprocess, folder))
    print(json.dumps({"n": n, "seconds": time.perf_counter() - start,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(reader: str, data: Path, chunk: int | None, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", reader, str(data), "--threads", str(threads)]
    command += ["--chunk", str(chunk)] if chunk is not None else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knees", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS))
    parser.add_argument("--child", nargs=2, metavar=("READER", "DATA"))
    parser.add_argument("--chunk", type=int)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.chunk, args.threads)
        return
    from common import machine
    from klgrade.data.cache import CHUNK

    print(f"# {machine()}; shipped model, its resolution, evaluate's batch 64, {args.threads} threads")
    print(f"{'reader':>8} {'knees':>6} {'decoded at a time':>18} {'peak RSS MB':>12} {'s':>7}")
    for knees in args.knees:
        with tempfile.TemporaryDirectory() as folder:
            write_set(Path(folder), knees)
            for reader in args.readers:
                peaks = {}
                for chunk in (CHUNK, knees):
                    row = measure(reader, Path(folder), chunk, args.threads)
                    assert row["n"] == knees, row
                    peaks[chunk] = row["peak_mb"]
                    print(f"{reader:>8} {knees:>6} {chunk:>18} {row['peak_mb']:>12.0f} {row['seconds']:>7.1f}",
                          flush=True)
                print(f"{'':>8} {'':>6} {'whole / chunked':>18} {peaks[knees] / peaks[CHUNK]:>12.2f}")


if __name__ == "__main__":
    main()
