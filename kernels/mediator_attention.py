"""Triton kernels for mediator attention (VarFormer's AFT).

Mediator attention is two chained, non-causal softmax attentions per (batch, head)::

    stage 1:  S   = softmax(M Kᵀ · s) V      M [L, d], K/V [Nk, d]  ->  S [L, d]
    stage 2:  out = softmax(Q Mᵀ · s) S      Q [N, d]               ->  out [N, d]

Both stages run through the same flash-style kernels below; no N×L or L×N map is ever written.

* ``_attn_fwd``: online-softmax forward over one range of keys. With ``num_splits > 1`` each
  program handles a slice of the keys and writes a normalised partial output plus its log-sum-exp
  (flash-decoding); ``_attn_combine`` merges the slices. Stage 1 splits when ``B·H·⌈L/BLOCK_M⌉``
  programs would not fill the GPU (a single image with one head).
* ``_attn_bwd_dkdv`` / ``_attn_bwd_dq``: FlashAttention-2 style backward, recomputing the
  probabilities from the saved log-sum-exp. When few programs exist along the parallel axis (the
  L mediators), the long loop is split and fp32 partials are summed (deterministic).
* Head dims up to 640: for d ≤ 128 a program keeps the whole (padded) head in one tile; above,
  reductions over d loop over 32-wide chunks and outputs are tiled in ``BLOCK_DV`` ≤ 256 columns
  (``⌈d/BLOCK_DV⌉`` programs, each recomputing the scores).

Log-sum-exps are stored in natural-log units as fp32, so every backend of the op produces and
consumes the same saved tensors. Launchers take ``[B, H, T, d]`` tensors with arbitrary strides.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._aot import entry
from ._common import chunked_dot, load_tile

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
              so_s, so_b, so_h, so_t, so_d, sl_s,
              H, M, N, D, n_per_split, num_dv, num_dk, scale_log2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
              SINGLE: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_D2: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    """O[m] = softmax_n(Q[m]·K[n]ᵀ·s) V[n] over keys [split·n_per_split, +n_per_split).

    Grid (⌈M/BLOCK_M⌉, B·H, splits·num_dv). LSE [splits, B·H, M] (natural log).
    SINGLE: the head is two column pieces [0, BLOCK_DV) + [BLOCK_DV, BLOCK_DV+BLOCK_D2) held in
    registers (BLOCK_D2 may be 0); else column tile ``dv`` of width BLOCK_DV, scores over d chunks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2) // num_dv
    dv = tl.program_id(2) % num_dv
    b = pid_bh // H
    h = pid_bh % H
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_c = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_c = offs_c < D
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)

    if SINGLE:
        q = load_tile(q_base, offs_m, mask_m, sq_t, sq_d, offs_c, mask_c, UPCAST)
    if BLOCK_D2 > 0:
        offs_c2 = BLOCK_DV + tl.arange(0, BLOCK_D2)
        mask_c2 = offs_c2 < D
        q2 = load_tile(q_base, offs_m, mask_m, sq_t, sq_d, offs_c2, mask_c2, UPCAST)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(n_start, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        if SINGLE:
            k = load_tile(k_base, offs_n, mask_n, sk_t, sk_d, offs_c, mask_c, UPCAST)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC)
            if BLOCK_D2 > 0:
                k2 = load_tile(k_base, offs_n, mask_n, sk_t, sk_d, offs_c2, mask_c2, UPCAST)
                qk += tl.dot(q2, tl.trans(k2), input_precision=PREC)
        else:
            qk = chunked_dot(q_base, offs_m, mask_m, sq_t, sq_d, k_base, offs_n, mask_n, sk_t, sk_d,
                             D, num_dk, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, UPCAST)
        qk = tl.where(mask_n[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_base, offs_n, mask_n, sv_t, sv_d, offs_c, mask_c, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if BLOCK_D2 > 0:
            v2 = load_tile(v_base, offs_n, mask_n, sv_t, sv_d, offs_c2, mask_c2, UPCAST)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=PREC)
        m_i = m_new

    o_base = O + split * so_s + b * so_b + h * so_h
    tl.store(o_base + offs_m[:, None] * so_t + offs_c[None, :] * so_d,
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
    if BLOCK_D2 > 0:
        tl.store(o_base + offs_m[:, None] * so_t + offs_c2[None, :] * so_d,
                 (acc2 / l_i[:, None]).to(O.dtype.element_ty),
                 mask=mask_m[:, None] & mask_c2[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + split * sl_s + pid_bh * M + offs_m, lse, mask=mask_m & (dv == 0))


@triton.jit
def _attn_combine(OP, LP, O, LSE, so_b, so_h, so_t, so_d, H, M, D, num_splits,
                  BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge split partials OP [S, B·H, M, D] fp32 / LP [S, B·H, M] into O and LSE [B·H, M].

    Grid (⌈M/BLOCK_M⌉, B·H, ⌈D/BLOCK_DV⌉)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    dv = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_c = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_c = offs_c < D
    BHM = tl.num_programs(1).to(tl.int64) * M
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        l_s = tl.load(LP + s * BHM + pid_bh * M + offs_m, mask=mask_m, other=0.0)
        lse_max = tl.maximum(lse_max, l_s)
    w_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for s in range(0, num_splits):
        l_s = tl.load(LP + s * BHM + pid_bh * M + offs_m, mask=mask_m, other=0.0)
        w = tl.exp(l_s - lse_max)
        o_s = tl.load(OP + s * BHM * D + (pid_bh * M + offs_m[:, None]) * D + offs_c[None, :],
                      mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        w_sum += w
        acc += w[:, None] * o_s
    acc = acc / w_sum[:, None]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_c[None, :] * so_d
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
    tl.store(LSE + pid_bh * M + offs_m, lse_max + tl.log(w_sum), mask=mask_m & (dv == 0))


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                   sdo_b, sdo_h, sdo_t, sdo_d, sg_s, sg_b, sg_h, sg_t, sg_d,
                   H, M, N, D, m_per_split, num_dv, num_dk, scale, scale_log2,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                   SINGLE: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_D2: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV for a block of keys, over queries [split·m_per_split, +m_per_split).

    Grid (⌈N/BLOCK_N⌉, B·H, splits·num_dv). DK/DV share strides (sg_*)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2) // num_dv
    dv = tl.program_id(2) % num_dv
    b = pid_bh // H
    h = pid_bh % H
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    do_base = DO + b * sdo_b + h * sdo_h

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_c = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_c = offs_c < D
    m_start = split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)

    if SINGLE:
        k = load_tile(k_base, offs_n, mask_n, sk_t, sk_d, offs_c, mask_c, UPCAST)
        v = load_tile(v_base, offs_n, mask_n, sv_t, sv_d, offs_c, mask_c, UPCAST)
    if BLOCK_D2 > 0:
        offs_c2 = BLOCK_DV + tl.arange(0, BLOCK_D2)
        mask_c2 = offs_c2 < D
        k2 = load_tile(k_base, offs_n, mask_n, sk_t, sk_d, offs_c2, mask_c2, UPCAST)
        v2 = load_tile(v_base, offs_n, mask_n, sv_t, sv_d, offs_c2, mask_c2, UPCAST)
        dk_acc2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)
        dv_acc2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)

    dk_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(m_start, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        q_c = load_tile(q_base, offs_m, mask_m, sq_t, sq_d, offs_c, mask_c, UPCAST)
        do_c = load_tile(do_base, offs_m, mask_m, sdo_t, sdo_d, offs_c, mask_c, UPCAST)
        if SINGLE:
            qk = tl.dot(q_c, tl.trans(k), input_precision=PREC)
            dp = tl.dot(do_c, tl.trans(v), input_precision=PREC)
            if BLOCK_D2 > 0:
                q2 = load_tile(q_base, offs_m, mask_m, sq_t, sq_d, offs_c2, mask_c2, UPCAST)
                do2 = load_tile(do_base, offs_m, mask_m, sdo_t, sdo_d, offs_c2, mask_c2, UPCAST)
                qk += tl.dot(q2, tl.trans(k2), input_precision=PREC)
                dp += tl.dot(do2, tl.trans(v2), input_precision=PREC)
        else:
            qk = chunked_dot(q_base, offs_m, mask_m, sq_t, sq_d, k_base, offs_n, mask_n, sk_t, sk_d,
                             D, num_dk, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, UPCAST)
            dp = chunked_dot(do_base, offs_m, mask_m, sdo_t, sdo_d, v_base, offs_n, mask_n, sv_t,
                             sv_d, D, num_dk, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, UPCAST)
        lse = tl.load(LSE + pid_bh * M + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + pid_bh * M + offs_m, mask=mask_m, other=0.0)
        p = tl.exp2(qk * scale_log2 - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        pt = tl.trans(p).to(do_c.dtype)
        dst = tl.trans(ds).to(q_c.dtype)
        dv_acc += tl.dot(pt, do_c, input_precision=PREC)
        dk_acc += tl.dot(dst, q_c, input_precision=PREC)
        if BLOCK_D2 > 0:
            dv_acc2 += tl.dot(pt, do2, input_precision=PREC)
            dk_acc2 += tl.dot(dst, q2, input_precision=PREC)

    g_base = split * sg_s + b * sg_b + h * sg_h + offs_n[:, None] * sg_t
    g_off = g_base + offs_c[None, :] * sg_d
    g_mask = mask_n[:, None] & mask_c[None, :]
    tl.store(DK + g_off, (dk_acc * scale).to(DK.dtype.element_ty), mask=g_mask)
    tl.store(DV + g_off, dv_acc.to(DV.dtype.element_ty), mask=g_mask)
    if BLOCK_D2 > 0:
        g_off2 = g_base + offs_c2[None, :] * sg_d
        g_mask2 = mask_n[:, None] & mask_c2[None, :]
        tl.store(DK + g_off2, (dk_acc2 * scale).to(DK.dtype.element_ty), mask=g_mask2)
        tl.store(DV + g_off2, dv_acc2.to(DV.dtype.element_ty), mask=g_mask2)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                 sdo_b, sdo_h, sdo_t, sdo_d, sg_s, sg_b, sg_h, sg_t, sg_d,
                 H, M, N, D, n_per_split, num_dv, num_dk, scale, scale_log2,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                 SINGLE: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_D2: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ for a block of queries, over keys [split·n_per_split, +n_per_split).

    Grid (⌈M/BLOCK_M⌉, B·H, splits·num_dv)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2) // num_dv
    dv = tl.program_id(2) % num_dv
    b = pid_bh // H
    h = pid_bh % H
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    do_base = DO + b * sdo_b + h * sdo_h

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_c = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_c = offs_c < D
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)

    if SINGLE:
        q = load_tile(q_base, offs_m, mask_m, sq_t, sq_d, offs_c, mask_c, UPCAST)
        do = load_tile(do_base, offs_m, mask_m, sdo_t, sdo_d, offs_c, mask_c, UPCAST)
    if BLOCK_D2 > 0:
        offs_c2 = BLOCK_DV + tl.arange(0, BLOCK_D2)
        mask_c2 = offs_c2 < D
        q2 = load_tile(q_base, offs_m, mask_m, sq_t, sq_d, offs_c2, mask_c2, UPCAST)
        do2 = load_tile(do_base, offs_m, mask_m, sdo_t, sdo_d, offs_c2, mask_c2, UPCAST)
        dq_acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    lse = tl.load(LSE + pid_bh * M + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * M + offs_m, mask=mask_m, other=0.0)

    dq_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(n_start, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        k_c = load_tile(k_base, offs_n, mask_n, sk_t, sk_d, offs_c, mask_c, UPCAST)
        if SINGLE:
            v = load_tile(v_base, offs_n, mask_n, sv_t, sv_d, offs_c, mask_c, UPCAST)
            qk = tl.dot(q, tl.trans(k_c), input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if BLOCK_D2 > 0:
                k2 = load_tile(k_base, offs_n, mask_n, sk_t, sk_d, offs_c2, mask_c2, UPCAST)
                v2 = load_tile(v_base, offs_n, mask_n, sv_t, sv_d, offs_c2, mask_c2, UPCAST)
                qk += tl.dot(q2, tl.trans(k2), input_precision=PREC)
                dp += tl.dot(do2, tl.trans(v2), input_precision=PREC)
        else:
            qk = chunked_dot(q_base, offs_m, mask_m, sq_t, sq_d, k_base, offs_n, mask_n, sk_t, sk_d,
                             D, num_dk, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, UPCAST)
            dp = chunked_dot(do_base, offs_m, mask_m, sdo_t, sdo_d, v_base, offs_n, mask_n, sv_t,
                             sv_d, D, num_dk, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, UPCAST)
        p = tl.exp2(qk * scale_log2 - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k_c.dtype)
        dq_acc += tl.dot(ds, k_c, input_precision=PREC)
        if BLOCK_D2 > 0:
            dq_acc2 += tl.dot(ds, k2, input_precision=PREC)

    g_base = DQ + split * sg_s + b * sg_b + h * sg_h + offs_m[:, None] * sg_t
    tl.store(g_base + offs_c[None, :] * sg_d, (dq_acc * scale).to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_c[None, :])
    if BLOCK_D2 > 0:
        tl.store(g_base + offs_c2[None, :] * sg_d, (dq_acc2 * scale).to(DQ.dtype.element_ty),
                 mask=mask_m[:, None] & mask_c2[None, :])


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """Column tiling of one head dim (see the module docstring)."""
    BLOCK_DK: int   # chunk of the d-reduction (multi-chunk mode)
    num_dk: int     # chunks per reduction; 1 = the head is held in registers (single mode)
    BLOCK_DV: int   # single mode: first column piece; multi mode: output columns per program
    num_dv: int     # programs along d
    BLOCK_D2: int = 0  # single mode: second column piece (0: none)

    @property
    def single(self) -> bool:
        return self.num_dk == 1

    @property
    def width(self) -> int:
        """Register columns per row: the key of the launch-config tables."""
        return self.BLOCK_DV + self.BLOCK_D2 if self.single else 512


def tiles_for(d: int, f32: bool = False) -> Tiles:
    """d ≤ 256 (≤ 128 for fp32): the head in registers, padded to a power of two, except
    129 ≤ d ≤ 160 in fp16/bf16, held as two pieces 128 + 32 (VarFormer's d = 160 pads to 160, not
    256); above: 32-wide reduction chunks and 256-column output tiles.

    Two-piece heads with a 16-wide second piece (40 = 32 + 16, 80 = 64 + 16) compiled and passed
    the interpreter but hit an illegal memory access on an H100 (triton 3.6, 128×64 tiles); they
    are not used until that is understood."""
    if d <= (128 if f32 else 256):
        if not f32 and 128 < d <= 160:
            return Tiles(128, 1, 128, 1, 32)
        full = max(16, triton.next_power_of_2(d))
        return Tiles(full, 1, full, 1)
    return Tiles(32, triton.cdiv(d, 32), 256, triton.cdiv(d, 256))


def all_tiles(f32: bool = False) -> list:
    """Every distinct Tiles that tiles_for can return (d = 1 … MAX_HEAD_DIM)."""
    seen = {}
    for d in range(1, MAX_HEAD_DIM + 1):  # distinct as far as the kernels' constexprs go
        t = tiles_for(d, f32)
        seen.setdefault((t.BLOCK_DK, t.single, t.BLOCK_DV, t.BLOCK_D2), t)
    return sorted(seen.values(), key=lambda t: (t.width, t.BLOCK_DV))


# (BLOCK_M, BLOCK_N, num_warps) per kernel family, keyed by (fp32?, Tiles.width); chosen so
# that ptxas reports no register spills on sm_90a (fp32 without TF32 runs its dots on the FMA
# units and needs smaller tiles). The ahead-of-time compile check (tests/ops/test_gpu_compile.py,
# `varformer bench --compile-report`) builds every variant.
def _cfg(table: dict, f32: bool, width: int):
    for w in sorted(table[f32]):
        if width <= w:
            return table[f32][w]
    raise KeyError(width)


FWD_CFG = {False: {16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8), 128: (64, 32, 8),
                   160: (64, 32, 8), 256: (16, 32, 8), 512: (64, 32, 8)},
           True: {16: (64, 32, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (32, 16, 8),
                  512: (32, 16, 8)}}
DKDV_CFG = {False: {16: (128, 64, 8), 32: (128, 64, 8), 64: (64, 64, 8), 128: (32, 64, 8),
                    160: (32, 64, 8), 256: (16, 32, 8), 512: (16, 32, 8)},
            True: {16: (64, 32, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (32, 32, 8),
                   512: (16, 16, 8)}}
DQ_CFG = {False: {16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8), 128: (32, 64, 8),
                  160: (64, 32, 8), 256: (16, 32, 8), 512: (64, 32, 8)},
          True: {16: (64, 32, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (64, 32, 8),
                 512: (16, 16, 8)}}
COMBINE_CFG = (32, 64, 4)  # BLOCK_M, BLOCK_DV, num_warps
MAX_HEAD_DIM = 640


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 4  # the interpreter runs programs one by one; a small fan-out keeps tests quick
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, blocks: int, device: torch.device, forced: int | None) -> int:
    """How many programs share the long loop (``blocks`` tiles) so that the GPU fills up."""
    if forced is not None:
        return max(1, min(forced, blocks))
    sms = _num_sms(device.index or 0 if device.type == "cuda" else 0)
    if programs >= sms or blocks < 8:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), blocks // 4, 128))


def _split_range(blocks: int, block: int, length: int, splits: int):
    per = triton.cdiv(blocks, splits) * block
    return per, triton.cdiv(length, per)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _s(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _consts(t: Tiles, bm: int, bn: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DK=t.BLOCK_DK, SINGLE=t.single, BLOCK_DV=t.BLOCK_DV,
                BLOCK_D2=t.BLOCK_D2, PREC=_precision(dtype), UPCAST=_upcast(dtype))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def attention_forward(q, k, v, scale: float, num_splits: int | None = None):
    """Flash forward. q [B,H,M,d], k/v [B,H,N,d] -> (out [B,H,M,d] q.dtype, lse [B,H,M] fp32)."""
    B, H, M, D = q.shape
    N = k.shape[2]
    t = tiles_for(D, q.dtype == torch.float32)
    bm, bn, warps = _cfg(FWD_CFG, q.dtype == torch.float32, t.width)
    m_blocks, n_blocks = triton.cdiv(M, bm), triton.cdiv(N, bn)
    splits = _num_splits(m_blocks * B * H * t.num_dv, n_blocks, q.device, num_splits)
    n_per_split, splits = _split_range(n_blocks, bn, N, splits)
    out = torch.empty((B, H, M, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, M), device=q.device, dtype=torch.float32)
    if splits == 1:
        o_buf, l_buf, so_s, sl_s = out, lse, 0, 0
    else:
        o_buf = torch.empty((splits, B, H, M, D), device=q.device, dtype=torch.float32)
        l_buf = torch.empty((splits, B, H, M), device=q.device, dtype=torch.float32)
        so_s, sl_s = o_buf.stride(0), l_buf.stride(0)
    so = _s(out) if splits == 1 else _s(o_buf[0])
    _attn_fwd[(m_blocks, B * H, splits * t.num_dv)](
        q, k, v, o_buf, l_buf, *_s(q), *_s(k), *_s(v), so_s, *so, sl_s,
        H, M, N, D, n_per_split, t.num_dv, t.num_dk, scale * LOG2E,
        **_consts(t, bm, bn, q.dtype), num_warps=warps)
    if splits > 1:
        cbm, cbd, cwarps = COMBINE_CFG
        _attn_combine[(triton.cdiv(M, cbm), B * H, triton.cdiv(D, cbd))](
            o_buf, l_buf, out, lse, *_s(out), H, M, D, splits,
            BLOCK_M=cbm, BLOCK_DV=cbd, num_warps=cwarps)
    return out, lse


def attention_backward(do, q, k, v, out, lse, scale: float, num_splits: int | None = None):
    """Backward of ``attention_forward`` -> (dq, dk, dv) in q.dtype (fp32 accumulation)."""
    B, H, M, D = q.shape
    N = k.shape[2]
    t = tiles_for(D, q.dtype == torch.float32)
    delta = (do.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()

    # dK, dV: parallel over key blocks, loop over queries (split when key blocks are few)
    bm, bn, warps = _cfg(DKDV_CFG, q.dtype == torch.float32, t.width)
    n_blocks, m_blocks = triton.cdiv(N, bn), triton.cdiv(M, bm)
    splits = _num_splits(n_blocks * B * H * t.num_dv, m_blocks, q.device, num_splits)
    m_per_split, splits = _split_range(m_blocks, bm, M, splits)
    g_dtype = q.dtype if splits == 1 else torch.float32
    dk = torch.empty((splits, B, H, N, D), device=q.device, dtype=g_dtype)
    dv = torch.empty_like(dk)
    _attn_bwd_dkdv[(n_blocks, B * H, splits * t.num_dv)](
        q, k, v, do, lse, delta, dk, dv, *_s(q), *_s(k), *_s(v), *_s(do),
        dk.stride(0), *_s(dk[0]), H, M, N, D, m_per_split, t.num_dv, t.num_dk, scale,
        scale * LOG2E, **_consts(t, bm, bn, q.dtype), num_warps=warps)
    dk = dk[0] if splits == 1 else dk.sum(0).to(q.dtype)
    dv = dv[0] if splits == 1 else dv.sum(0).to(q.dtype)

    # dQ: parallel over query blocks, loop over keys
    bm, bn, warps = _cfg(DQ_CFG, q.dtype == torch.float32, t.width)
    m_blocks, n_blocks = triton.cdiv(M, bm), triton.cdiv(N, bn)
    splits = _num_splits(m_blocks * B * H * t.num_dv, n_blocks, q.device, num_splits)
    n_per_split, splits = _split_range(n_blocks, bn, N, splits)
    g_dtype = q.dtype if splits == 1 else torch.float32
    dq = torch.empty((splits, B, H, M, D), device=q.device, dtype=g_dtype)
    _attn_bwd_dq[(m_blocks, B * H, splits * t.num_dv)](
        q, k, v, do, lse, delta, dq, *_s(q), *_s(k), *_s(v), *_s(do),
        dq.stride(0), *_s(dq[0]), H, M, N, D, n_per_split, t.num_dv, t.num_dk, scale,
        scale * LOG2E, **_consts(t, bm, bn, q.dtype), num_warps=warps)
    dq = dq[0] if splits == 1 else dq.sum(0).to(q.dtype)
    return dq, dk, dv


def mediator_attention_forward(q, m, k, v, scale: float, num_splits: int | None = None):
    """-> (out [B,H,N,d], summary S [B,H,L,d], lse_summary [B,H,L], lse_out [B,H,N])."""
    s, lse_s = attention_forward(m, k, v, scale, num_splits)   # stage 1: L mediators over Nk keys
    out, lse_o = attention_forward(q, m, s, scale, num_splits)  # stage 2: N queries over L
    return out, s, lse_s, lse_o


def mediator_attention_backward(grad_out, grad_s, q, m, k, v, out, s, lse_s, lse_o, scale: float,
                                num_splits: int | None = None):
    """-> (dq, dm, dk, dv). ``grad_s``, a gradient reaching the summary directly, may be None."""
    dq, dm_2, ds = attention_backward(grad_out, q, m, s, out, lse_o, scale, num_splits)
    if grad_s is not None:
        ds = ds + grad_s
    dm_1, dk, dv = attention_backward(ds, m, k, v, s, lse_s, scale, num_splits)
    return dq, (dm_1.float() + dm_2.float()).to(q.dtype), dk, dv


# --------------------------------------------------------------------------------------------
# ahead-of-time compile inventory (tests and `varformer bench --compile-report`)
# --------------------------------------------------------------------------------------------
def compile_inventory(dtypes=("fp32", "fp16", "bf16"), tf32: bool = True):
    """Every launch variant the launchers above can produce on a GPU, as dicts:
    name, fn, signature, constexprs, num_warps, label."""
    out = []
    variants = [(dt, "ieee" if dt == "fp32" else "tf32") for dt in dtypes]
    if "fp32" in dtypes and tf32:  # fp32 with torch.backends.cuda.matmul.allow_tf32 = True
        variants.append(("fp32", "tf32"))
    for dt, prec in variants:
        f32 = dt == "fp32"
        tag0 = f"{dt}{'/tf32' if f32 and prec == 'tf32' else ''}"
        if prec == "ieee" or not f32:
            cbm, cbd, cw = COMBINE_CFG
            out.append(entry("mediator_combine", _attn_combine,
                              dict(OP="*fp32", LP="*fp32", O=f"*{dt}", LSE="*fp32"), [],
                              dict(BLOCK_M=cbm, BLOCK_DV=cbd), cw, tag0))
        for t in all_tiles(f32):
            common = dict(BLOCK_DK=t.BLOCK_DK, SINGLE=t.single, BLOCK_DV=t.BLOCK_DV,
                          BLOCK_D2=t.BLOCK_D2, PREC=prec, UPCAST=False)
            cols = f"d={t.BLOCK_DV}+{t.BLOCK_D2}" if t.single else f"d>256 tile {t.BLOCK_DV}"
            tag = f"{tag0} {cols}"
            bm, bn, w = _cfg(FWD_CFG, f32, t.width)
            for o_dt in sorted({dt, "fp32"}):
                ptrs = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", O=f"*{o_dt}", LSE="*fp32")
                out.append(entry("mediator_fwd", _attn_fwd, ptrs, ["scale_log2"],
                                  dict(BLOCK_M=bm, BLOCK_N=bn, **common), w, f"{tag} out={o_dt}"))
            for name, fn, cfg, gnames in (("mediator_bwd_dkdv", _attn_bwd_dkdv, DKDV_CFG, "DK DV"),
                                          ("mediator_bwd_dq", _attn_bwd_dq, DQ_CFG, "DQ")):
                bm, bn, w = _cfg(cfg, f32, t.width)
                for g_dt in sorted({dt, "fp32"}):
                    ptrs = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", DO=f"*{dt}", LSE="*fp32",
                                DELTA="*fp32", **{g: f"*{g_dt}" for g in gnames.split()})
                    out.append(entry(name, fn, ptrs, ["scale", "scale_log2"],
                                      dict(BLOCK_M=bm, BLOCK_N=bn, **common), w,
                                      f"{tag} grad={g_dt}"))
    return out

