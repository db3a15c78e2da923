"""Where the C++ CPU kernels run their work items (csrc/cpu_threads.h), A/B in alternating rounds:
``VARFORMER_CPU_POOL`` settings side by side for each kernel, the op alone, optionally under
background load. Settings: ``auto`` (OpenMP on a quiet machine, the extension's helper pool on a
busy one), ``0`` (OpenMP only, cut to the free CPUs when busy: the rule before the pool), ``1``
(the helper pool always).

Kernels: window attention forward / backward at VarFormer's 128² (4x4 windows, 8 heads of 20)
and SwinIR's 64² (8x8, shift 4, 6 x 30), the VQ lookup at N = 4096 and 256 (V = 4096, C = 32),
one attention stage of mediator attention (256 queries x 4096 keys, d = 160), the φ step
(B = 16) and the 10-scale quantizer loop (B = 16).

Run: ``python benchmarks/profile_cpu_pool.py [--load N] [--budget S] [--modes auto,0]
[--rounds R] [--threads T] [--var NAME] [--only a,b]``; prints median and mean ms per setting and
the ratio of the second setting's time over the first's. ``--var`` A/B-tests another variable
the same way (e.g. ``--var VARFORMER_VQ_SCREEN --modes 1,0 --only lookup,quantize``: the float32
lookup's integer screening on and off); ``--only`` keeps the kernels whose names contain one of
the given words.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

import torch

from varformer.benchmarks.harness import BackgroundLoad, cpu_info
from varformer.ops import _ext
from varformer.ops.quantizer import MultiScaleQuantizer


def kernels():
    ops = torch.ops.varformer_ext
    vqm = importlib.import_module("varformer.ops.vq")
    g = torch.Generator().manual_seed(0)

    def window(B, H, W, ws, sh, nh, hd):
        qkv = torch.randn(B, H, W, 3 * nh * hd, generator=g)
        t = torch.randn((2 * ws - 1) ** 2, nh, generator=g)
        s = hd ** -0.5
        out, lse = ops.window_attention_fwd(qkv, t, ws, sh, nh, s)
        go = torch.randn(out.shape, generator=g)
        return (lambda: ops.window_attention_fwd(qkv, t, ws, sh, nh, s),
                lambda: ops.window_attention_bwd(go, qkv, t, out, lse, ws, sh, nh, s))
    w128f, w128b = window(1, 128, 128, 4, 2, 8, 20)
    w64f, w64b = window(1, 64, 64, 8, 4, 6, 30)
    E = torch.randn(4096, 32, generator=g)
    sq = (E * E).sum(1)
    z4k, z256 = torch.randn(4096, 32, generator=g), torch.randn(256, 32, generator=g)
    z16k = torch.randn(16384, 32, generator=g)
    q, k, v = (torch.randn(1, n, 160, generator=g) for n in (256, 4096, 4096))
    h, fh, fr = (torch.randn(16, 16, 16, 32, generator=g) for _ in range(3))
    pw, pb = torch.randn(32, 32, 3, 3, generator=g) * 0.05, torch.randn(32, generator=g)
    quant = MultiScaleQuantizer().eval()
    quant.requires_grad_(False)
    f = torch.randn(16, 32, 16, 16, generator=g)
    return {
        "window 128² fwd": w128f, "window 128² bwd": w128b,
        "window 64² fwd": w64f, "window 64² bwd": w64b,
        "lookup N=16384": lambda: vqm._lookup_csrc(z16k, E, sq, True),
        "lookup N=4096": lambda: vqm._lookup_csrc(z4k, E, sq, True),
        "lookup N=256": lambda: vqm._lookup_csrc(z256, E, sq, True),
        "attention 256x4096 fwd": lambda: ops.attention_fwd(q, k, v, 160 ** -0.5),
        "φ step B=16": lambda: ops.phi_update(h, pw, pb, 0.5, 0.5, fh, fr),
        "quantize B=16": lambda: quant.f_to_idxBl_or_fhat(f, to_fhat=False),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per setting and round")
    ap.add_argument("--modes", default="auto,0", help="two VARFORMER_CPU_POOL settings")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--var", default="VARFORMER_CPU_POOL", help="the variable --modes sets")
    ap.add_argument("--only", default="", help="comma-separated words; kernels naming one")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if len(modes) != 2:
        raise SystemExit(f"--modes needs two settings, got {args.modes!r}")
    ok, why = _ext.cpu_status()
    if not ok:
        raise SystemExit(f"the C++ extension is not available: {why}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = cpu_info(measure=False)
    cases = kernels()
    if args.only:
        words = args.only.split(",")
        cases = {k: f for k, f in cases.items() if any(w in k for w in words)}
    res: dict = {}
    var = args.var
    old = os.environ.get(var)
    with torch.no_grad(), BackgroundLoad(args.load, torch.get_num_threads()) as load:
        if args.load:
            time.sleep(1.0)
        try:
            for r in range(args.rounds):
                for name, fn in cases.items():
                    for mode in (modes if r % 2 == 0 else modes[::-1]):
                        os.environ[var] = mode
                        fn()
                        ts, t_end = [], time.perf_counter() + args.budget
                        while time.perf_counter() < t_end or len(ts) < 3:
                            t0 = time.perf_counter()
                            fn()
                            ts.append((time.perf_counter() - t0) * 1e3)
                        res.setdefault((name, mode), []).extend(ts)
        finally:
            if old is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = old
    a, b = modes
    print(f"{info['model']}, {torch.get_num_threads()} threads, {load.describe()}, "
          f"{args.rounds} alternating rounds of {args.budget:g} s per setting of {var}")
    print(f"| kernel | {a}: median / mean ms | {b}: median / mean ms | {b} / {a}: median, mean |")
    print("|---|---|---|---|")
    for name in cases:
        x, y = res[(name, a)], res[(name, b)]
        mx, my = statistics.median(x), statistics.median(y)
        ax, ay = statistics.fmean(x), statistics.fmean(y)
        print(f"| {name} | {mx:.3f} / {ax:.3f} | {my:.3f} / {ay:.3f} | "
              f"{my / mx:.2f}x, {ay / ax:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
