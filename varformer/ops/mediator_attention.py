"""Mediator attention (VarFormer's AFT, paper Eq. 5 without the residual).

    out = softmax(Q Mᵀ · s) · (softmax(M Kᵀ · s) · V),   s = scale or d^-1/2

q [B, H, N, d], m [B, H, L, d] (the L mediators), k/v [B, H, Nk, d] -> out [B, H, N, d].

Implementations behind ``torch.ops.varformer.mediator_attention`` (chosen by ``_dispatch``):

* ``triton`` — ``varformer.kernels.mediator_attention``: two flash-style stages, split-KV for
  stage 1, recomputing backward; no N×L / L×N map in forward or backward.
* ``cpu`` — float32/float64 on CPUs with AVX2+FMA or AVX-512: the C++ kernel of
  ``csrc/attention_cpu.cpp`` (``torch.ops.varformer_ext.attention_fwd/_bwd``, one call per
  stage: tiles of query blocks x key chunks with the scores in cache, a register-tiled GEMM for
  the CPU's widest ISA — 6x16 AVX2, 12x32 AVX-512 —, load-aware threads, deterministic partial
  sums). Otherwise (float16/bfloat16; CPUs without AVX2; no C++ build): PyTorch's flash CPU
  kernels (no N×L maps), each stage cut into units (query blocks; key chunks merged by
  log-sum-exp) that single-threaded worker threads pull dynamically. ``CPU_KERNEL`` forces one.
* ``reference`` — plain matmul/softmax in fp32 (fp64 for fp64 inputs) with an explicit backward.

The registered op returns ``(out, summary, lse_summary, lse_out)``: the summary ``S = softmax(M
Kᵀ s) V`` [B, H, L, d] and the natural-log log-sum-exps of both softmaxes ([B, H, L], [B, H, N];
fp32, fp64 for fp64 inputs) are what the backward needs. ``mediator_attention`` returns ``out``.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
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


# --------------------------------------------------------------------------------------------
# CPU path: each attention is cut into units (head ranges, query blocks or key chunks), each
# unit one single-threaded call of PyTorch's flash CPU kernels; worker threads pull units in
# order. No OpenMP region or barrier per unit: a worker the OS deschedules (a busy machine)
# delays only the units it holds, the others keep pulling. Workers flush denormals (FTZ/DAZ,
# their own MXCSR): exp of very negative scores otherwise takes a microcode slow path (>10×).
# Attentions under CPU_INLINE_FLOPS run as one flash call on torch's threads instead.
# --------------------------------------------------------------------------------------------
_SDPA = _aten._scaled_dot_product_flash_attention_for_cpu
_SDPA_BWD = _aten._scaled_dot_product_flash_attention_for_cpu_backward
CPU_UNIT_ROWS = 256          # least rows per query block (the flash kernel's own block)
CPU_UNIT_KEYS = 512          # least keys per key chunk
CPU_INLINE_FLOPS = 1e9       # below this, one flash call on torch's threads (units don't pay:
                             # measured 1.5-3x slower than it at B1 N4096 L256 d160 and smaller)


def _cpu_workers(backward: bool = False) -> int:
    """Threads for a call: torch's count; for the backward fewer on a busy machine (the CPUs
    other processes' runnable threads leave free, at least 1: ``_ext.load_aware_threads``, the
    rule of the C++ kernels). Under ``--load 2`` on 2 cores the flash backward's parallel
    regions wait on descheduled threads: N = 4096 fwd+bwd measured 0.49x eager (median 1.4 s,
    p80 4.3 s) before this rule, 0.91x and 1.26x in two runs with it. The forward keeps its
    threads: single-threaded it fell from 2.3x to 0.87x eager there."""
    n = max(1, torch.get_num_threads())
    if not backward:
        return n
    from . import _ext
    return max(1, _ext.load_aware_threads(n))


def _run_units(n_units: int, fn, workers: int) -> None:
    """fn(u) for u in range(n_units) on min(workers, n_units) threads, each single-threaded,
    pulling the next unit when done (dynamic). Re-raises the first error of any unit."""
    nxt = itertools.count()
    errors: list = []
    inference = torch.is_inference_mode_enabled()

    def work():
        try:
            torch.set_num_threads(1)         # this thread's OpenMP/MKL count (thread-local)
            torch.set_flush_denormal(True)   # this thread's MXCSR only
            with torch.inference_mode(inference), torch.no_grad():
                while not errors:
                    u = next(nxt)
                    if u >= n_units:
                        return
                    fn(u)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    started = []
    try:
        for i in range(min(workers, n_units)):
            t = threading.Thread(target=work, name=f"varformer-cpu-{i}", daemon=True)
            t.start()
            started.append(t)
    finally:
        for t in started:
            t.join()
    if errors:
        raise errors[0]


@contextlib.contextmanager
def _num_threads(n: int):
    """torch's thread count set to n inside; restores it, also the default that new threads
    start from (set_num_threads in a worker sets it too). No change where it already is n."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_threaded():
    """The calling thread's small ops (merges, sums) without OpenMP regions."""
    return _num_threads(1)


def _cpu_context(G: int, N: int, L: int, Nk: int, d: int, workers: int):
    """Single-threaded caller for the unit path; no thread-count change at all where both
    attentions are under CPU_INLINE_FLOPS (each one flash call on torch's threads)."""
    if 4.0 * G * max(N, Nk) * L * d < CPU_INLINE_FLOPS:
        return contextlib.nullcontext()
    return _single_threaded()


def _ranges(n: int, parts: int) -> list:
    parts = max(1, min(n, parts))
    return [((n * i) // parts, (n * (i + 1)) // parts) for i in range(parts)]


def _cpu_plan(G: int, Tq: int, Tk: int, workers: int):
    """Units of one attention q [G,Tq,d] over k/v [G,Tk,d]: (head ranges, query ranges, key
    ranges), at least max(8, 2·workers) units where the sizes allow. The longer of Tq and Tk
    is split (key chunks give partial results that the caller merges)."""
    target = max(8, 2 * workers)
    if G >= target:
        return _ranges(G, target), [(0, Tq)], [(0, Tk)]
    per_head = -(-target // G)
    heads = _ranges(G, G)
    if Tq >= Tk:
        return heads, _ranges(Tq, min(per_head, max(1, Tq // CPU_UNIT_ROWS))), [(0, Tk)]
    return heads, [(0, Tq)], _ranges(Tk, min(per_head, max(1, Tk // CPU_UNIT_KEYS)))


def _unit(t: Tensor, g: tuple, r: tuple) -> Tensor:
    """[G, T, d] -> the [1, heads, rows, d] view the flash kernel takes."""
    return t[g[0]:g[1], r[0]:r[1]].unsqueeze(0)


def _cpu_attention_fwd(q, k, v, scale, workers):
    """softmax(q kᵀ s) v and its log-sum-exp. q [G,Tq,d], k/v [G,Tk,d] contiguous ->
    (out [G,Tq,d] in q's dtype, lse [G,Tq] fp32, fp64 for fp64)."""
    G, Tq, d = q.shape
    Tk = k.shape[1]
    lt = _lse_dtype(q.dtype)
    if 4.0 * G * Tq * Tk * d < CPU_INLINE_FLOPS:
        with _num_threads(workers):
            out, lse = _SDPA(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False,
                             scale=scale)
        return out[0].contiguous(), lse[0].to(lt).contiguous()
    heads, qr, kr = _cpu_plan(G, Tq, Tk, workers)
    units = [(g, a, c) for g in heads for a in qr for c in range(len(kr))]
    out = torch.empty_like(q)
    lse = torch.empty(G, Tq, dtype=lt)
    if len(kr) == 1:
        def run(u):
            g, a, _ = units[u]
            o, l = _SDPA(_unit(q, g, a), _unit(k, g, kr[0]), _unit(v, g, kr[0]), 0.0, False,
                         scale=scale)
            out[g[0]:g[1], a[0]:a[1]] = o[0]
            lse[g[0]:g[1], a[0]:a[1]] = l[0]
        _run_units(len(units), run, workers)
        return out, lse
    # key chunks: partial (out_c, lse_c) per chunk, merged by their log-sum-exps in chunk order
    ct = _compute_dtype(q.dtype)
    part_o = torch.empty(len(kr), G, Tq, d, dtype=ct)
    part_l = torch.empty(len(kr), G, Tq, dtype=lt)

    def run(u):
        g, a, c = units[u]
        o, l = _SDPA(_unit(q, g, a), _unit(k, g, kr[c]), _unit(v, g, kr[c]), 0.0, False,
                     scale=scale)
        part_o[c, g[0]:g[1], a[0]:a[1]] = o[0]
        part_l[c, g[0]:g[1], a[0]:a[1]] = l[0]
    _run_units(len(units), run, workers)
    top = part_l.amax(0)
    w = (part_l - top).exp_()
    total = w.sum(0)
    w.div_(total).unsqueeze_(-1)
    out.copy_(part_o.mul_(w).sum(0))
    torch.add(top, total.log_(), out=lse)
    return out, lse


def _cpu_attention_bwd(do, q, k, v, out, lse, scale, workers):
    """Gradients (dq, dk, dv) of softmax(q kᵀ s) v from its output and log-sum-exp (the
    flash kernel recomputes the probabilities). Shapes as ``_cpu_attention_fwd``; contiguous."""
    G, Tq, d = q.shape
    Tk = k.shape[1]
    if 4.0 * G * Tq * Tk * d < CPU_INLINE_FLOPS:
        with _num_threads(workers):
            gq, gk, gv = _SDPA_BWD(do.unsqueeze(0), q.unsqueeze(0), k.unsqueeze(0),
                                   v.unsqueeze(0), out.unsqueeze(0), lse.unsqueeze(0), 0.0,
                                   False, scale=scale)
        return gq[0], gk[0], gv[0]
    heads, qr, kr = _cpu_plan(G, Tq, Tk, workers)
    units = [(g, a, c) for g in heads for a in range(len(qr)) for c in range(len(kr))]
    ct = _compute_dtype(q.dtype)
    # a gradient summed over the other side's blocks gets one partial per block (fixed order)
    dq = torch.empty_like(q) if len(kr) == 1 else torch.empty(len(kr), G, Tq, d, dtype=ct)
    dk = torch.empty_like(k) if len(qr) == 1 else torch.empty(len(qr), G, Tk, d, dtype=ct)
    dv = torch.empty_like(v) if len(qr) == 1 else torch.empty(len(qr), G, Tk, d, dtype=ct)

    def run(u):
        g, a, c = units[u]
        rq, rk = qr[a], kr[c]
        gq, gk, gv = _SDPA_BWD(_unit(do, g, rq), _unit(q, g, rq), _unit(k, g, rk),
                               _unit(v, g, rk), _unit(out, g, rq),
                               lse[g[0]:g[1], rq[0]:rq[1]].unsqueeze(0), 0.0, False, scale=scale)
        (dq if len(kr) == 1 else dq[c])[g[0]:g[1], rq[0]:rq[1]] = gq[0]
        (dk if len(qr) == 1 else dk[a])[g[0]:g[1], rk[0]:rk[1]] = gk[0]
        (dv if len(qr) == 1 else dv[a])[g[0]:g[1], rk[0]:rk[1]] = gv[0]
    _run_units(len(units), run, workers)
    if len(kr) > 1:
        dq = dq.sum(0).to(q.dtype)
    if len(qr) > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    return dq, dk, dv


# "auto": the C++ kernel where it is built, has a register tile for this CPU (AVX2 or AVX-512)
# and the dtype is float32 or float64; "csrc": the C++ kernel for float32/float64 (an error if
# it is unavailable);
# "flash": PyTorch's flash kernels in units. Process-wide; for tests and benchmarks.
CPU_KERNEL = {"value": "auto"}
_EXT_FWD = "varformer_ext::attention_fwd"
_FAKES: list = []


def _register_ext_fakes() -> None:
    """Fake (meta) kernels of the C++ ops, so that they trace and pass opcheck on their own."""
    if _FAKES:
        return

    @torch.library.register_fake(_EXT_FWD)
    def _(q, k, v, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2])

    @torch.library.register_fake("varformer_ext::attention_bwd")
    def _(grad_out, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _FAKES.append(True)


def cpu_kernel_status() -> tuple[bool, str]:
    """(usable, reason if not) of the C++ CPU kernel; builds the extension on first call."""
    from . import _ext
    return _ext.op_kernel_status(_EXT_FWD, "attention", _register_ext_fakes)


def _use_csrc(dtype: torch.dtype) -> bool:
    mode = CPU_KERNEL["value"]
    if mode not in ("auto", "csrc", "flash"):
        raise ValueError(f"{OP}: CPU_KERNEL must be auto, csrc or flash, got {mode!r}")
    if mode == "flash" or dtype not in (torch.float32, torch.float64):
        return False
    ok, why = cpu_kernel_status()
    if mode == "csrc":
        if not ok:
            raise RuntimeError(f"{OP}: CPU_KERNEL='csrc' but the C++ kernel is unavailable: {why}")
        return True
    if not ok:
        return False
    return _kernel_isa() in ("avx2", "avx512")


def _kernel_isa() -> str:
    """The C++ kernel's register-tile variant in this process: avx512, avx2 or baseline."""
    return torch.ops.varformer_ext.attention_isa()


def _heads_flat(t: Tensor) -> Tensor:
    return t.contiguous().view(-1, t.shape[-2], t.shape[-1])


def _stage_fns(dtype, G, N, L, Nk, d, backward):
    """(context, attention forward, attention backward) of one call's two stages: the C++
    kernel (its own load-aware threads), else the flash units (single-threaded caller)."""
    if _use_csrc(dtype):
        ext = torch.ops.varformer_ext
        return (contextlib.nullcontext(),
                lambda q, k, v, scale: ext.attention_fwd(q, k, v, float(scale)),
                lambda do, q, k, v, o, lse, scale: ext.attention_bwd(do, q, k, v, o, lse,
                                                                     float(scale)))
    workers = _cpu_workers(backward=backward)
    return (_cpu_context(G, N, L, Nk, d, workers),
            lambda q, k, v, scale: _cpu_attention_fwd(q, k, v, scale, workers),
            lambda do, q, k, v, o, lse, scale: _cpu_attention_bwd(do, q, k, v, o, lse, scale,
                                                                  workers))


def _fwd_cpu(q, m, k, v, scale):
    B, H, N, d = q.shape
    L = m.shape[2]
    ctx, attn, _ = _stage_fns(q.dtype, B * H, N, L, k.shape[2], d, backward=False)
    with ctx:
        q3, m3, k3, v3 = (_heads_flat(t) for t in (q, m, k, v))
        s, lse_s = attn(m3, k3, v3, scale)
        out, lse_o = attn(q3, m3, s, scale)
    return (out.view(B, H, N, d), s.view(B, H, L, d), lse_s.view(B, H, L),
            lse_o.view(B, H, N))


def _bwd_cpu(g_out, g_s, q, m, k, v, out, s, lse_s, lse_o, scale):
    G, d = q.shape[0] * q.shape[1], q.shape[-1]
    ctx, _, attn_bwd = _stage_fns(q.dtype, G, q.shape[2], m.shape[2], k.shape[2], d,
                                  backward=True)
    with ctx:
        q3, m3, k3, v3, o3, s3, g3 = (_heads_flat(t) for t in (q, m, k, v, out, s, g_out))
        dq, dm2, ds = attn_bwd(g3, q3, m3, s3, o3, lse_o.reshape(G, -1).contiguous(), scale)
        if g_s is not None:
            ds = (ds.to(_compute_dtype(q.dtype)) + _heads_flat(g_s)).to(q.dtype)
        dm1, dk, dv = attn_bwd(ds, m3, k3, v3, s3, lse_s.reshape(G, -1).contiguous(), scale)
        dm = (dm1.to(_compute_dtype(q.dtype)) + dm2).to(q.dtype)
    return dq.view(q.shape), dm.view(m.shape), dk.view(k.shape), dv.view(v.shape)


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
                                    lse_summary: Tensor, lse_out: Tensor, scale: float,
                                    backend: str = "auto") -> tuple[Tensor, Tensor, Tensor,
                                                                    Tensor]:
    """-> (grad_q, grad_m, grad_k, grad_v), recomputed from the saved log-sum-exps; ``backend``:
    the request (auto, triton, reference) the forward ran under."""
    if q.numel() == 0:
        return _bwd_reference(grad_out, grad_summary, q, m, k, v, out, summary, lse_summary,
                              lse_out, scale)
    grads = _BWD[_dispatch.select(OP, q, want=backend)](grad_out.contiguous(), grad_summary, q, m, k, v, out,
                                           summary, lse_summary, lse_out, scale)
    return tuple(g.contiguous() for g in grads)  # the fake promises dense gradients


@_mediator_attention_backward_op.register_fake
def _(grad_out, grad_summary, q, m, k, v, out, summary, lse_summary, lse_out, scale,
      backend="auto"):
    return q.new_empty(q.shape), m.new_empty(m.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, m, k, v, scale = inputs
    out, summary, lse_s, lse_o = output
    ctx.save_for_backward(q, m, k, v, out, summary, lse_s, lse_o)
    ctx.scale = scale
    ctx.backend = _dispatch.requested()     # the backward differentiates the path that ran
    ctx.mark_non_differentiable(lse_s, lse_o)


def _backward(ctx, grad_out, grad_summary, _grad_lse_s, _grad_lse_o):
    q, m, k, v, out, summary, lse_s, lse_o = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dm, dk, dv = _mediator_attention_backward_op(grad_out, grad_summary, q, m, k, v, out,
                                                     summary, lse_s, lse_o, ctx.scale,
                                                     ctx.backend)
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
