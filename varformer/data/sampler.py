"""Weighted multi-task sampling (paper: 0.3 dehaze, 0.1 low light, 0.2 derain, 0.2 Gaussian
noise, 0.1 real noise, 0.1 deblur per batch).

Each epoch is one sequence of ``num_samples`` draws made from ``(seed, epoch)`` alone:

1. the task of each draw is drawn with probability proportional to its weight;
2. the index within the task is the next entry of a per-task random permutation (a fresh
   permutation when one is used up), so an image repeats within an epoch only after all
   images of its task were drawn (the official code draws with replacement).

Rank ``r`` of ``num_replicas`` takes draws ``r, r + num_replicas, ...``, so ranks never share a
draw, and no image index appears on two ranks unless its task is drawn more often in the epoch
than it has images. The sequence is padded (continued) to a multiple of ``num_replicas``.

Resume: ``state_dict()`` records (seed, epoch, position in this rank's sequence);
``load_state_dict`` makes the next ``__iter__`` continue from that position. With a
``DataLoader`` the sampler runs ahead of the training loop (prefetching), so pass the number
of samples this rank actually consumed: ``state_dict(consumed=step_in_epoch * batch_size)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import Sampler

from .pairing import stable_seed


class MultiTaskSampler(Sampler):
    """Yields global indices (or ``(index, draw_seed)`` pairs if ``item_seeds``) into a
    concatenated multi-task dataset.

    ``tasks``: ``{task: size}`` (tasks laid out consecutively in that order) or a dataset with
    ``task_ranges = {task: (start, stop)}`` (``MultiTaskDataset``). ``weights``: ``{task:
    weight}`` (normalised; every task needs one; weight 0 = never drawn). ``num_samples``:
    draws per epoch over all ranks (default: total dataset size). ``item_seeds``: also yield a
    per-draw seed, which varformer datasets use for crops, flips and noise.
    """

    def __init__(self, tasks, weights: dict, num_samples: Optional[int] = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, item_seeds: bool = False):
        if hasattr(tasks, "task_ranges"):
            self.task_ranges = {t: (int(a), int(b)) for t, (a, b) in tasks.task_ranges.items()}
        elif isinstance(tasks, dict):
            self.task_ranges, start = {}, 0
            for t, n in tasks.items():
                self.task_ranges[t] = (start, start + int(n))
                start += int(n)
        else:
            raise TypeError("tasks must be {task: size} or a dataset with task_ranges")
        missing = set(self.task_ranges) - set(weights)
        extra = set(weights) - set(self.task_ranges)
        if missing or extra:
            raise ValueError(f"weights must name exactly the tasks {sorted(self.task_ranges)}; "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        for t, (a, b) in self.task_ranges.items():
            if weights[t] < 0 or (weights[t] > 0 and b <= a):
                raise ValueError(f"task {t!r}: weight {weights[t]} with {b - a} items")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ValueError("all task weights are zero")
        self.tasks = list(self.task_ranges)
        self.weights = {t: weights[t] / total for t in self.tasks}
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        size = sum(b - a for a, b in self.task_ranges.values())
        self.num_samples = int(num_samples if num_samples is not None else size)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.item_seeds = item_seeds
        self.per_rank = math.ceil(self.num_samples / num_replicas)
        self.epoch, self._start, self._yielded = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; resets a pending resume position if the epoch changes."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def epoch_sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' draws of the current epoch: (global indices [N], draw seeds [N]), with
        N = per_rank * num_replicas."""
        n = self.per_rank * self.num_replicas
        g = torch.Generator().manual_seed(stable_seed("sampler", self.seed, self.epoch))
        probs = torch.tensor([self.weights[t] for t in self.tasks], dtype=torch.float64)
        task_of = torch.multinomial(probs, n, replacement=True, generator=g)
        index = torch.empty(n, dtype=torch.int64)
        for i, t in enumerate(self.tasks):
            a, b = self.task_ranges[t]
            where = (task_of == i).nonzero().flatten()
            if len(where) == 0:
                continue
            perms = [torch.randperm(b - a, generator=g)
                     for _ in range(math.ceil(len(where) / (b - a)))]
            index[where] = torch.cat(perms)[:len(where)] + a
        draw_seeds = torch.randint(0, 2 ** 62, (n,), generator=g)
        return index, draw_seeds

    def __iter__(self):
        index, draw_seeds = self.epoch_sequence()
        start, self._start = self._start, 0
        mine = slice(self.rank + start * self.num_replicas, None, self.num_replicas)
        self._yielded = start
        for i, s in zip(index[mine].tolist(), draw_seeds[mine].tolist()):
            self._yielded += 1
            yield (i, s) if self.item_seeds else i

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Resume point: ``consumed`` = samples of this epoch used on this rank (default: the
        number yielded so far, which runs ahead of training when a DataLoader prefetches)."""
        return {"seed": self.seed, "epoch": self.epoch,
                "position": self._yielded if consumed is None else int(consumed),
                "num_samples": self.num_samples, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        """Continue the sequence of ``state``: the next ``__iter__`` starts at its position."""
        for k in ("seed", "num_samples", "num_replicas"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler "
                                 f"{getattr(self, k)}: the sequence would differ")
        if not 0 <= state["position"] <= self.per_rank:
            raise ValueError(f"sampler position {state['position']} outside [0, "
                             f"{self.per_rank}]")
        self.epoch, self._start = int(state["epoch"]), int(state["position"])
        self._yielded = self._start
