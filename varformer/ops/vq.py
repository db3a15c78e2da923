"""Nearest-codebook lookup of VAR's quantizer, without the N×V distance matrix.

    vq_lookup(z [N, C], codebook [V, C], codebook_sqnorm [V] = None) -> idx int64 [N]
    vq_area_lookup(f [B, C, SH, SW], size (PH, PW), codebook, codebook_sqnorm = None)
        -> (idx [B·PH·PW], codes [B, C, PH, PW])

Distances are VAR's: d = (|z|² + |e|²) − 2 z·e, in fp32 whatever the input dtype (fp64 for fp64
inputs), ties to the lowest index as ``torch.argmin``. ``vq_area_lookup`` first pools f to
PH×PW exactly as ``F.interpolate(mode="area")`` (VAR's per-scale downsampling), token order
(b, y, x), and gathers the chosen codes into VAR's [B, C, PH, PW] layout.

Implementations behind ``torch.ops.varformer.vq_lookup`` / ``vq_area_lookup`` (``backend``
argument, or ``VARFORMER_BACKEND`` when it is "auto"):
``triton`` (``varformer.kernels.vq_lookup``: token tiles × code tiles with a running minimum,
codebook split across programs for small N, area pooling and code gather fused in), ``csrc``
(C++ with OpenMP on CPU, CUDA C++ on CUDA; ``csrc/``, built on first use), ``reference``
(VAR's eager formula, in token chunks so that memory stays bounded). "auto" takes Triton on
CUDA and the C++ op on CPU (falling back to the reference, with a warning, where no compiler
is found). Nothing here is differentiable: VAR searches on detached features.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _dispatch

OP = "vq_lookup"
BACKENDS = ("auto", "triton", "csrc", "reference")
PRECISIONS = ("ieee", "tf32x3", "tf32")
_REF_CHUNK = 1 << 24          # distance-matrix elements per chunk on the reference path


def _ct(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def sqnorm(codebook: Tensor) -> Tensor:
    """|e|² per code, [V], in the compute dtype (fp32; fp64 for an fp64 codebook)."""
    return codebook.detach().to(_ct(codebook)).square().sum(1)


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def vq_lookup_eager(z: Tensor, codebook: Tensor) -> Tensor:
    """VAR's formula as written (materialises the [N, V] distance matrix): the baseline."""
    d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1)
    d.addmm_(z, codebook.T, alpha=-2, beta=1)
    return d.argmin(1)


def _lookup_reference(z, codebook, en, with_codes):
    ct = _ct(z, codebook)
    zc, e = z.to(ct), codebook.to(ct)
    en = sqnorm(codebook) if en is None else en.to(ct)
    N, V = z.shape[0], e.shape[0]
    idx = torch.empty(N, dtype=torch.int64, device=z.device)
    dist = torch.empty(N, dtype=ct, device=z.device)
    step = max(1, _REF_CHUNK // max(V, 1))
    for s in range(0, N, step):
        zs = zc[s:s + step]
        d = torch.sum(zs.square(), dim=1, keepdim=True) + en
        d.addmm_(zs, e.T, alpha=-2, beta=1)
        i = d.argmin(1)
        idx[s:s + step] = i
        dist[s:s + step] = d.gather(1, i[:, None]).squeeze(1)
    codes = codebook.index_select(0, idx) if with_codes else codebook.new_empty((0, z.shape[1]))
    return idx, dist, codes


def _lookup_csrc(z, codebook, en, with_codes):
    from . import _ext
    ct = _ct(z, codebook)
    if z.device.type == "cuda":
        ct = torch.float32 if ct == torch.float32 else None
        if ct is None:
            raise TypeError("varformer.ops.vq_lookup: the CUDA C++ path takes float32/float16/"
                            "bfloat16 inputs (fp32 distances), not float64")
    if en is None:      # on CPU the C++ op computes |e|² itself (no extra torch op per call)
        en = sqnorm(codebook) if z.device.type == "cuda" else z.new_empty(0, dtype=ct)
    # the C++ op has no gradient (the nearest code is piecewise constant): never record it
    z, codebook, en = z.detach(), codebook.detach(), en.detach()
    idx, dist, codes = _ext.lookup(z.to(ct).contiguous(), codebook.to(ct).contiguous(),
                                   en.to(ct).contiguous(), with_codes)
    return idx, dist, codes.to(codebook.dtype)


def _lookup_triton(z, codebook, en, with_codes, precision, splits=None):
    from varformer.kernels import vq_lookup as kern
    en = sqnorm(codebook) if en is None else en
    return kern.lookup(z, codebook, en.float().contiguous(), with_codes, precision, splits)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _path(z: Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        path = _dispatch.select(OP, z, cpu_path="csrc")
    elif backend == "triton":
        ok, why = _dispatch.triton_status(z.device.type)
        if not ok:
            raise RuntimeError(f"{OP}: backend='triton' but {why}")
        path = "triton"
    else:
        path = backend
    if path == "triton" and z.dtype == torch.float64:
        if backend == "triton" or _dispatch.requested() == "triton":
            raise TypeError(f"{OP}: the Triton kernels take float32/float16/bfloat16 inputs, "
                            "got float64; use backend='reference' or 'csrc'")
        path = "reference"
    if path == "csrc":
        from . import _ext
        ok, why = (_ext.cuda_status() if z.device.type == "cuda" else _ext.cpu_status())
        if not ok:
            if backend == "csrc":
                raise RuntimeError(f"{OP}: backend='csrc' but the C++ extension is unavailable: "
                                   f"{why}")
            _warn_once(f"varformer.ops.{OP}: C++ extension unavailable ({why}); using the "
                       "PyTorch reference path")
            path = "reference"
    return path


def _check(op, z, codebook, en, precision, z_name="z", z_ndim=2):
    _checks.tensor(op, z_name, z, ndim=z_ndim)
    _checks.tensor(op, "codebook", codebook, ndim=2, shape_hint="[V, C]")
    C = z.shape[1] if z_ndim == 4 else z.shape[-1]
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook is empty (V = 0); it needs at least one code")
    if codebook.shape[1] != C:
        raise ValueError(f"{op}: codebook has {codebook.shape[1]} channels but {z_name} has {C}")
    if codebook.device != z.device:
        raise ValueError(f"{op}: codebook is on {codebook.device} but {z_name} is on {z.device}")
    if en is not None:
        _checks.tensor(op, "codebook_sqnorm", en, ndim=1, shape_hint="[V]")
        if en.shape[0] != codebook.shape[0] or en.device != z.device:
            raise ValueError(f"{op}: codebook_sqnorm must be [{codebook.shape[0]}] on {z.device}, "
                             f"got {tuple(en.shape)} on {en.device}")
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {precision!r}")


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("varformer::vq_lookup", mutates_args=())
def _vq_lookup_op(z: Tensor, codebook: Tensor, codebook_sqnorm: Optional[Tensor],
                  with_codes: bool, backend: str, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (idx int64 [N], dist [N] fp32 (fp64 for fp64 inputs), codes [N, C] or [0, C])."""
    if z.shape[0] == 0:
        return _lookup_reference(z, codebook, codebook_sqnorm, with_codes)
    path = _path(z, backend)
    if path == "triton":
        return _lookup_triton(z, codebook, codebook_sqnorm, with_codes, precision)
    if path == "csrc":
        return _lookup_csrc(z, codebook, codebook_sqnorm, with_codes)
    return _lookup_reference(z, codebook, codebook_sqnorm, with_codes)


@_vq_lookup_op.register_fake
def _(z, codebook, codebook_sqnorm, with_codes, backend, precision):
    N, C = z.shape
    return (z.new_empty((N,), dtype=torch.int64), z.new_empty((N,), dtype=_ct(z, codebook)),
            codebook.new_empty((N if with_codes else 0, C)))


def vq_lookup(z: Tensor, codebook: Tensor, codebook_sqnorm: Optional[Tensor] = None, *,
              return_codes: bool = False, return_distance: bool = False, backend: str = "auto",
              precision: str = "ieee"):
    """Index of the nearest code for every token.

    z [N, C] and codebook [V, C] (float dtypes, one device); codebook_sqnorm [V] = |e|² if
    cached (see ``sqnorm``). Returns idx int64 [N]; with ``return_codes`` also
    codebook[idx] [N, C], with ``return_distance`` also the minimum distance [N] (in that
    order). ``precision`` ("ieee", "tf32x3", "tf32") sets the Triton dot for fp32 inputs."""
    _check(OP, z, codebook, codebook_sqnorm, precision)
    idx, dist, codes = torch.ops.varformer.vq_lookup(
        z.detach(), codebook.detach(),
        None if codebook_sqnorm is None else codebook_sqnorm.detach(), return_codes, backend,
        precision)
    out = (idx,) + ((codes,) if return_codes else ()) + ((dist,) if return_distance else ())
    return out[0] if len(out) == 1 else out


# --------------------------------------------------------------------------------------------
# area pooling + lookup + gather (one VAR scale)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("varformer::vq_area_lookup", mutates_args=())
def _vq_area_lookup_op(f: Tensor, ph: int, pw: int, codebook: Tensor,
                       codebook_sqnorm: Optional[Tensor], backend: str,
                       precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (idx [B·ph·pw], dist [B·ph·pw], codes [B, C, ph, pw])."""
    B, C, SH, SW = f.shape
    path = _path(f, backend) if f.numel() else "reference"
    if path == "triton":
        from varformer.kernels import vq_lookup as kern
    if path == "triton" and kern.fuses_area(C, precision if f.dtype == torch.float32 else "ieee"):
        en = sqnorm(codebook) if codebook_sqnorm is None else codebook_sqnorm
        return kern.area_lookup(f, (ph, pw), codebook, en.float().contiguous(), precision)
    z = f if (ph, pw) == (SH, SW) else F.interpolate(f, size=(ph, pw), mode="area")
    z = z.permute(0, 2, 3, 1).reshape(-1, C)
    if path == "triton":
        idx, dist, codes = _lookup_triton(z, codebook, codebook_sqnorm, True, precision)
    elif path == "csrc":
        idx, dist, codes = _lookup_csrc(z, codebook, codebook_sqnorm, True)
    else:
        idx, dist, codes = _lookup_reference(z, codebook, codebook_sqnorm, True)
    return idx, dist, codes.view(B, ph, pw, C).permute(0, 3, 1, 2).contiguous()


@_vq_area_lookup_op.register_fake
def _(f, ph, pw, codebook, codebook_sqnorm, backend, precision):
    B, C = f.shape[:2]
    n = B * ph * pw
    return (f.new_empty((n,), dtype=torch.int64), f.new_empty((n,), dtype=_ct(f, codebook)),
            codebook.new_empty((B, C, ph, pw)))


def vq_area_lookup(f: Tensor, size, codebook: Tensor, codebook_sqnorm: Optional[Tensor] = None,
                   *, backend: str = "auto", precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """One VAR scale: f [B, C, SH, SW] area-pooled to ``size`` (PH, PW) (no pooling when equal
    to (SH, SW)), nearest codes -> (idx int64 [B, PH·PW], codes [B, C, PH, PW])."""
    _check("vq_area_lookup", f, codebook, codebook_sqnorm, precision, z_name="f", z_ndim=4)
    ph, pw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not (1 <= ph <= f.shape[2] and 1 <= pw <= f.shape[3]):
        raise ValueError(f"vq_area_lookup: size must be between 1 and f's spatial size "
                         f"{tuple(f.shape[2:])} (area pooling only shrinks), got {(ph, pw)}")
    idx, _, codes = torch.ops.varformer.vq_area_lookup(
        f.detach(), ph, pw, codebook.detach(),
        None if codebook_sqnorm is None else codebook_sqnorm.detach(), backend, precision)
    return idx.view(f.shape[0], ph * pw), codes
