"""A small synthetic paired dataset and a resumable sharded sampler (for tests and smoke runs).

Items match ``varformer.data``: ``{"lq": [3, S, S], "gt": [3, S, S] in [-1, 1], "task": str}``.
Item i depends only on (seed, i), so a resumed run sees the same data."""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

TASKS = ("denoise", "deblur")


class SyntheticPairs(Dataset):
    """n smooth random images (gt) with a degraded copy (lq): Gaussian noise σ 0.1 for even i,
    a 5×5 box blur for odd i."""

    def __init__(self, n: int = 16, size: int = 256, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        low = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
        gt = F.interpolate(low, size=(self.size, self.size), mode="bicubic",
                           align_corners=False).clamp(-1, 1)[0]
        task = TASKS[i % 2]
        if task == "denoise":
            lq = gt + 0.1 * torch.randn(gt.shape, generator=g)
        else:
            lq = F.avg_pool2d(gt[None], 5, 1, 2, count_include_pad=False)[0]
        return {"lq": lq.clamp(-1, 1), "gt": gt, "task": task}


class ShardedSampler:
    """Per-epoch shuffled indices (seed + epoch), padded to a multiple of ``num_replicas`` and
    split rank::num_replicas. Same interface and resume semantics as
    ``varformer.data.MultiTaskSampler``: ``state_dict(consumed)`` records the position in this
    rank's sequence, and after ``load_state_dict`` the next ``__iter__`` of that epoch starts
    there."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.seed, self.shuffle, self.epoch, self._start = seed, shuffle, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = len(self) * self.num_replicas
        idx = (idx * (total // self.n + 1))[:total]
        return idx[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self._indices()[start:])

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def state_dict(self, consumed: int = 0) -> Dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": int(consumed)}

    def load_state_dict(self, sd: Dict) -> None:
        self.seed, self.epoch, self._start = sd["seed"], sd["epoch"], sd["position"]


__all__ = ["SyntheticPairs", "ShardedSampler"]
