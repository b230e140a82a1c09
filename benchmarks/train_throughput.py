"""Training images/s of klgrade's Lightning step versus a bare PyTorch loop (same model, batch, augmentation,
precision), per model, on the current device.

    python benchmarks/train_throughput.py [--models msa_net resnet18] [--batch 64] [--size 224] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from klgrade.data.augment import AugmentConfig, random_augment  # noqa: E402
from klgrade.data.preprocess import normalize  # noqa: E402
from klgrade.models import create_model  # noqa: E402
from klgrade.train.batches import make_loader  # noqa: E402
from klgrade.train.config import TrainConfig  # noqa: E402
from klgrade.train.module import GradingModule  # noqa: E402


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


def klgrade_rate(name: str, images: np.ndarray, labels: np.ndarray, batch: int, warmup: int) -> float:
    config = TrainConfig(model=name, batch_size=batch, epochs=1, quiet=True)
    loader = make_loader(images, labels, batch, shuffle=True)
    if torch.cuda.is_available():
        loader.dataset.images = loader.dataset.images.cuda()  # decoded dataset kept on the device
        loader.dataset.labels = loader.dataset.labels.cuda()
    module = GradingModule(create_model(name), config, len(loader.batch_sampler))
    timer = StepTimer(batch, warmup)
    with tempfile.TemporaryDirectory() as out:
        trainer = L.Trainer(max_epochs=1, precision="bf16-mixed", callbacks=[timer], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=out, use_distributed_sampler=False)
        trainer.fit(module, loader)
    return timer.rate


def bare_rate(name: str, images: np.ndarray, labels: np.ndarray, batch: int, warmup: int, steps: int) -> float:
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
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), targets[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["msa_net", "resnet18"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    n = args.batch * (args.steps + args.warmup + 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, args.size, args.size), dtype=np.uint8)
    labels = rng.integers(0, 5, n)
    print(f"machine: {machine()}")
    print(f"batch {args.batch}, {args.size}x{args.size}, bf16 autocast, channels_last, on-device augmentation, "
          f"{args.steps} timed steps")
    print(f"{'model':12s} {'klgrade img/s':>14s} {'bare loop img/s':>16s} {'ratio':>6s}")
    for name in args.models:
        ours = klgrade_rate(name, images, labels, args.batch, args.warmup)
        bare = bare_rate(name, images, labels, args.batch, args.warmup, args.steps)
        print(f"{name:12s} {ours:14.1f} {bare:16.1f} {ours / bare:6.2f}", flush=True)


if __name__ == "__main__":
    main()
