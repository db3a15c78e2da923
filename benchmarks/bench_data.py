"""Data-loading throughput: can the loader feed a training step?

Writes ``--images`` random 512×512 PNG pairs to a temporary folder, then times a DataLoader over
``varformer.data.PairedDataset`` (random 256² crops, flips and rotations) for each worker count,
and reports images/s next to what a training step consumes (``--step-ms`` per ``--batch``
images, e.g. from ``varformer bench --op model``).

Run: ``python -m varformer.benchmarks.bench_data [--workers 0,2,4] [--step-ms 250]``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def make_tree(root: Path, n: int, size: int = 512) -> None:
    from varformer.restoration import save_image
    g = torch.Generator().manual_seed(0)
    for split in ("lq", "gt"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gt = torch.rand(3, size, size, generator=g)
        save_image(gt, root / "gt" / f"{i:04d}.png")
        save_image((gt + 0.1 * torch.randn(3, size, size, generator=g)).clamp(0, 1),
                   root / "lq" / f"{i:04d}.png")


def throughput(root: Path, workers: int, batch: int, batches: int) -> float:
    from varformer.data import PairedDataset
    ds = PairedDataset(root / "lq", root / "gt", crop=256, augment=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                     persistent_workers=workers > 0, drop_last=True)
    it = iter(dl)
    next(it)                                   # start-up (worker spawn) stays out
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(dl)
            b = next(it)
        n += b["lq"].shape[0]
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="0,2,4")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--step-ms", type=float, default=None,
                    help="training step time for --batch images, to compare against")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tree(root, args.images)
        print(f"| workers | loader images/s | batch {args.batch} every |")
        print("|---|---|---|")
        for w in (int(x) for x in args.workers.split(",")):
            ips = throughput(root, w, args.batch, args.batches)
            print(f"| {w} | {ips:.1f} | {1e3 * args.batch / ips:.1f} ms |")
    if args.step_ms:
        print(f"training step: {args.step_ms:.1f} ms per {args.batch} images "
              f"({1e3 * args.batch / args.step_ms:.1f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
