"""Shifted-window attention: fused op vs the eager Swin formulation (roll, partition, matmul,
bias, mask, softmax, matmul, reverse), SDPA with a float mask on partitioned windows,
torch.compile of the eager formulation and compiled FlexAttention (bias + shift mask in its
score_mod; forward only on CPU, where Flex has no backward); on CPU also the chunked PyTorch
path the C++ kernel replaced. Forward and forward+backward, gradients to qkv and the table.

Run: ``varformer bench --op window_attention [--device cuda] [--quick]``; on CPU the C++
kernel's ISA variant follows ``VARFORMER_CPU_ISA`` (avx512 | avx2 | baseline).
"""
from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F

from varformer.benchmarks.harness import Case, Provider, smoke
from varformer.ops import window_attention, window_attention_reference
from varformer.ops.window_attention import _additive, _merge_heads, _split_heads

OP = "window_attention"

# (B, H, W, window, shift, heads, head_dim)
VARFORMER = [(8, 128, 128, 4, 2, 8, 20), (8, 64, 64, 4, 2, 8, 40), (8, 32, 32, 4, 2, 8, 80),
             (8, 32, 32, 4, 2, 4, 160), (8, 16, 16, 4, 2, 4, 320)]
SWINIR = [(8, 64, 64, 8, 4, 6, 30)]
SWIN_T = [(64, 56, 56, 7, 3, 3, 32)]
# the CPU target shapes: VarFormer 128² and SwinIR 64² (B=1); Swin-T stage 1 in the full run
CPU_QUICK = [(1, 128, 128, 4, 2, 8, 20), (1, 64, 64, 8, 4, 6, 30)]
CPU_FULL = CPU_QUICK + [(1, 56, 56, 7, 3, 3, 32)]
GPU_QUICK = [(8, 128, 128, 4, 2, 8, 20), (8, 64, 64, 8, 4, 6, 30), (64, 56, 56, 7, 3, 3, 32)]
SMOKE = [(1, 16, 24, 4, 2, 2, 8)]                 # VARFORMER_BENCH_SMOKE=1: one tiny case


def shapes(device: str, quick: bool):
    if smoke():
        return SMOKE
    if device == "cuda":
        return GPU_QUICK if quick else VARFORMER + SWINIR + SWIN_T
    return CPU_QUICK if quick else CPU_FULL


def flops(B, H, W, ws, nh, hd):
    fwd = 4.0 * B * H * W * ws * ws * nh * hd
    return lambda mode: fwd if mode == "fwd" else 3.5 * fwd


def min_bytes(B, H, W, nh, hd):
    def f(mode, dtype):
        e = torch.finfo(dtype).bits // 8
        C = nh * hd
        fwd = B * H * W * 4 * C * e                   # read qkv, write out
        bwd = B * H * W * 8 * C * e                   # read qkv, out, dout; write dqkv
        return fwd if mode == "fwd" else fwd + bwd
    return f


def sdpa_masked(qkv, table, ws, shift, nh):
    """Partition (copies), SDPA with bias + shift mask as a float mask, reverse."""
    B, H, W, _ = qkv.shape
    q, k, v = _split_heads(qkv, ws, shift, nh)
    mask = _additive(table.to(qkv.dtype), H, W, ws, shift)     # [nW or 1, heads, N, N]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _merge_heads(o, ws, shift, H, W)


def flex(ws, shift, nh, H, W, device):
    """Compiled FlexAttention with windows as the batch and bias + mask in score_mod."""
    from torch.nn.attention.flex_attention import flex_attention
    from varformer.ops.window_attention import region_mask, relative_position_index
    idx = relative_position_index(ws).to(device)
    reg = (region_mask(H, W, ws, shift) if shift else torch.zeros(1, ws * ws, ws * ws)).to(device)
    nW = reg.shape[0]
    fa = torch.compile(flex_attention, dynamic=False)

    def run(qkv, table):
        q, k, v = _split_heads(qkv, ws, shift, nh)
        Bn = q.shape[0] * q.shape[1]
        tab = table.to(qkv.dtype)

        def score_mod(score, b, h, qi, ki):
            return score + tab[idx[qi, ki], h] + reg[b % nW, qi, ki]
        o = fa(*(t.reshape(Bn, nh, ws * ws, -1) for t in (q, k, v)), score_mod=score_mod)
        return _merge_heads(o.view(q.shape), ws, shift, H, W)
    return run


def _flex_make(ws, shift, nh, H, W, device):
    """fn for FlexAttention, or a stand-in that raises where it has no backward (CPU)."""
    run = flex(ws, shift, nh, H, W, device)
    if device == "cuda":
        return run

    def cpu(qkv, table):
        if torch.is_grad_enabled() and (qkv.requires_grad or table.requires_grad):
            raise NotImplementedError("FlexAttention has no CPU backward")
        return run(qkv, table)
    return cpu


def _chunked(kw):
    """The op on the chunked PyTorch CPU path (the one the C++ kernel replaced)."""
    wa = importlib.import_module("varformer.ops.window_attention")

    def fn(x, t):
        return window_attention(x, t, **kw)

    def wrap(call):
        def inner():
            prev = wa.CPU_KERNEL["value"]
            wa.CPU_KERNEL["value"] = "chunked"
            try:
                return call()
            finally:
                wa.CPU_KERNEL["value"] = prev
        return inner
    return fn, wrap


def _fused_name(device: str) -> str:
    if device != "cpu":
        return "fused"
    wa = importlib.import_module("varformer.ops.window_attention")
    ok, why = wa.cpu_kernel_status()
    if not ok:
        return f"fused (chunked: {why.splitlines()[0][:40]})"
    return f"fused C++ {torch.ops.varformer_ext.window_attention_isa()}"


def _runner(fn, qkv, table, mode):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(qkv, table)
        return call, None
    qkv.requires_grad_(True)
    table.requires_grad_(True)
    grad = torch.randn_like(fn(qkv, table))

    def call():
        fn(qkv, table).backward(grad)
    return call, [qkv, table]


def cases(device: str, quick: bool = False, dtypes=None) -> list[Case]:
    if dtypes is None:
        dtypes = [torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]
    compiled = torch.compile(window_attention_reference, dynamic=False)
    out = []
    for (B, H, W, ws, shift, nh, hd) in shapes(device, quick):
        kw = dict(window_size=ws, shift_size=shift, num_heads=nh)

        def mk(fn, dt, B=B, H=H, W=W, ws=ws, nh=nh, hd=hd, wrap=None):
            def make(mode):
                g = torch.Generator().manual_seed(0)
                qkv = torch.randn(B, H, W, 3 * nh * hd, generator=g).to(device=device, dtype=dt)
                table = torch.randn((2 * ws - 1) ** 2, nh, generator=g).to(device)
                if wrap is None:
                    return _runner(fn, qkv, table, mode)
                call, grads = _runner(lambda x, t: fn(x, t), qkv, table, mode)
                return wrap(call), grads
            return make

        eager = lambda x, t, kw=kw: window_attention_reference(x, t.to(x.dtype), **kw)  # noqa: E731
        provs = [Provider("eager (Swin)", dt, mk(eager, dt), baseline=True) for dt in dtypes]
        for dt in (dtypes[:1] if quick else dtypes):
            provs.append(Provider(_fused_name(device), dt,
                                  mk(lambda x, t, kw=kw: window_attention(x, t, **kw), dt)))
            provs.append(Provider("sdpa + float mask", dt,
                                  mk(lambda x, t, a=(ws, shift, nh): sdpa_masked(x, t, *a), dt)))
            if not smoke():     # the smoke run has no torch.compile providers
                provs.append(Provider("compiled eager", dt, mk(
                    lambda x, t, kw=kw: compiled(x, t.to(x.dtype), **kw), dt)))
                provs.append(Provider("flex (compiled)", dt,
                                      mk(_flex_make(ws, shift, nh, H, W, device), dt)))
            if device == "cpu":
                fn, wrap = _chunked(kw)
                provs.append(Provider("chunked PyTorch (old CPU path)", dt, mk(fn, dt, wrap=wrap)))
        out.append(Case(OP, f"B{B} {H}x{W} ws{ws} s{shift} h{nh} d{hd}",
                        flops(B, H, W, ws, nh, hd), min_bytes(B, H, W, nh, hd), provs))
    return out


if __name__ == "__main__":
    from varformer.cli import main
    sys.exit(main(["bench", "--op", OP] + sys.argv[1:]))
