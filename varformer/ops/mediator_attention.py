"""Mediator attention (VarFormer's AFT, paper Eq. 5 without the residual).

    out = softmax(Q Mᵀ · s) · (softmax(M Kᵀ · s) · V),   s = scale or d^-1/2

q [B, H, N, d], m [B, H, L, d] (the L mediators), k/v [B, H, Nk, d] -> out [B, H, N, d].

Implementations behind ``torch.ops.varformer.mediator_attention`` (chosen by ``_dispatch``):

* ``triton`` — ``varformer.kernels.mediator_attention``: two flash-style stages, split-KV for
  stage 1, recomputing backward; no N×L / L×N map in forward or backward.
* ``cpu`` — two calls of PyTorch's fused CPU flash-attention kernels (forward and backward), also
  without N×L maps.
* ``reference`` — plain matmul/softmax in fp32 (fp64 for fp64 inputs) with an explicit backward.

The registered op returns ``(out, summary, lse_summary, lse_out)``: the summary ``S = softmax(M
Kᵀ s) V`` [B, H, L, d] and the natural-log log-sum-exps of both softmaxes ([B, H, L], [B, H, N];
fp32, fp64 for fp64 inputs) are what the backward needs. ``mediator_attention`` returns ``out``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, _dispatch

OP = "mediator_attention"
TRITON_MAX_HEAD_DIM = 640  # = varformer.kernels.mediator_attention.MAX_HEAD_DIM (a test checks)
_aten = torch.ops.aten


# --------------------------------------------------------------------------------------------
# plain references
# --------------------------------------------------------------------------------------------
def mediator_attention_reference(q: Tensor, m: Tensor, k: Tensor, v: Tensor,
                                 scale: Optional[float] = None) -> Tensor:
    """Plain differentiable PyTorch, in the inputs' dtype; the ground truth of the tests."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    summary = torch.softmax(m @ k.transpose(-1, -2) * s, dim=-1) @ v
    return torch.softmax(q @ m.transpose(-1, -2) * s, dim=-1) @ summary


def mediator_attention_official(q: Tensor, a: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The official ``AnchorCrossAttnBlock`` attention, op for op, in its channel-first layout.

    q/k/v [B, C, N] (1×1-conv outputs, flattened), a [B, C, L] (the mediators) -> [B, C, N].
    Materialises both maps and their transposed copies (the eager baseline of the benchmarks)."""
    q = q.contiguous().permute(0, 2, 1).contiguous()          # B, N, C
    a = a.contiguous()                                        # B, C, L
    k = k.contiguous()                                        # B, C, Nk
    w1 = torch.bmm(q, a).mul_(scale)                          # B, N, L
    w1 = F.softmax(w1, dim=2)
    a = a.permute(0, 2, 1).contiguous()                       # B, L, C
    w2 = torch.bmm(a, k).mul_(scale)                          # B, L, Nk
    w2 = F.softmax(w2, dim=2)
    v = v.contiguous()
    w1 = w1.permute(0, 2, 1).contiguous()                     # B, L, N
    w2 = w2.permute(0, 2, 1).contiguous()                     # B, Nk, L
    h = torch.bmm(v, w2)                                      # B, C, L
    return torch.bmm(h, w1)                                   # B, C, N


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# the three implementations: forward (q, m, k, v, scale) -> (out, s, lse_s, lse_o)
# backward (g_out, g_s, q, m, k, v, out, s, lse_s, lse_o, scale) -> (dq, dm, dk, dv)
# --------------------------------------------------------------------------------------------
def _fwd_reference(q, m, k, v, scale):
    ct = _compute_dtype(q.dtype)
    q_, m_, k_, v_ = (t.to(ct) for t in (q, m, k, v))
    a1 = (m_ @ k_.transpose(-1, -2)) * scale
    lse_s = a1.logsumexp(-1)
    s = torch.exp(a1 - lse_s[..., None]) @ v_
    a2 = (q_ @ m_.transpose(-1, -2)) * scale
    lse_o = a2.logsumexp(-1)
    out = torch.exp(a2 - lse_o[..., None]) @ s
    return out.to(q.dtype), s.to(q.dtype), lse_s.to(_lse_dtype(q.dtype)), lse_o.to(_lse_dtype(q.dtype))


def _attn_bwd_reference(do, q, k, v, out, lse, scale):
    """Backward of softmax(q kᵀ s) v from its saved log-sum-exp, in the compute dtype."""
    p = torch.exp((q @ k.transpose(-1, -2)) * scale - lse[..., None])
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (do * out).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv


def _bwd_reference(g_out, g_s, q, m, k, v, out, s, lse_s, lse_o, scale):
    ct = _compute_dtype(q.dtype)
    q_, m_, k_, v_, o_, s_, g_ = (t.to(ct) for t in (q, m, k, v, out, s, g_out))
    dq, dm2, ds = _attn_bwd_reference(g_, q_, m_, s_, o_, lse_o.to(ct), scale)
    if g_s is not None:
        ds = ds + g_s.to(ct)
    dm1, dk, dv = _attn_bwd_reference(ds, m_, k_, v_, s_, lse_s.to(ct), scale)
    return tuple(t.to(q.dtype) for t in (dq, dm1 + dm2, dk, dv))


def _fwd_cpu(q, m, k, v, scale):
    # PyTorch's CPU flash kernel gives wrong results on some strided inputs (e.g. a d-major k):
    # hand it dense tensors (no copy when already contiguous).
    q, m, k, v = (t.contiguous() for t in (q, m, k, v))
    s, lse_s = _aten._scaled_dot_product_flash_attention_for_cpu(m, k, v, 0.0, False, scale=scale)
    out, lse_o = _aten._scaled_dot_product_flash_attention_for_cpu(q, m, s, 0.0, False,
                                                                   scale=scale)
    lt = _lse_dtype(q.dtype)
    return out.contiguous(), s.contiguous(), lse_s.to(lt).contiguous(), lse_o.to(lt).contiguous()


def _bwd_cpu(g_out, g_s, q, m, k, v, out, s, lse_s, lse_o, scale):
    bwd = _aten._scaled_dot_product_flash_attention_for_cpu_backward
    q, m, k, v = (t.contiguous() for t in (q, m, k, v))
    dq, dm2, ds = bwd(g_out.contiguous(), q, m, s, out, lse_o, 0.0, False, scale=scale)
    if g_s is not None:
        ds = ds + g_s
    dm1, dk, dv = bwd(ds.contiguous(), m, k, v, s, lse_s, 0.0, False, scale=scale)
    return dq, (dm1.float() + dm2.float()).to(q.dtype), dk, dv


def _fwd_triton(q, m, k, v, scale):
    from varformer.kernels import mediator_attention as kern
    return kern.mediator_attention_forward(q, m, k, v, scale)


def _bwd_triton(g_out, g_s, q, m, k, v, out, s, lse_s, lse_o, scale):
    from varformer.kernels import mediator_attention as kern
    return kern.mediator_attention_backward(g_out, g_s, q, m, k, v, out, s, lse_s, lse_o, scale)


_FWD = {"reference": _fwd_reference, "cpu": _fwd_cpu, "triton": _fwd_triton}
_BWD = {"reference": _bwd_reference, "cpu": _bwd_cpu, "triton": _bwd_triton}


def _empty_like_outputs(q, m):
    B, H, N, D = q.shape
    L = m.shape[2]
    lt = _lse_dtype(q.dtype)
    return (q.new_empty((B, H, N, D)), q.new_empty((B, H, L, D)),
            q.new_empty((B, H, L), dtype=lt), q.new_empty((B, H, N), dtype=lt))


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("varformer::mediator_attention", mutates_args=())
def _mediator_attention_op(q: Tensor, m: Tensor, k: Tensor, v: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out [B,H,N,d], summary [B,H,L,d], lse_summary [B,H,L], lse_out [B,H,N])."""
    if q.numel() == 0:  # B, H or N is 0: nothing for a kernel to do
        return _fwd_reference(q, m, k, v, scale)
    return _FWD[_dispatch.select(OP, q)](q, m, k, v, scale)


@_mediator_attention_op.register_fake
def _(q, m, k, v, scale):
    return _empty_like_outputs(q, m)


@torch.library.custom_op("varformer::mediator_attention_backward", mutates_args=())
def _mediator_attention_backward_op(grad_out: Tensor, grad_summary: Optional[Tensor], q: Tensor,
                                    m: Tensor, k: Tensor, v: Tensor, out: Tensor, summary: Tensor,
                                    lse_summary: Tensor, lse_out: Tensor,
                                    scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_q, grad_m, grad_k, grad_v), recomputed from the saved log-sum-exps."""
    if q.numel() == 0:
        return _bwd_reference(grad_out, grad_summary, q, m, k, v, out, summary, lse_summary,
                              lse_out, scale)
    grads = _BWD[_dispatch.select(OP, q)](grad_out.contiguous(), grad_summary, q, m, k, v, out,
                                           summary, lse_summary, lse_out, scale)
    return tuple(g.contiguous() for g in grads)  # the fake promises dense gradients


@_mediator_attention_backward_op.register_fake
def _(grad_out, grad_summary, q, m, k, v, out, summary, lse_summary, lse_out, scale):
    return q.new_empty(q.shape), m.new_empty(m.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, m, k, v, scale = inputs
    out, summary, lse_s, lse_o = output
    ctx.save_for_backward(q, m, k, v, out, summary, lse_s, lse_o)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse_s, lse_o)


def _backward(ctx, grad_out, grad_summary, _grad_lse_s, _grad_lse_o):
    q, m, k, v, out, summary, lse_s, lse_o = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dm, dk, dv = _mediator_attention_backward_op(grad_out, grad_summary, q, m, k, v, out,
                                                     summary, lse_s, lse_o, ctx.scale)
    return dq, dm, dk, dv, None


_mediator_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def check_inputs(q, m, k, v, scale=None) -> float:
    """Validate mediator-attention inputs; returns the effective scale. Raises on bad input."""
    hint = "[B, H, T, d]"
    for name, t in (("q", q), ("m", m), ("k", k), ("v", v)):
        _checks.tensor(OP, name, t, ndim=4, shape_hint=hint)
    _checks.same(OP, "q", q, m=m, k=k, v=v)
    _checks.dim_equal(OP, "batch sizes (dim 0)", q=q.shape[0], m=m.shape[0], k=k.shape[0],
                      v=v.shape[0])
    _checks.dim_equal(OP, "head counts (dim 1)", q=q.shape[1], m=m.shape[1], k=k.shape[1],
                      v=v.shape[1])
    _checks.dim_equal(OP, "head dims (dim 3)", q=q.shape[3], m=m.shape[3], k=k.shape[3],
                      v=v.shape[3])
    _checks.dim_equal(OP, "key and value lengths (dim 2)", k=k.shape[2], v=v.shape[2])
    _checks.positive(OP, "q", q.shape[3], "head dim d (dim 3)")
    _checks.positive(OP, "m", m.shape[2], "mediator count L (dim 2)")
    _checks.positive(OP, "k", k.shape[2], "key count Nk (dim 2)")
    if _dispatch.may_use_triton(q):
        if q.shape[3] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"{OP}: the Triton kernels take head dims up to "
                             f"{TRITON_MAX_HEAD_DIM}, got d={q.shape[3]} (q dim 3)")
        if q.shape[0] * q.shape[1] > 65535:
            raise ValueError(f"{OP}: B*H must be at most 65535 (grid limit), got "
                             f"{q.shape[0] * q.shape[1]}")
        for name, t in (("q", q), ("m", m), ("k", k), ("v", v)):
            _checks.int32_addressable(OP, name, t)
    return _checks.scale(OP, scale, q.shape[-1] ** -0.5)


def mediator_attention(q: Tensor, m: Tensor, k: Tensor, v: Tensor,
                       scale: Optional[float] = None) -> Tensor:
    """softmax(q mᵀ·s) · (softmax(m kᵀ·s) · v), s = scale or d^-1/2.

    q [B, H, N, d], m [B, H, L, d], k and v [B, H, Nk, d] -> [B, H, N, d] in q's dtype.
    One dtype (float32/float16/bfloat16; float64 on the CPU and reference paths) and one device
    for all four; any strides are accepted (nothing is copied). Differentiable in all inputs."""
    s = check_inputs(q, m, k, v, scale)
    return torch.ops.varformer.mediator_attention(q, m, k, v, s)[0]


# --------------------------------------------------------------------------------------------
# the AFT drop-in module
# --------------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class MediatorAttention(nn.Module):
    """VarFormer's AFT block (official ``AnchorCrossAttnBlock``) on the fused op.

    forward(x [B, C, H, W], prior [B, C_prior, H, W]) -> x + proj_out(Y) [B, C, H, W], where
    Q = q(GN(x)), [K; V] = kv(GN(prior)) (first C channels K, last C V), the L = HW/stride²
    mediators M = a(GN(cat(x, prior))) (a stride × stride conv of stride ``stride``), and
    Y = mediator_attention(Q, M, K, V) with C split into ``num_heads`` heads (official: 1 head,
    scale C^-1/2). Parameter names equal the official ones, so released weights load strictly.
    """

    def __init__(self, dim: int, stride: int = 4, num_heads: int = 1,
                 prior_dim: Optional[int] = None):
        super().__init__()
        prior_dim = dim if prior_dim is None else prior_dim
        if dim % num_heads:
            raise ValueError(f"MediatorAttention: num_heads={num_heads} must divide dim={dim}")
        self.dim, self.prior_dim, self.stride, self.num_heads = dim, prior_dim, stride, num_heads
        self.norm_q = _group_norm(dim)
        self.q = nn.Conv2d(dim, dim, 1)
        self.norm_kv = _group_norm(prior_dim)
        self.kv = nn.Conv2d(prior_dim, 2 * dim, 1)
        self.norm_a = _group_norm(dim + prior_dim)
        self.a = nn.Conv2d(dim + prior_dim, dim, kernel_size=stride, stride=stride)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def _heads(self, t: Tensor) -> Tensor:
        B, C = t.shape[:2]
        d = C // self.num_heads
        return t.reshape(B, self.num_heads, d, -1).transpose(-1, -2).contiguous()

    def forward(self, x: Tensor, prior: Tensor) -> Tensor:
        name = "MediatorAttention"
        _checks.tensor(name, "x", x, ndim=4, shape_hint="[B, C, H, W]")
        _checks.tensor(name, "prior", prior, ndim=4, shape_hint="[B, C_prior, H, W]")
        if x.shape[1] != self.dim or prior.shape[1] != self.prior_dim:
            raise ValueError(f"{name}: expected x with {self.dim} channels and prior with "
                             f"{self.prior_dim}, got {tuple(x.shape)} and {tuple(prior.shape)}")
        if x.shape[0] != prior.shape[0] or x.shape[2:] != prior.shape[2:]:
            raise ValueError(f"{name}: x {tuple(x.shape)} and prior {tuple(prior.shape)} must "
                             "share batch and spatial size")
        B, C, H, W = x.shape
        if H % self.stride or W % self.stride:
            raise ValueError(f"{name}: H and W must be multiples of stride={self.stride}, got "
                             f"H={H}, W={W}")
        q = self.q(self.norm_q(x))
        k, v = self.kv(self.norm_kv(prior)).chunk(2, dim=1)
        a = self.a(self.norm_a(torch.cat([x, prior], dim=1)))
        y = mediator_attention(self._heads(q), self._heads(a), self._heads(k), self._heads(v))
        y = y.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(y)
