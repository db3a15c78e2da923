"""``MultiScaleQuantizer``: a drop-in for VAR's multi-scale residual quantizer (VectorQuantizer2).

Same constructor, state dict (``embedding.weight``, ``quant_resi.*``, ``ema_vocab_hit_SV``),
method names and results as VAR's, with every per-scale search going through the fused
``vq_area_lookup`` (area downsampling + nearest code + gather in one kernel on CUDA, the C++ op
on CPU). Shapes for VAR's VQVAE (vocab V = 4096, Cvae = 32, patch nums (1, 2, 3, 4, 5, 6, 8, 10,
13, 16), latent f [B, 32, 16, 16]):

* ``f_to_idxBl_or_fhat(f, to_fhat)``: 10 × idx [B, pn²] (or f_hat after each scale [B, 32, 16, 16])
* ``idxBl_to_var_input(idx_list)``: teacher-forcing tokens [B, 679, 32]
* ``embed_to_fhat(ms_h)``, ``get_next_autoregressive_input(si, SN, f_hat, h)`` (+ ``_h`` variant)
* ``forward(f)``: VQVAE training (straight-through f_hat, VQ loss with beta, vocab-hit EMA)
* ``quantize(f)`` -> (indices, f_hat, priors [B, 10, 32, 16, 16]) and ``scale_priors(idx_list)``:
  the φ-applied, upsampled embedding of each scale (VarFormer's S_v).

On CUDA with Triton and no gradient needed, ``quantize``/``f_to_idxBl_or_fhat`` replay the whole
10-scale loop from a CUDA graph (one graph per input shape; ``use_cuda_graph=False`` turns it
off).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _dispatch
from . import vq as _vq

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# --------------------------------------------------------------------------------------------
# φ: the residual 3×3 convolutions, and which one each scale uses
# --------------------------------------------------------------------------------------------
class Phi(nn.Conv2d):
    """φ(h) = (1 − r)·h + r·conv3x3(h), r = |quant_resi|; h [B, C, H, W]."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def _ticks(K: int) -> np.ndarray:
    return (np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4
            else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K))


def phi_index(at: float, K: int) -> int:
    """Which of K φ's a scale at relative position ``at`` = si/(SN−1) uses (VAR's rule, in
    float64: for VAR's 10 scales and K = 4 this is [0, 0, 1, 1, 1, 2, 2, 3, 3, 3])."""
    return int(np.argmin(np.abs(_ticks(K) - at)))


class PhiShared(nn.Module):
    """One φ for every scale (share_quant_resi = 1)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K φ's shared by neighbouring scales (share_quant_resi = K > 1; VAR uses K = 4)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi_ls[phi_index(at, len(self.qresi_ls))]


class PhiNonShared(nn.ModuleList):
    """One φ per scale (share_quant_resi = 0)."""

    def __getitem__(self, at: float) -> nn.Module:
        return super().__getitem__(phi_index(at, len(self)))


class QuantizeOutput(NamedTuple):
    indices: List[Tensor]     # per scale [B, ph·pw] int64
    f_hat: Tensor             # [B, C, H, W] quantised latent (sum of priors)
    priors: Tensor            # [B, SN, C, H, W] φ(upsampled embedding) of every scale


# --------------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------------
class MultiScaleQuantizer(nn.Module):
    """VAR's VectorQuantizer2 on the fused lookup (same arguments, defaults as VAR's VQVAE)."""

    def __init__(self, vocab_size: int = 4096, Cvae: int = 32, using_znorm: bool = False,
                 beta: float = 0.25, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence = VAR_PATCH_NUMS, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, backend: str = "auto", precision: str = "ieee",
                 use_cuda_graph: bool = True):
        super().__init__()
        if len(v_patch_nums) < 2:
            raise ValueError("MultiScaleQuantizer: v_patch_nums needs at least two scales, got "
                             f"{tuple(v_patch_nums)}")
        self.vocab_size, self.Cvae, self.using_znorm = vocab_size, Cvae, using_znorm
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi_ratio, self.beta = quant_resi, beta

        def phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()
        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([phi() for _ in range(default_qresi_counts
                                                                 or len(self.v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([phi() for _ in
                                                                range(share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.prog_si = -1          # VAR's progressive training switch; always -1 there
        self.backend, self.precision, self.use_cuda_graph = backend, precision, use_cuda_graph
        self._sq_key, self._sq = None, None
        self._graphs = {}
        self._maps = {}

    def extra_repr(self) -> str:
        return (f"{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta} | "
                f"S={len(self.v_patch_nums)}, quant_resi={self.quant_resi_ratio}, "
                f"backend={self.backend}")

    def eini(self, eini: float) -> None:
        """VAR's codebook initialisation (trunc-normal std=eini, or uniform for eini < 0)."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight.data, std=eini)
        elif eini < 0:
            self.embedding.weight.data.uniform_(-abs(eini) / self.vocab_size,
                                                abs(eini) / self.vocab_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "ema_vocab_hit_SV"   # as VAR: keep ours when the scale count differs
        if key in state_dict and state_dict[key].shape != self.ema_vocab_hit_SV.shape:
            state_dict[key] = self.ema_vocab_hit_SV.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- pieces -----------------------------------------------------------------------------
    def _phi(self, si: int, SN: int) -> nn.Module:
        return self.quant_resi[si / (SN - 1)]

    def _sqnorm(self) -> Tensor:
        w = self.embedding.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if key != self._sq_key:
            self._sq, self._sq_key = _vq.sqnorm(w), key
        return self._sq

    def _search(self, f_rest: Tensor, ph: int, pw: int, sq: Optional[Tensor] = None):
        """Nearest codes of f_rest pooled to ph×pw -> (idx [B·ph·pw], codes [B, C, ph, pw])."""
        E = self.embedding.weight
        if self.using_znorm:         # cosine variant of VAR (eager, not used by VAR's models)
            z = f_rest if (ph, pw) == tuple(f_rest.shape[2:]) else F.interpolate(
                f_rest, size=(ph, pw), mode="area")
            z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, self.Cvae), dim=-1)
            idx = torch.argmax(z @ F.normalize(E.data.T, dim=0), dim=1)
            return idx, E.data[idx].view(f_rest.shape[0], ph, pw, -1).permute(0, 3, 1, 2)
        idx, codes = _vq.vq_area_lookup(f_rest, (ph, pw), E, self._sqnorm() if sq is None else sq,
                                        backend=self.backend, precision=self.precision)
        return idx.reshape(-1), codes

    def _scale_maps(self, ph: int, pw: int, H: int, W: int):
        """One scale's area pooling P [ph·pw, H·W] and bicubic upsampling M [ph·pw, H·W] as
        matrices (F.interpolate of one-hot images: the same weights), cached per shape."""
        cache = self.__dict__.setdefault("_maps", {})      # (also for modules pickled before)
        maps = cache.get((ph, pw, H, W))
        if maps is None:
            eye = torch.eye(H * W).view(H * W, 1, H, W)
            P = F.interpolate(eye, size=(ph, pw), mode="area").view(H * W, ph * pw).T
            one = torch.eye(ph * pw).view(ph * pw, 1, ph, pw)
            M = F.interpolate(one, size=(H, W), mode="bicubic").view(ph * pw, H * W)
            maps = cache[(ph, pw, H, W)] = (P.contiguous(), M.contiguous())
        return maps

    def _cpu_csrc(self, f: Tensor) -> bool:
        """Whether the loop takes the CPU C++ schedule: inference-style search on CPU tensors
        with the C++ lookup chosen (not the reference path, not Triton's interpreter)."""
        return (f.device.type == "cpu" and not self.using_znorm
                and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and self.embedding.weight.requires_grad)
                and _vq._path(f, self.backend) == "csrc")

    def _embed(self, idx: Tensor, codes: Tensor, B: int, ph: int, pw: int) -> Tensor:
        """E[idx] as [B, C, ph, pw]: differentiable when the codebook needs a gradient, else the
        codes the lookup already gathered."""
        if torch.is_grad_enabled() and self.embedding.weight.requires_grad:
            return self.embedding(idx.view(B, ph, pw)).permute(0, 3, 1, 2)
        return codes

    def _patch_hws(self, v_patch_nums=None):
        return [(pn, pn) if isinstance(pn, int) else (int(pn[0]), int(pn[1]))
                for pn in (v_patch_nums or self.v_patch_nums)]

    def _check_f(self, f: Tensor, patch_hws) -> None:
        if not isinstance(f, Tensor) or f.dim() != 4:
            raise ValueError(f"MultiScaleQuantizer: f must be [B, {self.Cvae}, H, W], got "
                             f"{getattr(f, 'shape', type(f).__name__)}")
        if not f.is_floating_point():
            raise TypeError(f"MultiScaleQuantizer: f must be a float tensor, got {f.dtype}")
        if f.shape[1] != self.Cvae:
            raise ValueError(f"MultiScaleQuantizer: f has {f.shape[1]} channels, the codebook "
                             f"has Cvae={self.Cvae}")
        if tuple(f.shape[2:]) != patch_hws[-1]:
            raise ValueError(f"MultiScaleQuantizer: f's latent size {tuple(f.shape[2:])} must "
                             f"equal the last patch size {patch_hws[-1]} of v_patch_nums")

    def _loop(self, f: Tensor, patch_hws, sq: Optional[Tensor] = None, every_fhat: bool = True):
        """The residual loop on detached f -> (idx list [B, ph·pw], f_hat after each scale (only
        the last one unless ``every_fhat``), φ(up(E[idx])) of each scale)."""
        with torch.autocast(f.device.type, enabled=False):     # latent math in fp32, as VAR
            if f.device.type != "cpu" or torch.compiler.is_compiling():
                return self._loop_fp32(f, patch_hws, sq, every_fhat)
            # CPU: several short parallel regions per scale; on an oversubscribed machine run them
            # on the CPUs other processes leave free (one thread when none), see _ext.
            from . import _ext
            with _ext.load_aware():
                return self._loop_fp32(f, patch_hws, sq, every_fhat)

    def _loop_fp32(self, f: Tensor, patch_hws, sq: Optional[Tensor] = None,
                   every_fhat: bool = True):
        if self._cpu_csrc(f):
            return self._loop_cpu(f, patch_hws, sq, every_fhat)
        B, C, H, W = f.shape
        f_rest = f.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        SN = len(patch_hws)
        idx_list, fhats, priors = [], [], []
        for si, (ph, pw) in enumerate(patch_hws):
            if 0 <= self.prog_si < si:
                break
            idx, codes = self._search(f_rest, ph, pw, sq)
            h = self._embed(idx, codes, B, ph, pw)
            if si != SN - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self._phi(si, SN)(h.contiguous())
            f_hat.add_(h)
            f_rest.sub_(h)
            idx_list.append(idx.reshape(B, ph * pw))
            if every_fhat:          # a copy per scale only where they are asked for
                fhats.append(f_hat.clone())
            priors.append(h)
        if not every_fhat and idx_list:
            fhats.append(f_hat)
        return idx_list, fhats, priors

    def _loop_cpu(self, f: Tensor, patch_hws, sq: Optional[Tensor], every_fhat: bool):
        """The loop on CPU with the C++ lookup, channels last: f_rest, f_hat [B, H·W, C]; area
        pooling and bicubic upsampling one matmul each (token layout in and out), the lookup
        called without the op dispatcher, and φ with the f_hat / f_rest updates one C++ pass
        (``phi_update``) where the CPU has AVX2 or AVX-512; results as ``_loop_fp32``'s."""
        from . import _ext
        B, C, H, W = f.shape
        f_rest = f.detach().float().permute(0, 2, 3, 1).reshape(B, H * W, C).contiguous()
        f_hat = torch.zeros_like(f_rest)
        SN = len(patch_hws)
        E = self.embedding.weight.detach()
        sq = self._sqnorm() if sq is None else sq
        fused_phi = _ext.cpu_isa() in ("avx512", "avx2")

        def nchw(t):
            return t.view(B, H, W, C).permute(0, 3, 1, 2)
        idx_list, fhats, priors = [], [], []
        for si, (ph, pw) in enumerate(patch_hws):
            if 0 <= self.prog_si < si:
                break
            P, M = self._scale_maps(ph, pw, H, W)
            n = ph * pw
            z = f_rest if (ph, pw) == (H, W) else torch.matmul(P, f_rest)     # [B, n, C]
            idx, _, codes = _vq._lookup_csrc(z.view(-1, C), E, sq, True)
            codes = codes.view(B, n, C)
            h = codes if si == SN - 1 else torch.matmul(M.T, codes)             # [B, H·W, C]
            phi = self._phi(si, SN)
            # C % 8: the C++ pass would fall back to its slow portable variant otherwise
            if (fused_phi and isinstance(phi, Phi) and C % 8 == 0
                    and h.dtype == phi.weight.dtype == phi.bias.dtype == torch.float32
                    and not (torch.is_grad_enabled()
                             and (phi.weight.requires_grad or phi.bias.requires_grad))):
                k = phi.resi_ratio
                p = torch.ops.varformer_ext.phi_update(
                    h.contiguous().view(B, H, W, C), phi.weight.detach().contiguous(),
                    phi.bias.detach().contiguous(), 1 - k, k, f_hat.view(B, H, W, C),
                    f_rest.view(B, H, W, C)).view(B, H * W, C)
            else:
                p = phi(nchw(h).contiguous()).permute(0, 2, 3, 1).reshape(B, H * W, C)
                f_hat.add_(p)
                f_rest.sub_(p)
            idx_list.append(idx.view(B, n))
            if every_fhat:
                fhats.append(nchw(f_hat).contiguous())
            priors.append(nchw(p))
        if not every_fhat and idx_list:
            fhats.append(nchw(f_hat).contiguous())
        return idx_list, fhats, priors

    def _graphable(self, f: Tensor) -> bool:
        return (self.use_cuda_graph and f.is_cuda and not self.using_znorm
                and not (torch.is_grad_enabled() and any(p.requires_grad
                                                         for p in self.parameters()))
                and _dispatch.requested() != "reference" and self.backend in ("auto", "triton")
                and not torch.cuda.is_current_stream_capturing()
                and not torch.compiler.is_compiling())

    def _run(self, f: Tensor, v_patch_nums=None, every_fhat: bool = True):
        patch_hws = self._patch_hws(v_patch_nums)
        self._check_f(f, patch_hws)
        if not self._graphable(f):
            return self._loop(f, patch_hws, every_fhat=every_fhat)
        key = (tuple(f.shape), f.dtype, f.device, tuple(patch_hws),
               tuple(p.data_ptr() for p in self.parameters()))
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = _GraphedLoop(self, f, patch_hws)
        return g(f)

    # ---- VAR's API ----------------------------------------------------------------------------
    def f_to_idxBl_or_fhat(self, f_BChw: Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence] = None) -> List[Tensor]:
        """f [B, C, H, W] -> per scale idx [B, ph·pw] (or f_hat after that scale [B, C, H, W])."""
        idx_list, fhats, _ = self._run(f_BChw, v_patch_nums, every_fhat=to_fhat)
        return fhats if to_fhat else idx_list

    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[Tensor]) -> Optional[Tensor]:
        """Per-scale indices -> VAR's teacher-forcing input [B, L − first scale, C] (fp32, also
        under autocast)."""
        with torch.autocast(gt_ms_idx_Bl[0].device.type, enabled=False):
            return self._teacher_forcing(gt_ms_idx_Bl)

    def _teacher_forcing(self, gt_ms_idx_Bl: List[Tensor]) -> Optional[Tensor]:
        B, C = gt_ms_idx_Bl[0].shape[0], self.Cvae
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=torch.float32)
        pn_next = self.v_patch_nums[0]
        next_scales = []
        for si in range(SN - 1):
            if self.prog_si == 0 or (0 <= self.prog_si - 1 < si):
                break
            h = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn_next, pn_next)
            f_hat.add_(self._phi(si, SN)(F.interpolate(h, size=(H, W), mode="bicubic")))
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
                               .view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def embed_to_fhat(self, ms_h_BChw: List[Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False):
        """Per-scale embeddings [B, C, pn, pn] -> f_hat after each scale (or only the last)."""
        B = ms_h_BChw[0].shape[0]
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        out = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si in range(SN):
                h = ms_h_BChw[si]
                if si < SN - 1:
                    h = F.interpolate(h, size=(H, W), mode="bicubic")
                f_hat.add_(self._phi(si, SN)(h))
                out = f_hat if last_one else out + [f_hat.clone()]
        else:   # VAR's experimental variant: grow f_hat scale by scale
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat.add_(self._phi(si, SN)(ms_h_BChw[si]))
                out = f_hat if last_one else out + [f_hat]
        return out

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: Tensor, h_BChw: Tensor):
        """One AR step: f_hat += φ(up(h)) -> (f_hat, next scale's input [B, C, pn', pn'])."""
        f_hat, nxt, _ = self.get_next_autoregressive_input_h(si, SN, f_hat, h_BChw)
        return f_hat, nxt

    def get_next_autoregressive_input_h(self, si: int, SN: int, f_hat: Tensor, h_BChw: Tensor):
        """As ``get_next_autoregressive_input``, also returning φ(up(h)) (VarFormer's S_v slice)."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            h = self._phi(si, SN)(F.interpolate(h_BChw, size=(HW, HW), mode="bicubic"))
            f_hat.add_(h)
            pn = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area"), h
        h = self._phi(si, SN)(h_BChw)
        f_hat.add_(h)
        return f_hat, f_hat, h

    def forward(self, f_BChw: Tensor, ret_usages: bool = False):
        """VQVAE training step -> (f_hat straight-through [B, C, H, W], usages or None,
        mean VQ loss). The vocab-hit EMA is updated in training under torch.distributed, as
        VAR does."""
        import torch.distributed as tdist
        if f_BChw.dtype != torch.float32:
            f_BChw = f_BChw.float()
        patch_hws = self._patch_hws()
        self._check_f(f_BChw, patch_hws)
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        distributed = tdist.is_available() and tdist.is_initialized()
        SN = len(patch_hws)
        with torch.autocast(f_BChw.device.type, enabled=False):
            mean_vq_loss = 0.0
            for si, (ph, pw) in enumerate(patch_hws):
                idx, codes = self._search(f_rest, ph, pw)
                hit_V = idx.bincount(minlength=self.vocab_size).float()
                if self.training and distributed:
                    handler = tdist.all_reduce(hit_V, async_op=True)
                h = self.embedding(idx.view(B, ph, pw)).permute(0, 3, 1, 2)
                if si != SN - 1:
                    h = F.interpolate(h, size=(H, W), mode="bicubic")
                h = self._phi(si, SN)(h.contiguous())
                f_hat = f_hat + h
                f_rest -= h
                if self.training and distributed:
                    handler.wait()
                    ema = self.ema_vocab_hit_SV[si]
                    if self.record_hit == 0:
                        ema.copy_(hit_V)
                    elif self.record_hit < 100:
                        ema.mul_(0.9).add_(hit_V.mul(0.1))
                    else:
                        ema.mul_(0.99).add_(hit_V.mul(0.01))
                    self.record_hit += 1
                mean_vq_loss += (F.mse_loss(f_hat.data, f_BChw).mul_(self.beta)
                                 + F.mse_loss(f_hat, f_no_grad))
            mean_vq_loss *= 1.0 / SN
            f_hat = (f_hat.data - f_no_grad).add_(f_BChw)
        usages = None
        if ret_usages:
            world = tdist.get_world_size() if distributed else 1
            margin = world * (f_BChw.numel() / f_BChw.shape[1]) / self.vocab_size * 0.08
            usages = [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100
                      for si in range(SN)]
        return f_hat, usages, mean_vq_loss

    # ---- clean names for new code ----------------------------------------------------------------
    def quantize(self, f: Tensor, v_patch_nums: Optional[Sequence] = None) -> QuantizeOutput:
        """f [B, C, H, W] -> (indices per scale, f_hat [B, C, H, W], priors [B, SN, C, H, W])."""
        idx_list, fhats, priors = self._run(f, v_patch_nums, every_fhat=False)
        return QuantizeOutput(idx_list, fhats[-1], torch.stack(priors, 1))

    def teacher_forcing_input(self, indices: List[Tensor]) -> Optional[Tensor]:
        """Alias of ``idxBl_to_var_input``: [B, L − 1, C] for VAR's teacher forcing."""
        return self.idxBl_to_var_input(indices)

    def scale_priors(self, indices: List[Tensor]) -> Tensor:
        """Per-scale indices [B, pn²] -> φ(up(E[idx])) per scale [B, SN, C, H, W] (VarFormer's
        S_v; their sum over scales is f_hat)."""
        B = indices[0].shape[0]
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        out = []
        for si, pn in enumerate(self.v_patch_nums):
            h = self.embedding(indices[si]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            if si != SN - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            out.append(self._phi(si, SN)(h))
        return torch.stack(out, 1)


class _GraphedLoop:
    """The residual loop for one input shape captured in a CUDA graph (inference only)."""

    def __init__(self, q: MultiScaleQuantizer, f: Tensor, patch_hws):
        self.static_in = f.detach().clone()

        def body():
            sq = _vq.sqnorm(q.embedding.weight)         # recomputed per replay: weights may change
            return q._loop(self.static_in, patch_hws, sq)
        side = torch.cuda.Stream(f.device)
        side.wait_stream(torch.cuda.current_stream(f.device))
        with torch.cuda.stream(side):
            body()                                      # compile kernels, warm the allocator
        torch.cuda.current_stream(f.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = body()

    def __call__(self, f: Tensor):
        self.static_in.copy_(f)
        self.graph.replay()
        idx_list, fhats, priors = self.static_out
        return ([t.clone() for t in idx_list], [t.clone() for t in fhats],
                [t.clone() for t in priors])
