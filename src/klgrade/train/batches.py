"""Batches straight from the uint8 image cache: one fancy-index per batch, no per-image Python work.

`EpochBatchSampler` draws a fresh order each epoch, seeded by (seed, epoch). It reads the epoch from the
trainer's loop when its iterator starts (on resume Lightning creates the iterator before `set_epoch`),
so a run resumed at an epoch boundary sees exactly the batches an uninterrupted run would. It also shards
batches across DDP processes itself.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class CachedImages(Dataset):
    """(uint8 images (N, H, W), labels (N,)); `__getitems__` returns a whole batch at once."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(np.array(images, copy=True))  # memmap -> RAM, writable
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "CachedImages":
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, device=self.images.device)
        return self.images[index], self.labels[index]


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices; shuffled (optionally class-weighted) per epoch from `seed + epoch`.

    Args:
        sample_weights: draw with replacement in proportion to these (class balancing); None = permutation.
        epoch_source: returns the current epoch (e.g. the trainer's); without it, `set_epoch` decides.
        shard_source: returns (rank, world size) under DDP, read when iterating (ranks are known only then).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 sample_weights: np.ndarray | None = None, epoch_source: Callable[[], int] | None = None,
                 shard_source: Callable[[], tuple[int, int]] | None = None):
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.shard_source = shard_source
        self.sample_weights = None if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.double)
        self.epoch = 0
        self.epoch_source = epoch_source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[torch.Tensor]:
        epoch = self.epoch_source() if self.epoch_source is not None else self.epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.sample_weights is not None:
            order = torch.multinomial(self.sample_weights, self.n, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        batches = list(order.split(self.batch_size))
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        rank, world_size = self.shard_source() if self.shard_source is not None else (0, 1)
        usable = len(batches) - len(batches) % world_size  # every process takes the same number of steps
        return batches[rank:usable:world_size]

    def batches_per_process(self, world_size: int) -> int:
        """Optimizer steps per epoch for each of `world_size` processes (known before DDP starts), as `_batches`
        makes them: a last partial batch is dropped with `drop_last` unless it is the only one. 0 where there are
        fewer batches than processes."""
        full, rest = divmod(self.n, self.batch_size)
        n_batches = full + (1 if rest and (not self.drop_last or full == 0) else 0)
        return n_batches // world_size

    def __iter__(self):
        return (batch.tolist() for batch in self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def _identity(batch):
    return batch


def make_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                sample_weights: np.ndarray | None = None, epoch_source: Callable[[], int] | None = None,
                shard_source: Callable[[], tuple[int, int]] | None = None) -> DataLoader:
    dataset = CachedImages(images, labels)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last=shuffle,
                                sample_weights=sample_weights, epoch_source=epoch_source, shard_source=shard_source)
    # Own generator: creating an iterator must not draw from the global RNG that dropout uses.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_identity, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def class_balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample weights that make every grade equally likely to be drawn."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return 1.0 / np.maximum(counts[labels], 1.0)


def inverse_frequency(labels: np.ndarray, num_classes: int, power: float = 0.5) -> torch.Tensor:
    """Class weights for the loss, (1/frequency)^power normalised to mean 1 (power 0.5 = the usual mild form)."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    weights = (counts.sum() / np.maximum(counts, 1.0)) ** power
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)

