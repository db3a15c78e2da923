"""Mediator attention: fused op vs the official eager formulation, two SDPA calls and
torch.compile of the eager formulation, forward and forward+backward.

Run: ``varformer bench --op mediator_attention [--device cuda] [--quick]`` or this file directly.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from varformer.benchmarks.harness import Case, Provider, smoke
from varformer.ops import mediator_attention, mediator_attention_official

OP = "mediator_attention"

# (B, H, N, L, d) with Nk = N. VarFormer's AFT: one head, d = C, L = N/16 (model.md §3.8).
VARFORMER = [(8, 1, 16384, 1024, 160), (8, 1, 4096, 256, 160), (8, 1, 4096, 256, 320),
             (8, 1, 1024, 64, 320)]
MULTI_HEAD = [(8, 8, n, L, d) for n in (16384, 65536) for L in (16, 64) for d in (32, 64)]
CPU_TARGET = [(1, 1, 16384, 1024, 160),          # the CPU targets of the issue: level 1
              (1, 8, 16384, 64, 64)]            # and a multi-head shape
CPU_QUICK = [(1, 1, 4096, 256, 160), (1, 8, 4096, 16, 32)]
GPU_QUICK = [(8, 1, 16384, 1024, 160), (8, 8, 16384, 64, 64), (8, 8, 65536, 16, 32)]
SMOKE = [(1, 2, 200, 12, 24)]                    # VARFORMER_BENCH_SMOKE=1: one tiny case


def shapes(device: str, quick: bool):
    if smoke():
        return SMOKE
    if device == "cuda":
        return GPU_QUICK if quick else VARFORMER + MULTI_HEAD
    return CPU_QUICK if quick else CPU_QUICK + CPU_TARGET


def flops(B, H, N, L, d):
    fwd = 4.0 * B * H * d * L * (N + N)            # stage 1 (L × Nk) + stage 2 (N × L), 2 GEMMs each
    return lambda mode: fwd if mode == "fwd" else 3.5 * fwd   # backward ≈ 2.5 × forward


def min_bytes(B, H, N, L, d):
    def f(mode, dtype):
        e = torch.finfo(dtype).bits // 8
        fwd = B * H * d * (N + L + 2 * N + N) * e          # read q, m, k, v; write out
        bwd = B * H * d * ((3 * N + L + 2 * N) + (N + L + 2 * N)) * e  # q m k v o do; dq dm dk dv
        return fwd if mode == "fwd" else fwd + bwd
    return f


def _inputs(B, H, N, L, d, dtype, device, layout):
    """layout 'op': [B, H, T, d]; 'official': channel-first [B·H, d, T] as the 1×1 convs give."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ts = [torch.randn(B * H, d, T, generator=g).to(device=device, dtype=dtype) for T in (N, L, N, N)]
    if layout == "official":
        return ts
    return [t.reshape(B, H, d, -1).transpose(-1, -2).contiguous() for t in ts]


def _runner(fn, ins, mode):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*ins)
        return call, None
    for t in ins:
        t.requires_grad_(True)
    out0 = fn(*ins)
    grad = torch.randn_like(out0)
    del out0

    def call():
        fn(*ins).backward(grad)
    return call, ins


def _two_sdpa(q, m, k, v):
    s = F.scaled_dot_product_attention(m, k, v)
    return F.scaled_dot_product_attention(q, m, s)


def cases(device: str, quick: bool = False, dtypes=None) -> list[Case]:
    """Per shape: eager (official) per dtype as the baselines, then fused, two SDPA calls and
    torch.compile of the eager formulation (one dynamic-shape compile) per dtype."""
    if dtypes is None:
        dtypes = [torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]
    compiled = torch.compile(mediator_attention_official, dynamic=True)
    out = []
    for (B, H, N, L, d) in shapes(device, quick):
        scale = d ** -0.5

        def mk(fn, layout, dt, B=B, H=H, N=N, L=L, d=d, scale=scale):
            f = (lambda q, a, k, v: fn(q, a, k, v, scale)) if layout == "official" else fn
            return lambda mode: _runner(f, _inputs(B, H, N, L, d, dt, device, layout), mode)

        provs = [Provider("eager (official)", dt, mk(mediator_attention_official, "official", dt),
                          baseline=True) for dt in dtypes]
        # quick: the other implementations in the first dtype only (bf16 on CUDA)
        for dt in (dtypes[:1] if quick else dtypes):
            provs.append(Provider("fused", dt, mk(mediator_attention, "op", dt)))
            provs.append(Provider("sdpa x2", dt, mk(_two_sdpa, "op", dt)))
            if device == "cuda" or not quick:
                provs.append(Provider("compiled eager", dt, mk(compiled, "official", dt)))
        out.append(Case(OP, f"B{B} H{H} N{N} L{L} d{d}", flops(B, H, N, L, d),
                        min_bytes(B, H, N, L, d), provs))
    return out


if __name__ == "__main__":
    from varformer.cli import main
    sys.exit(main(["bench", "--op", OP] + sys.argv[1:]))
