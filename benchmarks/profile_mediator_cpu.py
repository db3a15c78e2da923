"""Mediator attention on CPU: interleaved rounds of the official eager formulation, the fused op
and two plain SDPA calls (PyTorch's flash CPU kernels as one call per stage), reporting per
implementation the least and median wall time and the least process CPU time (all threads).

Interleaving and the least time make side-by-side ratios usable on a busy machine; the CPU
time shows the work done (spin-waiting included). ISA and threads as set by the environment,
e.g. ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``.

Run: ``python benchmarks/profile_mediator_cpu.py [--shape B,H,N,L,d] [--mode fwd|fwd+bwd]
[--rounds R] [--impls eager,fused,sdpa]``. ``fused:csrc`` / ``fused:flash`` run the fused op on
one CPU kernel (``mediator_attention.CPU_KERNEL``), e.g. ``--impls eager,fused:flash,fused:csrc``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from varformer.ops import mediator_attention, mediator_attention_official

_mam = importlib.import_module("varformer.ops.mediator_attention")


def _cpu_ms(a, b):
    return (b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime) * 1e3


def _call(impl, shape, mode):
    B, H, N, L, d = shape
    scale = d ** -0.5
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(B * H, d, T, generator=g) for T in (N, L, N, N)]   # official layout
    if impl == "eager":
        fn = lambda q, a, k, v: mediator_attention_official(q, a, k, v, scale)  # noqa: E731
    else:
        ts = [t.reshape(B, H, d, -1).transpose(-1, -2).contiguous() for t in ts]
        if impl.startswith("fused"):
            kernel = impl.partition(":")[2] or "auto"

            def fn(*a):
                saved, _mam.CPU_KERNEL["value"] = _mam.CPU_KERNEL["value"], kernel
                try:
                    return mediator_attention(*a)
                finally:
                    _mam.CPU_KERNEL["value"] = saved
        else:
            fn = (lambda q, m, k, v: F.scaled_dot_product_attention(
                q, m, F.scaled_dot_product_attention(m, k, v)))
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(*ts)
        return call
    for t in ts:
        t.requires_grad_(True)
    grad = torch.randn_like(fn(*ts))

    def call():
        for t in ts:
            t.grad = None
        fn(*ts).backward(grad)
    return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,1,16384,1024,160", help="B,H,N,L,d (Nk = N)")
    ap.add_argument("--mode", default="fwd", choices=("fwd", "fwd+bwd"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--impls", default="eager,fused,sdpa")
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    impls = args.impls.split(",")
    calls = {i: _call(i, shape, args.mode) for i in impls}
    for c in calls.values():
        c()                                   # warm-up
    wall = {i: [] for i in impls}
    cpu = {i: [] for i in impls}
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for i, c in calls.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            c()
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            wall[i].append((t1 - t0) * 1e3)
            cpu[i].append(_cpu_ms(r0, r1))
    isa = torch.ops.varformer_ext.attention_isa() if _mam.cpu_kernel_status()[0] else "none"
    print(f"mediator attention B,H,N,L,d={shape} {args.mode} fp32, ISA "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"mediator kernel {isa}, loadavg {load0:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"{args.rounds} interleaved rounds")
    base = impls[0]
    for i in impls:
        print(f"  {i:<11} wall least {min(wall[i]):9.1f} ms  median {statistics.median(wall[i]):9.1f}"
              f"  cpu least {min(cpu[i]):9.1f} ms  | {base} / {i}: least "
              f"{min(wall[base]) / min(wall[i]):.2f}x, median "
              f"{statistics.median(wall[base]) / statistics.median(wall[i]):.2f}x, cpu "
              f"{min(cpu[base]) / min(cpu[i]):.2f}x")


if __name__ == "__main__":
    main()
