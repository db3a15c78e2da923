"""Triton kernels for the nearest-codebook lookup of VAR's multi-scale quantizer.

For tokens z [N, C] and a codebook E [V, C] with squared norms en [V]::

    d[n, v] = (|z_n|² + en[v]) − 2 z_n·E_v        (fp32, VAR's formula and order)
    idx[n]  = argmin_v d[n, v]                     (ties: lowest index, as torch.argmin)

The N×V distance matrix is never stored: a program holds a tile of BLOCK_N tokens and walks
its share of the codebook in BLOCK_V-code tiles, keeping a running (min, index) per token
(strict ``<`` across tiles, lowest index within a tile). For small N (VAR's first scales hold
1–16 tokens per image) the codebook is split across programs (grid axis 1) and a second kernel
reduces the per-split minima in split order, so ties still go to the lowest index.

Two token sources share the kernel:
* rows of a matrix z [N, C] (any strides);
* ``AREA``: tokens pooled on the fly from a feature map f [B, C, SH, SW] to a PH×PW grid with
  the windows of ``F.interpolate(mode="area")`` (adaptive average pooling), token n = (b, py, px)
  — VAR's per-scale downsampling fused into the lookup.
The chosen codes can be gathered in the same pass, to [N, C] rows or, for ``AREA``, straight to
the [B, C, PH, PW] map that VAR upsamples next.

fp16/bf16 inputs: the dot runs on the native dtype (products are exact in fp32, accumulation is
fp32); fp32 inputs: ``precision`` "ieee" (default, full fp32), "tf32x3" or "tf32".
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._aot import entry

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PRECISIONS = ("ieee", "tf32x3", "tf32")


@triton.jit
def _z_tile(Z, rows, rmask, offs_c, cmask, P, PW, PH, SH, SW, s_zb, s_zc, s_zh, s_zw,
            AREA: tl.constexpr, KH, KW):
    """[BLOCK_N, BLOCK_C] fp32 tokens: matrix rows, or area-pooled pixels of f [B, C, SH, SW]
    (KH × KW: the largest pooling window)."""
    cm = rmask[:, None] & cmask[None, :]
    if AREA:
        b = rows // P
        p = rows % P
        py = p // PW
        px = p % PW
        y0 = (py * SH) // PH
        y1 = ((py + 1) * SH + PH - 1) // PH
        x0 = (px * SW) // PW
        x1 = ((px + 1) * SW + PW - 1) // PW
        base = Z + b[:, None] * s_zb + offs_c[None, :] * s_zc
        acc = tl.zeros([rows.shape[0], offs_c.shape[0]], dtype=tl.float32)
        for dy in range(KH):
            for dx in range(KW):
                y = y0 + dy
                x = x0 + dx
                m = cm & ((y < y1) & (x < x1))[:, None]
                acc += tl.load(base + (y * s_zh + x * s_zw)[:, None], mask=m,
                               other=0.0).to(tl.float32)
        cnt = ((y1 - y0) * (x1 - x0)).to(tl.float32)
        return acc / cnt[:, None]
    else:
        return tl.load(Z + rows[:, None] * s_zb + offs_c[None, :] * s_zc, mask=cm,
                       other=0.0).to(tl.float32)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, BROADCAST: tl.constexpr):
    """a [M, K] · b [N, K]ᵀ in fp32. ``BROADCAST`` (interpreter only): an elementwise product
    and row sums, because numpy's matmul rounds identical rows differently depending on their
    position in the tile, which would break exact ties."""
    if BROADCAST:
        return tl.sum(a[:, None, :].to(tl.float32) * b[None, :, :].to(tl.float32), 2)
    else:
        return tl.dot(a, tl.trans(b), input_precision=PREC)


@triton.jit
def _store_codes(E, CODES, rows, rmask, idx, C, P, s_ev, s_ec, BLOCK_C: tl.constexpr,
                 NUM_C: tl.constexpr):
    """codes[token] = E[idx]: rows of [N, C] (P = 1) or pixels of [B, C, PH, PW] (P = PH·PW)."""
    out = (rows // P) * (C * P) + rows % P
    for c in range(NUM_C):
        offs_c = c * BLOCK_C + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (offs_c < C)[None, :]
        e = tl.load(E + idx[:, None] * s_ev + offs_c[None, :] * s_ec, mask=m)
        tl.store(CODES + out[:, None] + offs_c[None, :] * P, e, mask=m)


@triton.jit
def _vq_argmin(Z, E, EN, OUT_D, OUT_I, CODES, N, V, C, P, PW, PH, SH, SW,
               s_zb, s_zc, s_zh, s_zw, s_ev, s_ec, codes_per_split,
               KH, KW, AREA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_C: tl.constexpr,
               NUM_C: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr,
               WRITE_CODES: tl.constexpr, BROADCAST: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), splits). Writes the split's (min d, argmin) per token to
    OUT_D/OUT_I [splits, N] (the final outputs when splits = 1, then also the codes)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    offs_c0 = tl.arange(0, BLOCK_C)
    z0 = _z_tile(Z, rows, rmask, offs_c0, offs_c0 < C, P, PW, PH, SH, SW, s_zb, s_zc, s_zh,
                 s_zw, AREA, KH, KW)
    zn = tl.sum(z0 * z0, 1)
    for c in range(1, NUM_C):
        offs_c = c * BLOCK_C + offs_c0
        zc = _z_tile(Z, rows, rmask, offs_c, offs_c < C, P, PW, PH, SH, SW, s_zb, s_zc, s_zh,
                     s_zw, AREA, KH, KW)
        zn += tl.sum(zc * zc, 1)
    if NATIVE_DOT:
        z0 = z0.to(E.dtype.element_ty)

    best_d = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    v_lo = split * codes_per_split
    v_hi = tl.minimum(v_lo + codes_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        vmask = cols < v_hi
        e = tl.load(E + cols[:, None] * s_ev + offs_c0[None, :] * s_ec,
                    mask=vmask[:, None] & (offs_c0 < C)[None, :], other=0.0)
        if not NATIVE_DOT:
            e = e.to(tl.float32)
        dot = _dot(z0, e, PREC, BROADCAST)
        for c in range(1, NUM_C):
            offs_c = c * BLOCK_C + offs_c0
            zk = _z_tile(Z, rows, rmask, offs_c, offs_c < C, P, PW, PH, SH, SW, s_zb, s_zc,
                         s_zh, s_zw, AREA, KH, KW)
            ek = tl.load(E + cols[:, None] * s_ev + offs_c[None, :] * s_ec,
                         mask=vmask[:, None] & (offs_c < C)[None, :], other=0.0)
            if NATIVE_DOT:
                dot += _dot(zk.to(E.dtype.element_ty), ek, PREC, BROADCAST)
            else:
                dot += _dot(zk, ek.to(tl.float32), PREC, BROADCAST)
        en = tl.load(EN + cols, mask=vmask, other=0.0)
        d = (zn[:, None] + en[None, :]) - 2.0 * dot
        d = tl.where(vmask[None, :], d, float("inf"))
        t_min = tl.min(d, 1)
        t_arg = tl.argmin(d, 1, tie_break_left=True)
        upd = t_min < best_d
        best_d = tl.where(upd, t_min, best_d)
        best_i = tl.where(upd, t_arg + v0, best_i)

    tl.store(OUT_D + split * N + rows, best_d, mask=rmask)
    tl.store(OUT_I + split * N + rows, best_i.to(OUT_I.dtype.element_ty), mask=rmask)
    if WRITE_CODES:
        _store_codes(E, CODES, rows, rmask, best_i.to(tl.int64), C, P, s_ev, s_ec, BLOCK_C, NUM_C)


@triton.jit
def _vq_finish(PD, PI, E, OUT_D, OUT_I, CODES, N, C, P, n_splits, s_ev, s_ec,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, NUM_C: tl.constexpr,
               WRITE_CODES: tl.constexpr):
    """Reduce per-split minima [splits, N] in split order (earlier split wins a tie)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    best_d = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    for s in range(n_splits):
        d = tl.load(PD + s * N + rows, mask=rmask, other=float("inf"))
        i = tl.load(PI + s * N + rows, mask=rmask, other=0)
        upd = d < best_d
        best_d = tl.where(upd, d, best_d)
        best_i = tl.where(upd, i, best_i)
    tl.store(OUT_D + rows, best_d, mask=rmask)
    tl.store(OUT_I + rows, best_i.to(tl.int64), mask=rmask)
    if WRITE_CODES:
        _store_codes(E, CODES, rows, rmask, best_i.to(tl.int64), C, P, s_ev, s_ec, BLOCK_C, NUM_C)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
# (BLOCK_N, BLOCK_V, warps, stages) for N > 16 and N <= 16, and the widest channel chunk, per dot
# kind: from an offline ptxas search on sm_90a (spill-free; the fp32 "ieee" dot runs on FMA
# units and needs small tiles).
CONFIGS = {
    "ieee": dict(large=(32, 32, 4, 2), small=(16, 64, 4, 2), max_c=32, narrow=(16, 64, 4, 2),
                 chunked=(32, 32, 8, 1), chunked_small=(16, 32, 4, 1)),
    "tf32x3": dict(large=(64, 64, 8, 2), small=(16, 64, 4, 2), max_c=32),
    "tf32": dict(large=(64, 64, 8, 2), small=(16, 64, 4, 2), max_c=64),
    "native": dict(large=(64, 128, 8, 3), small=(16, 128, 4, 3), max_c=64),
}


def config(N: int, C: int, kind: str):
    """Tile sizes, warps and stages for N tokens of C channels and a dot kind (a precision
    for fp32 inputs, "native" for fp16/bf16)."""
    t = CONFIGS[kind]
    block_c = max(16, min(triton.next_power_of_2(C), t["max_c"]))
    size = "small" if N <= 16 else ("narrow" if block_c == 16 and "narrow" in t else "large")
    bn, bv, warps, stages = t[size]
    if C > block_c:        # channel chunks reloaded per code tile: no software pipelining
        bn, bv, warps, _ = t.get("chunked_small" if N <= 16 else "chunked", t[size])
        stages = 1
    if INTERPRET:          # the interpreter pays per program and per tile step, not per lane
        bn, bv = max(bn, 64), max(bv, 128)
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_C=block_c, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(N: int, V: int, cfg: dict, device: torch.device, splits) -> int:
    v_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    if splits is None:
        if device.type != "cuda":
            return 1
        programs = triton.cdiv(N, cfg["BLOCK_N"])
        splits = max(1, (2 * _sm_count(device.index or 0)) // programs)
    return max(1, min(int(splits), v_tiles))


def _area_window(S: int, P: int) -> int:
    """Largest window of adaptive average pooling from S to P."""
    return max(-(-((i + 1) * S) // P) - (i * S) // P for i in range(P))


def _launch(z, strides, geometry, codebook, sqnorm, with_codes, codes_shape, precision, splits,
            N, C):
    P, PW, PH, SH, SW, area, KH, KW = geometry
    V = codebook.shape[0]
    dev = z.device
    native = (z.dtype != torch.float32 and z.dtype == codebook.dtype and not area
              and not INTERPRET)
    prec = precision if (z.dtype == torch.float32 and codebook.dtype == torch.float32) else "ieee"
    cfg = config(N, C, "native" if native else prec)
    num_c = triton.cdiv(C, cfg["BLOCK_C"])
    n_split = _splits(N, V, cfg, dev, splits)
    per_split = triton.cdiv(triton.cdiv(V, cfg["BLOCK_V"]), n_split) * cfg["BLOCK_V"]
    n_split = triton.cdiv(V, per_split)
    dist = torch.empty(N, device=dev, dtype=torch.float32)
    idx = torch.empty(N, device=dev, dtype=torch.int64)
    codes = (torch.empty(codes_shape, device=dev, dtype=codebook.dtype) if with_codes
             else torch.empty((0, C), device=dev, dtype=codebook.dtype))
    if n_split == 1:
        pd, pi = dist, idx
    else:
        pd = torch.empty((n_split, N), device=dev, dtype=torch.float32)
        pi = torch.empty((n_split, N), device=dev, dtype=torch.int32)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), n_split)
    _vq_argmin[grid](z, codebook, sqnorm, pd, pi, codes, N, V, C, P, PW, PH, SH, SW, *strides,
                     codebook.stride(0), codebook.stride(1), per_split, KH, KW, AREA=area,
                     BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_C=cfg["BLOCK_C"],
                     NUM_C=num_c, NATIVE_DOT=native, PREC=prec,
                     WRITE_CODES=with_codes and n_split == 1, BROADCAST=INTERPRET,
                     num_warps=cfg["num_warps"],
                     num_stages=cfg["num_stages"])
    if n_split > 1:
        _vq_finish[(triton.cdiv(N, 64),)](pd, pi, codebook, dist, idx, codes, N, C, P, n_split,
                                          codebook.stride(0), codebook.stride(1), BLOCK_N=64,
                                          BLOCK_C=cfg["BLOCK_C"], NUM_C=num_c,
                                          WRITE_CODES=with_codes, num_warps=4)
    return idx, dist, codes


def lookup(z, codebook, sqnorm, with_codes: bool = False, precision: str = "ieee", splits=None):
    """z [N, C], codebook [V, C], sqnorm [V] fp32 -> (idx int64 [N], dist fp32 [N],
    codes [N, C] in the codebook dtype, or [0, C] without ``with_codes``)."""
    N, C = z.shape
    geometry = (1, 1, 1, 1, 1, False, 1, 1)
    return _launch(z, (z.stride(0), z.stride(1), 0, 0), geometry, codebook, sqnorm, with_codes,
                   (N, C), precision, splits, N, C)


def fuses_area(C: int, precision: str) -> bool:
    """Whether ``area_lookup`` pools in-kernel at C channels (one channel chunk: the pooled
    tile stays in registers across the codebook walk)."""
    return C <= CONFIGS[precision]["max_c"]


def area_lookup(f, size, codebook, sqnorm, precision: str = "ieee", splits=None):
    """f [B, C, SH, SW] pooled to ``size`` = (PH, PW) as ``F.interpolate(mode="area")`` does,
    then looked up -> (idx int64 [B·PH·PW], dist fp32 [B·PH·PW], codes [B, C, PH, PW])."""
    B, C, SH, SW = f.shape
    PH, PW = size
    N = B * PH * PW
    geometry = (PH * PW, PW, PH, SH, SW, True, _area_window(SH, PH), _area_window(SW, PW))
    return _launch(f, f.stride(), geometry, codebook, sqnorm, True, (B, C, PH, PW), precision,
                   splits, N, C)


# --------------------------------------------------------------------------------------------
# ahead-of-time compile inventory (varformer/compile_check.py)
# --------------------------------------------------------------------------------------------
def compile_inventory(dtypes=("fp32", "fp16", "bf16"), tf32: bool = True):
    """Every launch variant of the launchers (per dtype, dot kind, token-tile size, channel
    chunk, area or matrix tokens, final or split outputs), as dicts: name, fn, signature,
    constexprs, num_warps, num_stages, label."""
    out = []
    for dt in dtypes:
        kinds = (PRECISIONS if tf32 else ("ieee",)) if dt == "fp32" else ("native",)
        for kind in kinds:
            prec = "ieee" if kind == "native" else kind
            for n in (16, 64):
                for c in (8, 32, 64, 256):
                    cfg = config(n, c, kind)
                    bc = cfg["BLOCK_C"]
                    for area in ((False, True) if dt == "fp32" else (False,)):
                        if area and not fuses_area(c, prec):
                            continue
                        cx = dict(AREA=area, BLOCK_N=cfg["BLOCK_N"],
                                  BLOCK_V=cfg["BLOCK_V"], BLOCK_C=bc, NUM_C=triton.cdiv(c, bc),
                                  NATIVE_DOT=kind == "native", PREC=prec, WRITE_CODES=True,
                                  BROADCAST=False)
                        ptrs = dict(Z=f"*{dt}", E=f"*{dt}", EN="*fp32", OUT_D="*fp32",
                                    OUT_I="*i64", CODES=f"*{dt}")
                        tag = f"{dt}/{kind} C={c}{' area' if area else ''}"
                        args = (cfg["num_warps"],)
                        out.append(entry("vq_argmin", _vq_argmin, ptrs, [], cx, *args, tag,
                                         num_stages=cfg["num_stages"]))
                        out.append(entry("vq_argmin", _vq_argmin, dict(ptrs, OUT_I="*i32"), [],
                                         dict(cx, WRITE_CODES=False), *args, tag + " split",
                                         num_stages=cfg["num_stages"]))
        fin = dict(PD="*fp32", PI="*i32", E=f"*{dt}", OUT_D="*fp32", OUT_I="*i64",
                   CODES=f"*{dt}")
        for bc, num_c in ((16, 1), (32, 1), (32, 8), (64, 1), (64, 4)):
            out.append(entry("vq_finish", _vq_finish, fin, [],
                             dict(BLOCK_N=64, BLOCK_C=bc, NUM_C=num_c, WRITE_CODES=True), 4,
                             f"{dt} C={bc * num_c}"))
    return out
