"""Shifted-window (Swin) attention in image layout, with its drop-in modules.

    window_attention(qkv [B, H, W, 3C], rpb_table [(2ws−1)², heads], *, window_size, shift_size,
                     num_heads, scale=None) -> out [B, H, W, C]

Semantics of Swin / SwinIR / VarFormer: cyclic shift by −shift, window partition, q·scale
(head_dim^-1/2 by default) times kᵀ plus the relative position bias, for shift > 0 the region
mask (−100 between tokens of different regions), softmax, @v, window reverse, shift by +shift.
qkv channels are ordered as Swin's qkv Linear output (q, k, v; heads × head_dim in each), and
out is ready for the proj Linear.

Implementations behind ``torch.ops.varformer.window_attention`` (chosen by ``_dispatch``):
``triton`` (``varformer.kernels.window_attention``: roll/partition/reverse in the addressing,
region ids computed in-kernel, no score tensor), ``cpu`` (the fused C++ kernel
``csrc/window_attention.cpp``, ``torch.ops.varformer_ext.window_attention_fwd/_bwd``: one
(image, window, head) per work item, shift and partition in the addressing, scores in per-thread
buffers, outputs and gradients written in image layout; where the extension does not build, or
for windows over 16x16, the chunked PyTorch path: batched matmuls on gathered window chunks with
the bias and mask broadcast and the softmax in place), ``reference`` (plain PyTorch). The backward of every path gives qkv and the bias table gradients; the table
gradient of the Triton path is deterministic (no atomics).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _checks, _dispatch

OP = "window_attention"
_aten = torch.ops.aten


# --------------------------------------------------------------------------------------------
# index helpers and the plain reference
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _relative_position_index_cpu(ws: int) -> Tensor:
    r = torch.arange(ws, device="cpu")
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    return (y[:, None] - y[None, :] + ws - 1) * (2 * ws - 1) + (x[:, None] - x[None, :] + ws - 1)


def relative_position_index(ws: int) -> Tensor:
    """[ws², ws²] int64 index into the (2ws−1)² bias table, as Swin builds it."""
    return _relative_position_index_cpu(ws).clone()


def region_mask(H: int, W: int, ws: int, shift: int) -> Tensor:
    """Swin's shift mask [nW, ws², ws²]: −100 between tokens of different regions, else 0."""
    img = torch.zeros(H, W)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = cnt
            cnt += 1
    mw = img.view(H // ws, ws, W // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    return (mw[:, None, :] - mw[:, :, None]).ne(0).float() * -100.0


def _partition(x: Tensor, ws: int, shift: int) -> Tensor:
    """[B, H, W, X] -> [B, nW, ws², X] after the cyclic shift by −shift."""
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    B, H, W, X = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, X).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // ws) * (W // ws), ws * ws, X)


def _reverse(x: Tensor, ws: int, shift: int, H: int, W: int) -> Tensor:
    """[B, nW, ws², X] -> [B, H, W, X], then the cyclic shift by +shift."""
    B, X = x.shape[0], x.shape[-1]
    x = x.view(B, H // ws, W // ws, ws, ws, X).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, X)
    return torch.roll(x, (shift, shift), (1, 2)) if shift else x


def _split_heads(qkv: Tensor, ws: int, shift: int, nh: int):
    """qkv [B, H, W, 3C] -> q, k, v [B, nW, heads, ws², hd]."""
    x = _partition(qkv, ws, shift)
    B, nW, N, C3 = x.shape
    x = x.view(B, nW, N, 3, nh, C3 // (3 * nh)).permute(3, 0, 1, 4, 2, 5)
    return x[0], x[1], x[2]


def _one_heads(x: Tensor, ws: int, shift: int, nh: int) -> Tensor:
    """x [B, H, W, C] -> [B, nW, heads, ws², hd]."""
    x = _partition(x, ws, shift)
    B, nW, N, C = x.shape
    return x.view(B, nW, N, nh, C // nh).transpose(2, 3)


def _merge_heads(o: Tensor, ws: int, shift: int, H: int, W: int) -> Tensor:
    """[B, nW, heads, ws², hd] -> [B, H, W, C]."""
    B, nW, nh, N, hd = o.shape
    return _reverse(o.permute(0, 1, 3, 2, 4).reshape(B, nW, N, nh * hd), ws, shift, H, W)


def _additive(table: Tensor, H: int, W: int, ws: int, shift: int) -> Tensor:
    """Bias (+ mask) added to the scores: [nW or 1, heads, ws², ws²]."""
    N = ws * ws
    idx = _relative_position_index_cpu(ws).to(table.device).flatten()
    bias = table[idx].view(N, N, -1).permute(2, 0, 1)[None]
    if shift:
        bias = bias + region_mask(H, W, ws, shift).to(table)[:, None]
    return bias


def window_attention_reference(qkv: Tensor, rpb_table: Tensor, window_size: int,
                               shift_size: int, num_heads: int,
                               scale: Optional[float] = None) -> Tensor:
    """Plain differentiable PyTorch (roll, partition, bias, mask, softmax, reverse)."""
    B, H, W, C3 = qkv.shape
    hd = C3 // 3 // num_heads
    s = hd ** -0.5 if scale is None else scale
    q, k, v = _split_heads(qkv, window_size, shift_size, num_heads)
    a = (q * s) @ k.transpose(-1, -2) + _additive(rpb_table, H, W, window_size, shift_size)
    return _merge_heads(a.softmax(-1) @ v, window_size, shift_size, H, W)


# --------------------------------------------------------------------------------------------
# implementations: forward -> (out, lse [B, heads, H·W]); backward -> (dqkv, dtable)
# --------------------------------------------------------------------------------------------
def _ct(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_layout(lse: Tensor, ws: int, shift: int, H: int, W: int) -> Tensor:
    """[B, nW, heads, N] -> [B, heads, H·W]."""
    x = _reverse(lse.permute(0, 1, 3, 2), ws, shift, H, W)     # [B, H, W, heads]
    return x.permute(0, 3, 1, 2).reshape(x.shape[0], x.shape[3], H * W).contiguous()


def _lse_windows(lse: Tensor, ws: int, shift: int, H: int, W: int) -> Tensor:
    """[B, heads, H·W] -> [B, nW, heads, N]."""
    B, nh = lse.shape[:2]
    x = lse.view(B, nh, H, W).permute(0, 2, 3, 1)
    return _partition(x, ws, shift).permute(0, 1, 3, 2)


def _fwd_reference(qkv, table, ws, shift, nh, scale):
    B, H, W, _ = qkv.shape
    ct = _ct(qkv.dtype)
    q, k, v = _split_heads(qkv.to(ct), ws, shift, nh)
    a = (q @ k.transpose(-1, -2)) * scale + _additive(table.to(ct), H, W, ws, shift)
    lse = a.logsumexp(-1)
    out = _merge_heads(torch.exp(a - lse[..., None]) @ v, ws, shift, H, W)
    return out.to(qkv.dtype), _lse_layout(lse, ws, shift, H, W).to(_ct(qkv.dtype))


@functools.lru_cache(maxsize=64)
def _window_order(H: int, W: int, ws: int, shift: int, device: str):
    """(perm, inverse): pixel index h·W + w of every (window, position) in window order after
    the cyclic shift, and its inverse — roll + partition (and back) as one gather each."""
    hs = torch.arange(H, device="cpu").view(H // ws, ws)
    wx = torch.arange(W, device="cpu").view(W // ws, ws)
    h = (hs + shift) % H
    w = (wx + shift) % W
    pix = h[:, None, :, None] * W + w[None, :, None, :]           # [H/ws, W/ws, ws, ws]
    perm = pix.reshape(-1)
    return perm.to(device), torch.argsort(perm).to(device)


def _rows(n_images: int, index: Tensor) -> Tensor:
    """Row index into [B·H·W, X] for every image (dim-0 gathers copy whole rows at once)."""
    hw = index.numel()
    return (index[None] + hw * torch.arange(n_images, device=index.device)[:, None]).reshape(-1)


def _to_windows(x: Tensor, perm: Tensor, ws: int, parts: int) -> Tensor:
    """[B, H, W, X] -> [B, nW, ws², parts, X / parts] in one gather."""
    B, H, W, X = x.shape
    N = ws * ws
    y = x.reshape(B * H * W, X).index_select(0, _rows(B, perm))
    return y.view(B, H * W // N, N, parts, X // parts)


def _from_windows(y: Tensor, inv: Tensor, H: int, W: int) -> Tensor:
    """[B, nW, ws², k, heads, hd] (contiguous) -> [B, H, W, k·heads·hd] in one gather."""
    B = y.shape[0]
    return y.reshape(B * H * W, -1).index_select(0, _rows(B, inv)).view(B, H, W, -1)


def _exp_(x: Tensor) -> Tensor:
    """In-place exp of x ≤ 0 with x clamped at −80 (−700 in fp64): the −100 shift mask would
    otherwise send exp into denormal results, ~25× slower on x86 CPUs. exp(−80) ≈ 2e−35 is far
    below the resolution of any softmax row sum, so the output does not change."""
    return x.clamp_(min=-700.0 if x.dtype == torch.float64 else -80.0).exp_()


def _fwd_chunked(qkv, table, ws, shift, nh, scale, chunk_bytes: int = 8 << 20):
    """Windows processed in chunks of about ``chunk_bytes`` of gathered qkv (whole pixel rows,
    one gather per chunk), bias and mask broadcast, the softmax in place with one exp; each
    chunk's output rows are written straight to their pixels (no window-order copy of out)."""
    B, H, W, C3 = qkv.shape
    C, N = C3 // 3, ws * ws
    hd, n_win = C // nh, H * W // N
    perm, _ = _window_order(H, W, ws, shift, str(qkv.device))
    rows = _rows(B, perm)                                  # pixel rows in (b, window, pos) order
    flat = qkv.reshape(B * H * W, C3)
    add = _additive(table.to(qkv.dtype), H, W, ws, shift)  # [nW or 1, heads, N, N]
    out = qkv.new_empty((B * H * W, C))
    lse = qkv.new_empty((B * H * W, nh))
    cw = max(1, min(n_win, chunk_bytes // (N * C3 * qkv.element_size())))
    for b in range(B):
        for w0 in range(0, n_win, cw):
            w1 = min(n_win, w0 + cw)
            r = rows[(b * n_win + w0) * N:(b * n_win + w1) * N]
            x = flat.index_select(0, r).view(w1 - w0, N, 3, nh, hd)
            q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))     # [w, heads, N, hd]
            s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
            s += add[w0:w1] if add.shape[0] > 1 else add
            m = s.amax(-1, keepdim=True)
            total = _exp_(s.sub_(m)).sum(-1, keepdim=True)
            o = torch.matmul(s.div_(total), v)
            out.index_copy_(0, r, o.transpose(1, 2).reshape(-1, C))
            lse.index_copy_(0, r, (m + total.log()).squeeze(-1).transpose(1, 2).reshape(-1, nh))
    lse = lse.view(B, H * W, nh).transpose(1, 2).contiguous()
    return out.view(B, H, W, C), lse.to(_ct(qkv.dtype))


def _bwd_chunked(dout, qkv, table, out, lse, ws, shift, nh, scale,
                 chunk_bytes: int = 8 << 20):
    """The reference backward window chunk by window chunk (as the forward: one row gather of
    qkv and dout per chunk, one [.., N, N] buffer reused for p and dS); each chunk's dqkv rows
    are written straight to their pixels and the bias-table gradient is summed over chunks."""
    B, H, W, C3 = qkv.shape
    C, N = C3 // 3, ws * ws
    hd, n_win = C // nh, H * W // N
    perm, _ = _window_order(H, W, ws, shift, str(qkv.device))
    rows = _rows(B, perm)
    dt = qkv.dtype
    flat = qkv.reshape(B * H * W, C3)
    dflat = dout.to(dt).reshape(B * H * W, C)
    delta = (dflat * out.to(dt).reshape(B * H * W, C)).view(-1, nh, hd).sum(-1)   # [BHW, h]
    lse_r = lse.to(dt).transpose(1, 2).reshape(B * H * W, nh)
    add = _additive(table.to(dt), H, W, ws, shift)
    dqkv = qkv.new_empty((B * H * W, C3))
    g = qkv.new_zeros((nh, N, N))
    cw = max(1, min(n_win, chunk_bytes // (N * C3 * qkv.element_size())))
    for b in range(B):
        for w0 in range(0, n_win, cw):
            w1 = min(n_win, w0 + cw)
            r = rows[(b * n_win + w0) * N:(b * n_win + w1) * N]
            nw = w1 - w0
            x = flat.index_select(0, r).view(nw, N, 3, nh, hd)
            q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))     # [w, heads, N, hd]
            do = dflat.index_select(0, r).view(nw, N, nh, hd).transpose(1, 2)
            d_l = delta.index_select(0, r).view(nw, N, nh).transpose(1, 2)[..., None]
            l_r = lse_r.index_select(0, r).view(nw, N, nh).transpose(1, 2)[..., None]
            p = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
            p += add[w0:w1] if add.shape[0] > 1 else add
            _exp_(p.sub_(l_r))
            dv = torch.matmul(p.transpose(-1, -2), do)
            ds = torch.matmul(do, v.transpose(-1, -2)).sub_(d_l).mul_(p)
            del p
            dq = torch.matmul(ds, k).mul_(scale)
            dk = torch.matmul(ds.transpose(-1, -2), q).mul_(scale)
            d = torch.stack([t.transpose(1, 2) for t in (dq, dk, dv)], dim=2)  # [w, N, 3, h, hd]
            dqkv.index_copy_(0, r, d.reshape(-1, C3))
            g += ds.sum(0)
    return dqkv.view(B, H, W, C3), _table_grad(g, ws, table)


# The C++ kernel: "auto" uses it where it is built (windows up to 16x16), "chunked" forces the
# PyTorch chunked path, "csrc" requires the C++ kernel (an error if it is unavailable). Process-
# wide; for tests and benchmarks.
CPU_KERNEL = {"value": "auto"}
_EXT_FWD = "varformer_ext::window_attention_fwd"
CSRC_MAX_WINDOW = 16


_FAKES = []


def _register_ext_fakes() -> None:
    """Fake (meta) kernels of the C++ ops, so that they trace and pass opcheck on their own."""
    if _FAKES:
        return

    @torch.library.register_fake("varformer_ext::window_attention_fwd")
    def _(qkv, rpb_table, window_size, shift_size, num_heads, scale):
        B, H, W, C3 = qkv.shape
        return qkv.new_empty((B, H, W, C3 // 3)), qkv.new_empty((B, num_heads, H * W))

    @torch.library.register_fake("varformer_ext::window_attention_bwd")
    def _(grad_out, qkv, rpb_table, out, lse, window_size, shift_size, num_heads, scale):
        return qkv.new_empty(qkv.shape), qkv.new_empty(rpb_table.shape)
    _FAKES.append(True)


def cpu_kernel_status() -> tuple[bool, str]:
    """(usable, reason if not) of the C++ CPU kernel; builds the extension on first call."""
    from . import _ext
    return _ext.op_kernel_status(_EXT_FWD, "window-attention", _register_ext_fakes)


def _use_csrc(ws: int) -> bool:
    mode = CPU_KERNEL["value"]
    if mode == "chunked":
        return False
    if mode not in ("auto", "csrc"):
        raise ValueError(f"{OP}: CPU_KERNEL must be auto, csrc or chunked, got {mode!r}")
    if ws > CSRC_MAX_WINDOW:
        if mode == "csrc":
            raise ValueError(f"{OP}: the C++ kernel takes windows of up to {CSRC_MAX_WINDOW}x"
                             f"{CSRC_MAX_WINDOW} tokens, got window_size={ws}")
        return False
    ok, why = cpu_kernel_status()
    if not ok and mode == "csrc":
        raise RuntimeError(f"{OP}: CPU_KERNEL='csrc' but the C++ kernel is unavailable: {why}")
    return ok


def _fwd_cpu(qkv, table, ws, shift, nh, scale):
    """The C++ kernel (compute in fp32, fp64 for fp64 inputs) or the chunked path."""
    if not _use_csrc(ws):
        return _fwd_chunked(qkv, table, ws, shift, nh, scale)
    ct = _ct(qkv.dtype)
    out, lse = torch.ops.varformer_ext.window_attention_fwd(qkv.to(ct).contiguous(),
                                                            table.detach(), ws, shift, nh,
                                                            float(scale))
    return out.to(qkv.dtype), lse


def _bwd_cpu(dout, qkv, table, out, lse, ws, shift, nh, scale):
    if not _use_csrc(ws):
        return _bwd_chunked(dout, qkv, table, out, lse, ws, shift, nh, scale)
    ct = _ct(qkv.dtype)
    dqkv, dtable = torch.ops.varformer_ext.window_attention_bwd(
        dout.to(ct).contiguous(), qkv.to(ct).contiguous(), table.detach(),
        out.to(ct).contiguous(), lse.to(ct).contiguous(), ws, shift, nh, float(scale))
    return dqkv.to(qkv.dtype), dtable.to(table.dtype)


def _bwd_reference(dout, qkv, table, out, lse, ws, shift, nh, scale):
    B, H, W, _ = qkv.shape
    ct = _ct(qkv.dtype)
    q, k, v = _split_heads(qkv.to(ct), ws, shift, nh)
    do, o = _one_heads(dout.to(ct), ws, shift, nh), _one_heads(out.to(ct), ws, shift, nh)
    a = (q @ k.transpose(-1, -2)) * scale + _additive(table.to(ct), H, W, ws, shift)
    p = torch.exp(a - _lse_windows(lse.to(ct), ws, shift, H, W)[..., None])
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dq, dk = (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale
    dqkv = torch.cat([_merge_heads(t, ws, shift, H, W) for t in (dq, dk, dv)], -1)
    return dqkv.to(qkv.dtype), _table_grad_from_scores(ds, ws, table)


def _table_grad_from_scores(ds: Tensor, ws: int, table: Tensor) -> Tensor:
    """dS [B, nW, heads, N, N] -> gradient of the bias table [(2ws−1)², heads] (table dtype)."""
    return _table_grad(ds.sum((0, 1)), ws, table)


def _table_grad(g: Tensor, ws: int, table: Tensor) -> Tensor:
    """dS summed over windows and batch [heads, N, N] -> table gradient (table dtype)."""
    nh, N = g.shape[0], g.shape[1]
    idx = _relative_position_index_cpu(ws).to(g.device).flatten()
    dtable = torch.zeros((2 * ws - 1) ** 2, nh, dtype=g.dtype, device=g.device)
    return dtable.index_add_(0, idx, g.reshape(nh, N * N).t()).to(table.dtype)


def _fwd_triton(qkv, table, ws, shift, nh, scale):
    from varformer.kernels import window_attention as kern
    return kern.window_forward(qkv.contiguous(), table.float().contiguous(), ws, shift, nh, scale)


def _bwd_triton(dout, qkv, table, out, lse, ws, shift, nh, scale):
    from varformer.kernels import window_attention as kern
    dqkv, dtable = kern.window_backward(dout, qkv.contiguous(), table.float().contiguous(), out,
                                        lse, ws, shift, nh, scale)
    return dqkv, dtable.to(table.dtype)


_FWD = {"reference": _fwd_reference, "cpu": _fwd_cpu, "triton": _fwd_triton}
_BWD = {"reference": _bwd_reference, "cpu": _bwd_cpu, "triton": _bwd_triton}


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("varformer::window_attention", mutates_args=())
def _window_attention_op(qkv: Tensor, rpb_table: Tensor, window_size: int, shift_size: int,
                         num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """-> (out [B, H, W, C], lse [B, heads, H·W]: log-sum-exp of every token's scores)."""
    if qkv.numel() == 0:
        return _fwd_reference(qkv, rpb_table, window_size, shift_size, num_heads, scale)
    return _FWD[_dispatch.select(OP, qkv)](qkv, rpb_table, window_size, shift_size, num_heads,
                                            scale)


@_window_attention_op.register_fake
def _(qkv, rpb_table, window_size, shift_size, num_heads, scale):
    B, H, W, C3 = qkv.shape
    return (qkv.new_empty((B, H, W, C3 // 3)),
            qkv.new_empty((B, num_heads, H * W), dtype=_ct(qkv.dtype)))


@torch.library.custom_op("varformer::window_attention_backward", mutates_args=())
def _window_attention_backward_op(grad_out: Tensor, qkv: Tensor, rpb_table: Tensor, out: Tensor,
                                  lse: Tensor, window_size: int, shift_size: int, num_heads: int,
                                  scale: float, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """-> (grad_qkv, grad_rpb_table); ``backend``: the request the forward ran under."""
    path = "reference" if qkv.numel() == 0 else _dispatch.select(OP, qkv, want=backend)
    dqkv, dtable = _BWD[path](grad_out, qkv, rpb_table, out, lse, window_size, shift_size,
                              num_heads, scale)
    return dqkv.contiguous(), dtable.contiguous()


@_window_attention_backward_op.register_fake
def _(grad_out, qkv, rpb_table, out, lse, window_size, shift_size, num_heads, scale,
      backend="auto"):
    return qkv.new_empty(qkv.shape), rpb_table.new_empty(rpb_table.shape)


def _setup_context(ctx, inputs, output):
    qkv, table, ws, shift, nh, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, table, out, lse)
    ctx.args = (ws, shift, nh, scale, _dispatch.requested())   # backward: the forward's path
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    qkv, table, out, lse = ctx.saved_tensors
    dqkv, dtable = _window_attention_backward_op(grad_out, qkv, table, out, lse, *ctx.args)
    return dqkv, dtable, None, None, None, None


_window_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def check_inputs(qkv, rpb_table, window_size, shift_size, num_heads, scale=None) -> float:
    """Validate window-attention inputs; returns the effective scale."""
    _checks.tensor(OP, "qkv", qkv, ndim=4, shape_hint="[B, H, W, 3C]")
    _checks.tensor(OP, "rpb_table", rpb_table, ndim=2, shape_hint="[(2*ws-1)**2, heads]")
    if rpb_table.device != qkv.device:
        raise ValueError(f"{OP}: rpb_table is on {rpb_table.device} but qkv is on {qkv.device}")
    for name, val in (("window_size", window_size), ("shift_size", shift_size),
                      ("num_heads", num_heads)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{OP}: {name} must be an int, got {type(val).__name__}")
    if window_size < 1:
        raise ValueError(f"{OP}: window_size must be >= 1, got {window_size}")
    if not 0 <= shift_size < window_size:
        raise ValueError(f"{OP}: shift_size must be in [0, window_size={window_size}), "
                         f"got {shift_size}")
    B, H, W, C3 = qkv.shape
    if C3 % 3:
        raise ValueError(f"{OP}: qkv's last dim must be 3*C (q, k, v), got {C3}")
    if num_heads < 1 or (C3 // 3) % num_heads:
        raise ValueError(f"{OP}: num_heads={num_heads} must divide C={C3 // 3}")
    if H % window_size or W % window_size:
        raise ValueError(f"{OP}: H and W must be multiples of window_size={window_size}, got "
                         f"H={H}, W={W} (pad the image; the modules do)")
    want = ((2 * window_size - 1) ** 2, num_heads)
    if tuple(rpb_table.shape) != want:
        raise ValueError(f"{OP}: rpb_table must have shape {want} for window_size={window_size} "
                         f"and num_heads={num_heads}, got {tuple(rpb_table.shape)}")
    if _dispatch.may_use_triton(qkv):
        if window_size * window_size > 256:
            raise ValueError(f"{OP}: the Triton kernels take windows of up to 16x16 tokens, "
                             f"got window_size={window_size}")
        if B * num_heads > 65535:
            raise ValueError(f"{OP}: B*num_heads must be at most 65535, got {B * num_heads}")
        if H * W * C3 > _checks.INT32_MAX:
            raise ValueError(f"{OP}: one image of qkv holds {H * W * C3} elements; the kernels "
                             f"address at most {_checks.INT32_MAX} (int32)")
    return _checks.scale(OP, scale, (C3 // 3 // num_heads) ** -0.5)


def window_attention(qkv: Tensor, rpb_table: Tensor, *, window_size: int, shift_size: int,
                     num_heads: int, scale: Optional[float] = None) -> Tensor:
    """Swin window attention on image-layout qkv [B, H, W, 3C] -> [B, H, W, C].

    rpb_table [(2·window_size−1)², num_heads] (any float dtype; its gradient keeps its dtype).
    H and W must be multiples of window_size; 0 ≤ shift_size < window_size. qkv may have any
    strides (the Triton path makes it contiguous). Differentiable in qkv and rpb_table."""
    s = check_inputs(qkv, rpb_table, window_size, shift_size, num_heads, scale)
    return torch.ops.varformer.window_attention(qkv, rpb_table, window_size, shift_size,
                                                num_heads, s)[0]
