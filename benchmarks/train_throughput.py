"""Training images/s of klgrade's Lightning step versus a bare PyTorch loop (same model, batch, augmentation,
precision: by default bf16 autocast where the device computes in bf16, else fp32, as `klgrade train` picks it),
per model, on the current device; with `--concurrency`, the images/s of N such trainings run at once in separate
processes on the same device (what `reproduce --jobs N` does), summed.

    python benchmarks/train_throughput.py [--models msa_net resnet18 ...] [--batch 64] [--size 224] [--steps 30]
        [--concurrency 2 4] [--precision auto|bf16-mixed|32-true] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from klgrade.data.augment import AugmentConfig, random_augment  # noqa: E402
from klgrade.data.preprocess import normalize  # noqa: E402
from klgrade.experiments.jobs import threads_per_job  # noqa: E402
from klgrade.models import create_model  # noqa: E402
from klgrade.train.batches import make_loader  # noqa: E402
from klgrade.train.config import TrainConfig, resolve_precision  # noqa: E402
from klgrade.train.module import GradingModule  # noqa: E402



# Lightning's banners and warnings about the benchmark's own loader would bury the table (also in spawned workers).
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="lightning")


class StepTimer(L.Callback):
    """Images/s over the steps after `warmup`."""

    def __init__(self, batch: int, warmup: int):
        self.batch, self.warmup, self.start, self.steps = batch, warmup, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        elif batch_idx > self.warmup:
            self.steps += 1

    def on_train_epoch_end(self, trainer, module):
        self._sync()
        self.rate = self.steps * self.batch / (time.perf_counter() - self.start)

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def klgrade_rate(name: str, images: np.ndarray, labels: np.ndarray, batch: int, warmup: int, precision: str) -> float:
    config = TrainConfig(model=name, batch_size=batch, epochs=1, quiet=True)
    loader = make_loader(images, labels, batch, shuffle=True)
    if torch.cuda.is_available():
        loader.dataset.images = loader.dataset.images.cuda()  # decoded dataset kept on the device
        loader.dataset.labels = loader.dataset.labels.cuda()
    module = GradingModule(create_model(name), config, len(loader.batch_sampler))
    timer = StepTimer(batch, warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(max_epochs=1, precision=precision, callbacks=[timer], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=out, use_distributed_sampler=False)
        trainer.fit(module, loader)
    return timer.rate


def bare_rate(name: str, images: np.ndarray, labels: np.ndarray, batch: int, warmup: int, steps: int,
              precision: str) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(name).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data, targets = torch.from_numpy(np.array(images)).to(device), torch.from_numpy(labels).to(device)
    generator, augment = torch.Generator().manual_seed(0), AugmentConfig()
    start = None
    for step in range(warmup + steps + 1):
        if step == warmup + 1:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        index = torch.randint(0, len(data), (batch,), device=device)
        x = normalize(data[index].unsqueeze(1), lambda u: random_augment(u, augment, generator))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = F.cross_entropy(model(x).float(), targets[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def random_data(batch: int, steps: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = batch * (steps + 1)
    return rng.integers(0, 255, (n, size, size), dtype=np.uint8), rng.integers(0, 5, n)


def concurrent_job(name: str, batch: int, steps: int, size: int, warmup: int, threads: int, precision: str) -> float:
    """One of N simultaneous trainings (a spawned process): its own data, its klgrade images/s."""
    torch.set_num_threads(threads)
    images, labels = random_data(batch, steps + warmup, size, seed=torch.initial_seed() % 2**32)
    return klgrade_rate(name, images, labels, batch, warmup, precision)


def concurrent_rate(name: str, workers: int, args, precision: str) -> float:
    """Summed images/s of `workers` klgrade trainings at once on this device (as `reproduce --jobs`)."""
    threads = threads_per_job(workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rates = pool.map(concurrent_job, *zip(*[(name, args.batch, args.steps, args.size, args.warmup, threads, precision)] * workers))
        return float(sum(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2", "densenet121", "msa_net"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[],
                        help="also time N trainings at once, for each N given")
    parser.add_argument("--precision", choices=("auto", "bf16-mixed", "32-true"), default="auto",
                        help="auto: as `klgrade train` picks it (bf16 where the device computes in bf16, else fp32)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    precision = resolve_precision(args.precision, "auto")
    images, labels = random_data(args.batch, args.steps + args.warmup, args.size)
    print(f"machine: {machine()}")
    print(f"batch {args.batch}, {args.size}x{args.size}, precision {precision}, channels_last, on-device augmentation, "
          f"{args.steps} timed steps")
    print(f"{'model':12s} {'klgrade img/s':>14s} {'bare loop img/s':>16s} {'ratio':>6s}"
          + "".join(f" {f'x{n} img/s':>10s} {'gain':>5s}" for n in args.concurrency))
    results = {"machine": machine(), "batch": args.batch, "size": args.size, "precision": precision, "models": {}}
    for name in args.models:
        ours = klgrade_rate(name, images, labels, args.batch, args.warmup, precision)
        bare = bare_rate(name, images, labels, args.batch, args.warmup, args.steps, precision)
        together = {n: concurrent_rate(name, n, args, precision) for n in args.concurrency}
        results["models"][name] = {"klgrade": ours, "bare": bare, "ratio": ours / bare,
                                   "concurrent": {str(n): rate for n, rate in together.items()}}
        print(f"{name:12s} {ours:14.1f} {bare:16.1f} {ours / bare:6.2f}"
              + "".join(f" {rate:10.1f} {rate / ours:5.2f}" for rate in together.values()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
