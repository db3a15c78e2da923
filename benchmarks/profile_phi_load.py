"""The quantizer's φ step on CPU under background load: VAR's φ (eager, NCHW) against the C++
``phi_update`` as it runs by default (OpenMP when quiet, its helper pool when busy), on OpenMP
cut to the free CPUs (``VARFORMER_CPU_POOL=0``, the rule before the pool), on OpenMP with every
thread (also ``VARFORMER_LOAD_AWARE=0``) and on the helper pool always
(``VARFORMER_CPU_POOL=1``), in alternating rounds of 1 s each, reporting per implementation the
calls made, median, mean, p80 and p95 wall time.

On an oversubscribed machine the median and the mean part ways: most calls run at full speed,
some wait a time slice for a descheduled team thread. The mean (throughput) is what a loop of
such calls gets; ``varformer bench --load N`` compares means for that reason.

Run: ``python benchmarks/profile_phi_load.py [--load N] [--rounds R] [--batch B]`` (N background
processes with as many busy threads as torch uses, default 2; ISA as set by the environment).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from varformer.benchmarks.harness import BackgroundLoad
from varformer.ops import _ext


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    ok, why = _ext.cpu_status()
    if not ok:
        raise SystemExit(f"the C++ extension is not available: {why}")
    B, C, r = args.batch, 32, 0.5
    g = torch.Generator().manual_seed(3)
    h, fh, fr = (torch.randn(B, C, 16, 16, generator=g) for _ in range(3))
    w, b = torch.randn(C, C, 3, 3, generator=g) * 0.05, torch.randn(C, generator=g)
    hn, fhn, frn = (t.permute(0, 2, 3, 1).contiguous() for t in (h, fh, fr))

    def eager():
        p = h.mul(1 - r) + F.conv2d(h, w, b, padding=1).mul_(r)
        fh.add_(p)
        fr.sub_(p)

    def fused():
        torch.ops.varformer_ext.phi_update(hn, w, b, 1 - r, r, fhn, frn)

    # (name, callable, VARFORMER_LOAD_AWARE, VARFORMER_CPU_POOL)
    impls = [("eager (VAR's φ)", eager, "1", ""),
             ("phi_update (default: auto)", fused, "1", ""),
             ("phi_update, OpenMP, load-aware", fused, "1", "0"),
             ("phi_update, OpenMP, every thread", fused, "0", "0"),
             ("phi_update, helper pool always", fused, "1", "1")]
    times = {name: [] for name, *_ in impls}
    keys = ("VARFORMER_LOAD_AWARE", "VARFORMER_CPU_POOL")
    old = {k: os.environ.get(k) for k in keys}
    with BackgroundLoad(args.load, torch.get_num_threads()) as load:
        time.sleep(1.0)
        try:
            for _ in range(args.rounds):
                for name, fn, *env in impls:
                    os.environ.update(zip(keys, env))
                    fn()
                    t_end = time.perf_counter() + 1.0
                    while time.perf_counter() < t_end:
                        t0 = time.perf_counter()
                        fn()
                        times[name].append((time.perf_counter() - t0) * 1e3)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    print(f"φ step B={B} (3x3 conv {C}->{C} at 16x16), {torch.get_num_threads()} threads, "
          f"ISA {_ext.cpu_isa()}, {load.describe()}, {args.rounds} rounds of 1 s")
    for name, ts in times.items():
        ts.sort()
        q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
        print(f"{name:34s} calls {len(ts):6d}  median {statistics.median(ts):8.3f} ms  "
              f"mean {statistics.fmean(ts):8.3f} ms  p80 {q(0.8):8.3f}  p95 {q(0.95):8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
