"""Triton kernels for shifted-window (Swin) attention in image layout.

Per image b, head h and window (ws × ws tokens, N = ws²) of the image cyclically shifted by
``-shift``::

    out = softmax(q kᵀ · scale + table[rel_index] + region_mask) v

qkv [B, H, W, 3C] (q, k, v; heads × head_dim within each) -> out [B, H, W, C]. Roll, partition
and reverse are address arithmetic: the token at row p of window w sits at shifted coordinate
(hs, ws_) and is read from and written to original pixel ((hs + shift) % H, (ws_ + shift) % W).
Region ids for the shift mask (−100 between tokens of different regions, as in Swin) come from
the shifted coordinates; no mask tensor exists.

Tiling: windows are padded to NP = next_pow2(N) rows and packed WPP per group so a group has
R = WPP·NP ≥ 64 rows (4×4 windows: 4 per group; 7×7, 8×8: one window of 64; 16×16: one window
of 256 split in 64-row blocks). Scores of different windows in a group are masked out. Head dims
are processed in BLOCK_D-wide chunks (reductions loop over chunks; each program writes one output
chunk), so any head dim works.

Backward: ``_win_bwd_dq`` (dq and the per-group partial gradient of the bias table) and
``_win_bwd_dkdv``, both recomputing probabilities from the saved log-sum-exp. The table gradient
is reduced without atomics (partials summed in a fixed order), so it is deterministic.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._aot import entry
from ._common import chunked_dot, load_tile

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tokens(group, offs, H, W, nww, n_win, ws, shift, NP: tl.constexpr, WPP: tl.constexpr):
    """Row ``offs`` of window group ``group`` -> (pixel offset h·W + w, local window, position in
    window, shifted row, shifted column, valid)."""
    wl = offs // NP
    p = offs % NP
    wi = group * WPP + wl
    valid = (p < ws * ws) & (wi < n_win)
    py = p // ws
    px = p % ws
    hs = (wi // nww) * ws + py
    wsx = (wi % nww) * ws + px
    h = hs + shift
    h = tl.where(h >= H, h - H, h)
    w = wsx + shift
    w = tl.where(w >= W, w - W, w)
    return h * W + w, wl, py, px, hs, wsx, valid


@triton.jit
def _bias_mask(table, head, n_heads, wl_i, py_i, px_i, hs_i, ws_i, ok_i, wl_j, py_j, px_j, hs_j,
               ws_j, ok_j, H, W, ws, shift, SHIFTED: tl.constexpr):
    """[rows, cols] additive term: relative position bias + region mask, -inf across windows."""
    idx = ((py_i[:, None] - py_j[None, :] + ws - 1) * (2 * ws - 1)
           + (px_i[:, None] - px_j[None, :] + ws - 1))
    same = (wl_i[:, None] == wl_j[None, :]) & ok_i[:, None] & ok_j[None, :]
    bias = tl.load(table + idx * n_heads + head, mask=same, other=0.0).to(tl.float32)
    if SHIFTED:
        rh_i = (hs_i >= H - ws).to(tl.int32) + (hs_i >= H - shift).to(tl.int32)
        rw_i = (ws_i >= W - ws).to(tl.int32) + (ws_i >= W - shift).to(tl.int32)
        rh_j = (hs_j >= H - ws).to(tl.int32) + (hs_j >= H - shift).to(tl.int32)
        rw_j = (ws_j >= W - ws).to(tl.int32) + (ws_j >= W - shift).to(tl.int32)
        diff = (rh_i * 3 + rw_i)[:, None] != (rh_j * 3 + rw_j)[None, :]
        bias = tl.where(diff, bias - 100.0, bias)
    # a padded row keeps one finite entry (itself) so that no softmax row is empty
    keep = same | ((wl_i[:, None] == wl_j[None, :]) & (py_i[:, None] * ws + px_i[:, None]
                                                       == py_j[None, :] * ws + px_j[None, :]))
    return tl.where(keep, bias, float("-inf"))


@triton.jit
def _scores(qkv, TABLE, C, head, n_heads, hd, num_dk, scale_log2, H, W, ws, shift,
            pix_q, wl_q, py_q, px_q, hs_q, wx_q, ok_q, pix_k, wl_k, py_k, px_k, hs_k, wx_k, ok_k,
            BQ: tl.constexpr, BK: tl.constexpr, BLOCK_D: tl.constexpr, SHIFTED: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scores of a query block against a key block in log2 units: (q·kᵀ·scale + bias + mask)·log2e,
    −inf between different windows."""
    s = chunked_dot(qkv + head * hd, pix_q, ok_q, 3 * C, 1, qkv + C + head * hd, pix_k, ok_k,
                    3 * C, 1, hd, num_dk, BQ, BK, BLOCK_D, PREC, UPCAST)
    return s * scale_log2 + 1.4426950408889634 * _bias_mask(
        TABLE, head, n_heads, wl_q, py_q, px_q, hs_q, wx_q, ok_q, wl_k, py_k, px_k, hs_k, wx_k,
        ok_k, H, W, ws, shift, SHIFTED)


@triton.jit
def _program(n_blocks: tl.constexpr, n_heads):
    """Grid (groups·blocks, B·heads, d-chunks) -> (group, block, b·heads, b, head, d-chunk)."""
    bh = tl.program_id(1).to(tl.int64)
    return (tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks, bh, bh // n_heads,
            (bh % n_heads).to(tl.int32), tl.program_id(2))


@triton.jit
def _win_fwd(QKV, TABLE, OUT, LSE, H, W, C, n_heads, hd, ws, shift, nww, n_win, n_groups,
             num_dk, scale_log2,
             NP: tl.constexpr, WPP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
             BLOCK_D: tl.constexpr, SHIFTED: tl.constexpr, PREC: tl.constexpr,
             UPCAST: tl.constexpr):
    """Grid (groups·q-blocks, B·heads, d-chunks). LSE [B, heads, H·W] (natural log)."""
    R: tl.constexpr = WPP * NP
    group, qb, bh, b, head, dc = _program(R // BQ, n_heads)
    HW = H * W
    qkv = QKV + b * HW * 3 * C
    out = OUT + b * HW * C

    offs_q = qb * BQ + tl.arange(0, BQ)
    pix_q, wl_q, py_q, px_q, hs_q, wx_q, ok_q = _tokens(group, offs_q, H, W, nww, n_win, ws, shift,
                                                        NP, WPP)
    offs_c = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    m_i = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    acc = tl.zeros([BQ, BLOCK_D], dtype=tl.float32)
    for kb in range(0, R // BK):
        offs_k = kb * BK + tl.arange(0, BK)
        pix_k, wl_k, py_k, px_k, hs_k, wx_k, ok_k = _tokens(group, offs_k, H, W, nww, n_win, ws,
                                                            shift, NP, WPP)
        s = _scores(qkv, TABLE, C, head, n_heads, hd, num_dk, scale_log2, H, W, ws, shift,
                    pix_q, wl_q, py_q, px_q, hs_q, wx_q, ok_q, pix_k, wl_k, py_k, px_k, hs_k, wx_k,
                    ok_k, BQ, BK, BLOCK_D, SHIFTED, PREC, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: no key yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(qkv + 2 * C + head * hd, pix_k, ok_k, 3 * C, 1, offs_c, offs_c < hd, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(out + pix_q[:, None] * C + (head * hd + offs_c)[None, :], acc.to(OUT.dtype.element_ty),
             mask=ok_q[:, None] & (offs_c < hd)[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh * HW + pix_q, lse, mask=ok_q & (dc == 0))


@triton.jit
def _win_bwd_dq(QKV, TABLE, DOUT, LSE, DELTA, DQKV, DBIAS, H, W, C, n_heads, hd, ws, shift, nww,
                n_win, n_groups, num_dk, scale, scale_log2,
                NP: tl.constexpr, WPP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                BLOCK_D: tl.constexpr, SHIFTED: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    """dq chunk for a query block; chunk-0 programs also write the block's bias-gradient partial
    DBIAS [B·heads·groups, NP, NP] (summed over the group's windows)."""
    R: tl.constexpr = WPP * NP
    group, qb, bh, b, head, dc = _program(R // BQ, n_heads)
    HW = H * W
    qkv = QKV + b * HW * 3 * C
    dout = DOUT + b * HW * C
    dqkv = DQKV + b * HW * 3 * C

    offs_q = qb * BQ + tl.arange(0, BQ)
    pix_q, wl_q, py_q, px_q, hs_q, wx_q, ok_q = _tokens(group, offs_q, H, W, nww, n_win, ws, shift,
                                                        NP, WPP)
    lse = tl.load(LSE + bh * HW + pix_q, mask=ok_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * HW + pix_q, mask=ok_q, other=0.0)
    offs_c = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    dq = tl.zeros([BQ, BLOCK_D], dtype=tl.float32)
    for kb in range(0, R // BK):
        offs_k = kb * BK + tl.arange(0, BK)
        pix_k, wl_k, py_k, px_k, hs_k, wx_k, ok_k = _tokens(group, offs_k, H, W, nww, n_win, ws,
                                                            shift, NP, WPP)
        s = _scores(qkv, TABLE, C, head, n_heads, hd, num_dk, scale_log2, H, W, ws, shift,
                    pix_q, wl_q, py_q, px_q, hs_q, wx_q, ok_q, pix_k, wl_k, py_k, px_k, hs_k, wx_k,
                    ok_k, BQ, BK, BLOCK_D, SHIFTED, PREC, UPCAST)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(ok_q[:, None] & ok_k[None, :], p, 0.0)
        dp = chunked_dot(dout + head * hd, pix_q, ok_q, C, 1, qkv + 2 * C + head * hd, pix_k, ok_k,
                         3 * C, 1, hd, num_dk, BQ, BK, BLOCK_D, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        k = load_tile(qkv + C + head * hd, pix_k, ok_k, 3 * C, 1, offs_c, offs_c < hd, UPCAST)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if dc == 0:
            part = DBIAS + ((bh * n_groups + group) * NP) * NP
            if WPP == 1:
                pi = offs_q % NP
                pj = offs_k % NP
                tl.store(part + pi[:, None] * NP + pj[None, :], ds)
            else:
                same = wl_q[:, None] == wl_k[None, :]
                blk = tl.reshape(tl.where(same, ds, 0.0), [WPP, NP, WPP, NP])
                red = tl.sum(tl.sum(blk, axis=2), axis=0)
                r = tl.arange(0, NP)
                tl.store(part + r[:, None] * NP + r[None, :], red)
    tl.store(dqkv + pix_q[:, None] * 3 * C + (head * hd + offs_c)[None, :],
             (dq * scale).to(DQKV.dtype.element_ty), mask=ok_q[:, None] & (offs_c < hd)[None, :])


@triton.jit
def _win_bwd_dkdv(QKV, TABLE, DOUT, LSE, DELTA, DQKV, H, W, C, n_heads, hd, ws, shift, nww,
                  n_win, n_groups, num_dk, scale, scale_log2,
                  NP: tl.constexpr, WPP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                  BLOCK_D: tl.constexpr, SHIFTED: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr):
    """dk and dv chunks for a key block, over the group's query blocks."""
    R: tl.constexpr = WPP * NP
    group, kb, bh, b, head, dc = _program(R // BK, n_heads)
    HW = H * W
    qkv = QKV + b * HW * 3 * C
    dout = DOUT + b * HW * C
    dqkv = DQKV + b * HW * 3 * C

    offs_k = kb * BK + tl.arange(0, BK)
    pix_k, wl_k, py_k, px_k, hs_k, wx_k, ok_k = _tokens(group, offs_k, H, W, nww, n_win, ws, shift,
                                                        NP, WPP)
    offs_c = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    dk = tl.zeros([BK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BK, BLOCK_D], dtype=tl.float32)
    for qb in range(0, R // BQ):
        offs_q = qb * BQ + tl.arange(0, BQ)
        pix_q, wl_q, py_q, px_q, hs_q, wx_q, ok_q = _tokens(group, offs_q, H, W, nww, n_win, ws,
                                                            shift, NP, WPP)
        lse = tl.load(LSE + bh * HW + pix_q, mask=ok_q, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * HW + pix_q, mask=ok_q, other=0.0)
        s = _scores(qkv, TABLE, C, head, n_heads, hd, num_dk, scale_log2, H, W, ws, shift,
                    pix_q, wl_q, py_q, px_q, hs_q, wx_q, ok_q, pix_k, wl_k, py_k, px_k, hs_k, wx_k,
                    ok_k, BQ, BK, BLOCK_D, SHIFTED, PREC, UPCAST)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(ok_q[:, None] & ok_k[None, :], p, 0.0)
        do = load_tile(dout + head * hd, pix_q, ok_q, C, 1, offs_c, offs_c < hd, UPCAST)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
        dp = chunked_dot(dout + head * hd, pix_q, ok_q, C, 1, qkv + 2 * C + head * hd, pix_k, ok_k,
                         3 * C, 1, hd, num_dk, BQ, BK, BLOCK_D, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        q = load_tile(qkv + head * hd, pix_q, ok_q, 3 * C, 1, offs_c, offs_c < hd, UPCAST)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    m = ok_k[:, None] & (offs_c < hd)[None, :]
    base = dqkv + pix_k[:, None] * 3 * C + (head * hd + offs_c)[None, :]
    tl.store(base + C, (dk * scale).to(DQKV.dtype.element_ty), mask=m)
    tl.store(base + 2 * C, dv.to(DQKV.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# launch configuration and launchers
# --------------------------------------------------------------------------------------------
WINDOW_SIZES = (4, 7, 8, 16)    # what the compile check covers; any ws with ws² ≤ 256 runs
BLOCK_DS = (16, 32, 64)         # head-dim chunks: next_pow2(max(hd, 16)) capped by tiling()


def tiling(ws: int, hd: int, f32: bool = False) -> dict:
    """NP, WPP, BQ, BK, BLOCK_D, num_dk and warps for a window size, head dim and dtype class.

    Chosen so that ptxas reports no spills on sm_90a (searched offline): fp16/bf16 use 64-row
    tiles, 64-wide head chunks, 8 warps; fp32 (FMA dots without TF32) 32- or 16-row tiles with
    16-wide head chunks; windows larger than a tile are split in half-tile
    blocks."""
    n = ws * ws
    NP = max(16, triton.next_power_of_2(n))
    rows = 32 if f32 else 64
    WPP = max(1, rows // NP)
    blk = min(WPP * NP, rows if NP <= rows else rows // 2)
    d_cap = 64 if not f32 else 16
    BLOCK_D = min(d_cap, max(16, triton.next_power_of_2(hd)))
    warps = 8 if (not f32 or blk >= 32) else 4
    # the bias-gradient reduction over packed windows assumes one block per group when WPP > 1
    assert WPP == 1 or blk == WPP * NP
    return dict(NP=NP, WPP=WPP, BQ=blk, BK=blk, BLOCK_D=BLOCK_D, num_dk=triton.cdiv(hd, BLOCK_D),
                num_warps=warps)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _geometry(qkv, ws, n_heads):
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    return B, H, W, C, C // n_heads, (H // ws) * (W // ws), W // ws


def window_forward(qkv, table, ws: int, shift: int, n_heads: int, scale: float):
    """qkv [B, H, W, 3C] contiguous, table [(2ws-1)², heads] -> (out [B, H, W, C],
    lse [B, heads, H·W] fp32)."""
    B, H, W, C, hd, n_win, nww = _geometry(qkv, ws, n_heads)
    t = tiling(ws, hd, qkv.dtype == torch.float32)
    n_groups = triton.cdiv(n_win, t["WPP"])
    out = torch.empty((B, H, W, C), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, n_heads, H * W), device=qkv.device, dtype=torch.float32)
    grid = (n_groups * (t["WPP"] * t["NP"] // t["BQ"]), B * n_heads, t["num_dk"])
    _win_fwd[grid](qkv, table, out, lse, H, W, C, n_heads, hd, ws, shift, nww, n_win, n_groups,
                   t["num_dk"], scale * LOG2E, NP=t["NP"], WPP=t["WPP"], BQ=t["BQ"], BK=t["BK"],
                   BLOCK_D=t["BLOCK_D"], SHIFTED=shift > 0, PREC=_precision(qkv.dtype),
                   UPCAST=INTERPRET and qkv.dtype == torch.bfloat16, num_warps=t["num_warps"])
    return out, lse


@functools.lru_cache(maxsize=None)
def _segments(ws: int, device: str):
    """Sorted order of the relative-position index of a ws×ws window and segment ends per entry
    of the (2ws-1)² table: a deterministic scatter-add without atomics."""
    r = torch.arange(ws, device="cpu")
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    idx = ((y[:, None] - y[None, :] + ws - 1) * (2 * ws - 1) + (x[:, None] - x[None, :] + ws - 1))
    idx = idx.flatten()
    order = torch.argsort(idx, stable=True)
    ends = torch.bincount(idx, minlength=(2 * ws - 1) ** 2).cumsum(0) - 1
    return order.to(device), ends.to(device)


def table_grad(dscore: torch.Tensor, ws: int) -> torch.Tensor:
    """dscore [heads, N, N] (summed over windows and batch) -> d table [(2ws-1)², heads]."""
    order, ends = _segments(ws, str(dscore.device))
    n_heads = dscore.shape[0]
    c = dscore.reshape(n_heads, -1)[:, order].double().cumsum(1)[:, ends]
    return torch.cat([c[:, :1], c[:, 1:] - c[:, :-1]], dim=1).t().float()


def window_backward(dout, qkv, table, out, lse, ws: int, shift: int, n_heads: int, scale: float):
    """-> (dqkv [B, H, W, 3C] in qkv.dtype, dtable [(2ws-1)², heads] fp32)."""
    B, H, W, C, hd, n_win, nww = _geometry(qkv, ws, n_heads)
    t = tiling(ws, hd, qkv.dtype == torch.float32)
    n_groups = triton.cdiv(n_win, t["WPP"])
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).view(B, H, W, n_heads, hd).sum(-1)
    delta = delta.permute(0, 3, 1, 2).reshape(B, n_heads, H * W).contiguous()
    dqkv = torch.empty_like(qkv)
    part = torch.empty((B * n_heads * n_groups, t["NP"], t["NP"]), device=qkv.device,
                       dtype=torch.float32)
    R = t["WPP"] * t["NP"]
    common = dict(NP=t["NP"], WPP=t["WPP"], BQ=t["BQ"], BK=t["BK"], BLOCK_D=t["BLOCK_D"],
                  SHIFTED=shift > 0, PREC=_precision(qkv.dtype),
                  UPCAST=INTERPRET and qkv.dtype == torch.bfloat16, num_warps=t["num_warps"])
    args = (H, W, C, n_heads, hd, ws, shift, nww, n_win, n_groups, t["num_dk"], scale,
            scale * LOG2E)
    _win_bwd_dq[(n_groups * (R // t["BQ"]), B * n_heads, t["num_dk"])](
        qkv, table, dout, lse, delta, dqkv, part, *args, **common)
    _win_bwd_dkdv[(n_groups * (R // t["BK"]), B * n_heads, t["num_dk"])](
        qkv, table, dout, lse, delta, dqkv, *args, **common)
    n = ws * ws
    dscore = part.view(B, n_heads, n_groups, t["NP"], t["NP"]).sum((0, 2))[:, :n, :n]
    return dqkv, table_grad(dscore, ws)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile inventory (tests and `varformer bench --compile-report`)
# --------------------------------------------------------------------------------------------
def compile_inventory(dtypes=("fp32", "fp16", "bf16"), tf32: bool = True):
    """Every launch variant the launchers can produce (per window size, head-dim chunk, dtype,
    shifted or not), as dicts: name, fn, signature, constexprs, num_warps, label."""
    out = []
    variants = [(dt, "ieee" if dt == "fp32" else "tf32") for dt in dtypes]
    if "fp32" in dtypes and tf32:
        variants.append(("fp32", "tf32"))
    for dt, prec in variants:
        tag0 = f"{dt}{'/tf32' if dt == 'fp32' and prec == 'tf32' else ''}"
        f32 = dt == "fp32"
        tiles = {}
        for ws in WINDOW_SIZES:
            for hd in BLOCK_DS:
                t = tiling(ws, hd, f32)
                tiles[(ws, t["BLOCK_D"])] = t
        for (ws, bd), t in sorted(tiles.items()):
            for shifted in (False, True):
                cx = dict(NP=t["NP"], WPP=t["WPP"], BQ=t["BQ"], BK=t["BK"], BLOCK_D=bd,
                          SHIFTED=shifted, PREC=prec, UPCAST=False)
                tag = f"{tag0} ws={ws} BLOCK_D={bd}{' shifted' if shifted else ''}"
                io = dict(QKV=f"*{dt}", TABLE="*fp32", LSE="*fp32")
                out.append(entry("window_fwd", _win_fwd, dict(io, OUT=f"*{dt}"),
                                 ["scale_log2"], cx, t["num_warps"], tag))
                bw = dict(io, DOUT=f"*{dt}", DELTA="*fp32", DQKV=f"*{dt}", DBIAS="*fp32")
                out.append(entry("window_bwd_dq", _win_bwd_dq, bw, ["scale", "scale_log2"],
                                 cx, t["num_warps"], tag))
                out.append(entry("window_bwd_dkdv", _win_bwd_dkdv, bw, ["scale", "scale_log2"],
                                 cx, t["num_warps"], tag))
    return out

