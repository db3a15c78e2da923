"""VarFormer (CVPR 2025): all-in-one restoration guided by the multi-scale priors of a VAR.

forward(lq [B, 3, 256, 256] in [-1, 1]) -> restored [B, 3, 256, 256] in [-1, 1]:

1. VQVAE encoder on lq -> f [B, 32, 16, 16] and features E_vq (Level_0..4, middle).
2. ``Adapter`` (``ft_layers``): f -> f_a; the multi-scale quantizer gives f_a's indices and the
   teacher-forcing tokens tf [B, 679, 32].
3. VAR branch: the 10 scales run autoregressively with KV caches; after each of the first
   ``n_cross`` blocks a cross-attention (queries: tf tokens of the scale, keys/values: the VAR
   hidden state) is injected. Greedy tokens give the per-scale priors S_v [B, 10, 32, 16, 16]
   (φ(upsampled embedding) per scale) and the predicted clean latent f_hat.
4. Restoration U-Net (ch 160, 5 levels): at levels 1..4 of the main encoder and decoder, a
   ``WeightPredictor`` turns S_v into a prior map P (per-image softmax weights over the scales,
   guided by the VQ features), ``DegradationAwareEnhancement`` fuses the feature with P per pixel,
   and ``AdaptiveFeatureTransform`` (mediator attention, ``varformer.ops.MediatorAttention``)
   transfers P into the feature; the decoder mixes in the encoder features with learned
   sigmoid weights (mix-up skip) and blends the output with the input (learned α).

Modes (``mode``):
* ``"official"`` — the released checkpoint's computation: the CFG-doubled batch with the null
  class and t = cfg·si/9 (``cfg`` = 0.5 as our spec of the newest official commit says; older
  official versions default to 1.5), the official cross-attention with its head/batch reshape (which mixes
  heads and batch rows), no residual around it, concatenated weighted scale priors.
* ``"paper"`` — per-sample cross-attention with a residual, one copy of the batch (no CFG),
  the VAR branch without gradient (the adapter still trains through its straight-through
  latent), and the weighted scale priors summed as the paper's Eq. 3 (``concat_priors=True``
  keeps the official concatenation).

``use_fused_kernels`` (None: the dispatch rule, fused on CUDA; False: every op on its PyTorch
reference) and ``checkpoint_levels`` (activation checkpointing of the prior modules) change no
parameter or state-dict key. On CPU the fused model runs each forward, and the backward from its
outputs, on the threads other processes leave free (``varformer.ops._ext.load_aware``; at
least one, all of torch's on a quiet machine; ``VARFORMER_LOAD_AWARE=0`` turns it off): on an
oversubscribed machine its many short parallel regions otherwise wait on descheduled threads.

Module and parameter names equal the official ``VarFormer2`` (``checkpoints/
varformer_released_d16_state_dict.tsv``): the VQVAE and VAR parts sit at the top level as there.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from varformer.ops import _dispatch, _ext
from varformer.ops.mediator_attention import MediatorAttention
from varformer.ops.quantizer import VAR_PATCH_NUMS, MultiScaleQuantizer
from varformer.ops.swin import ResidualSwinTransformerBlock

from .adapter import Adapter
from .var import VAR
from .vqvae import (VQVAE, Downsample2x, Normalize, Upsample2x, make_level, make_mid,
                    run_level, run_mid)

MODES = ("official", "paper")
AdaptiveFeatureTransform = MediatorAttention     # the paper's name for the AFT block


# --------------------------------------------------------------------------------------------
# VAR-side cross-attention (paper Sec. 3.1)
# --------------------------------------------------------------------------------------------
class CrossAttentionAR(nn.Module):
    """Queries from the adapter's teacher-forcing tokens f_d [B', l, C], keys/values from the VAR
    hidden state f_var [B', l, C] of the same scale; 16 heads, scale 0.25/√hd, q and v biases.

    ``official=True`` reproduces the released code's output layout: the [heads, B', l, hd]
    result is read back as [B', l, C] without moving heads next to channels, which mixes heads,
    tokens and batch rows; ``official=False`` is standard per-sample multi-head attention."""

    def __init__(self, block_idx: int, dim: int, num_heads: int = 16):
        super().__init__()
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, dim // num_heads
        self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_q = nn.Linear(dim, dim, bias=False)
        self.mat_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, f_d: Tensor, f_var: Tensor, official: bool = True) -> Tensor:
        B, L, C = f_d.shape
        H, hd = self.num_heads, self.head_dim
        q = F.linear(f_d, self.mat_q.weight, self.q_bias).view(B, L, H, hd).transpose(1, 2)
        kv = F.linear(f_var, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(B, L, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)     # [B, H, L, hd]
        if official:
            o = o.transpose(0, 1).reshape(B, L, C)      # head-major buffer read batch-major
        else:
            o = o.transpose(1, 2).reshape(B, L, C)
        return self.proj(o)


# --------------------------------------------------------------------------------------------
# DAE: weight predictor + projection (official WPMoudle4_norm) and per-pixel fusion
# --------------------------------------------------------------------------------------------
def _rstb_pair(dim: int, res: int, heads: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualSwinTransformerBlock(dim, (res, res), depth=2, num_heads=heads,
                                                       window_size=4) for _ in range(2)])


def _swin(blocks: nn.ModuleList, x: Tensor) -> Tensor:
    B, C, H, W = x.shape
    t = x.flatten(2).transpose(1, 2)
    for blk in blocks:
        t = blk(t, (H, W))
    return t.transpose(1, 2).reshape(B, C, H, W)


class PriorProjection(nn.Module):
    """The projection head M of paper Eq. 3: per-image weights w [B, SN] (None: uniform, 1/SN)
    times the scale priors S_v [B, SN, 32, 16, 16], concatenated ([B, SN·32, 16, 16], official)
    or summed ([B, 32, 16, 16], paper Eq. 3), instance-normalised, 1×1 conv to out_dim and
    brought to H×W (nearest ×up_r + 3×3 conv) -> P [B, out_dim, H, W]. Alone (uniform weights)
    it is the prior path of a model built without DAE but with AFT."""

    def __init__(self, out_dim: int, up_r: int, n_scales: int = 10, prior_ch: int = 32,
                 concat: bool = True):
        super().__init__()
        self._build_head(out_dim, up_r, n_scales, prior_ch, concat)

    def _build_head(self, out_dim, up_r, n_scales, prior_ch, concat):
        self.up_r, self.concat, self.n_scales = up_r, concat, n_scales
        cin = n_scales * prior_ch if concat else prior_ch
        self.norm = nn.InstanceNorm2d(cin)
        self.conv_out = nn.Conv2d(cin, out_dim, 1)
        if up_r > 1:
            self.upsample = Upsample2xBy(out_dim, up_r)

    def project(self, w: Optional[Tensor], s_v: Tensor) -> Tensor:
        if w is None:
            w = s_v.new_full(s_v.shape[:2], 1.0 / s_v.shape[1])
        s_w = w[:, :, None, None, None] * s_v
        s_w = s_w.flatten(1, 2) if self.concat else s_w.sum(1)
        p = self.conv_out(self.norm(s_w))
        return self.upsample(p) if self.up_r > 1 else p

    def forward(self, s_v: Tensor) -> Tensor:
        return self.project(None, s_v)


class WeightPredictor(PriorProjection):
    """Prior projector (DAE's weight predictor + M): guide g [B, dim_in, H, W] -> 2 RSTBs ->
    1×1 conv -> mean over pixels -> per-image softmax weights over the scales w [B, SN] ->
    ``PriorProjection.project(w, S_v)`` -> P [B, out_dim, H, W]."""

    def __init__(self, dim_in: int, out_dim: int, up_r: int, resolution: int, heads: int,
                 n_scales: int = 10, prior_ch: int = 32, concat: bool = True):
        nn.Module.__init__(self)
        self.swin_blocks = _rstb_pair(dim_in, resolution, heads)
        self.conv1x1 = nn.Conv2d(dim_in, n_scales, 1)
        self._build_head(out_dim, up_r, n_scales, prior_ch, concat)

    def scale_weights(self, g: Tensor) -> Tensor:
        """g [B, dim_in, H, W] -> w [B, SN] (softmax over the scales)."""
        return self.conv1x1(_swin(self.swin_blocks, g)).mean((2, 3)).softmax(1)

    def forward(self, g: Tensor, s_v: Tensor) -> Tensor:
        return self.project(self.scale_weights(g), s_v)


class Upsample2xBy(nn.Module):
    """Nearest ×r, then a 3×3 conv (official key ``upsample.conv``)."""

    def __init__(self, channels: int, r: int):
        super().__init__()
        self.r = r
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.r, mode="nearest"))


class DegradationAwareEnhancement(nn.Module):
    """Per-pixel two-way fusion (paper Eq. 4): cat(h, P) -> 2 RSTBs at width 2·dim -> 1×1 conv to
    2 channels -> softmax -> w1·h + w2·P. Returns (fused [B, dim, H, W], logit of w1)."""

    def __init__(self, dim: int, resolution: int, heads: int):
        super().__init__()
        self.swin_blocks = _rstb_pair(2 * dim, resolution, heads)
        self.conv1x1 = nn.Conv2d(2 * dim, 2, 1)

    def fusion_logits(self, h: Tensor, p: Tensor) -> Tensor:
        """-> [B, 2, H, W]; their softmax over dim 1 is (w1^g, w2^g) of Eq. 4."""
        return self.conv1x1(_swin(self.swin_blocks, torch.cat((h, p), 1)))

    def forward(self, h: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        logits = self.fusion_logits(h, p)
        w = logits.softmax(1)
        return w[:, :1] * h + w[:, 1:] * p, logits[:, :1]


def _levels(make, n: int = 5) -> nn.ModuleDict:
    return nn.ModuleDict({f"Level_{i}": make(i) for i in range(n)})


class _PriorGuidance(nn.Module):
    """The per-level modules shared by the main encoder and decoder: ``cat_rec_syn_bf_nm``
    (GN) and ``cat_rec_syn_bf`` (1×1) make the guide g from cat(VQ feature, h); ``cat_rec_syn``
    (WeightPredictor), ``DAE`` and ``AFT``. Level 0 is built (official weights hold it) but
    never run.

    Ablations (``dae``, ``aft``; see ``VarFormer``): without DAE the guide convs, the weight
    predictor and the fusion are not built, and with AFT still on ``cat_rec_syn`` is only the
    projection head (``PriorProjection``, uniform scale weights) and AFT takes the level's
    feature itself as x; without AFT the fused feature goes straight on; without both, the
    level uses no prior."""

    def _build(self, ch_h, ch_vq, ch_g, heads, res, concat, dae=True, aft=True):
        self.use_dae, self.use_aft = dae, aft
        if dae:
            self.cat_rec_syn_bf_nm = _levels(lambda i: Normalize(ch_vq[i] + ch_h[i]))
            self.cat_rec_syn_bf = _levels(lambda i: nn.Conv2d(ch_vq[i] + ch_h[i], ch_g[i], 1))
            self.cat_rec_syn = _levels(lambda i: WeightPredictor(ch_g[i], ch_h[i], res[i] // 16,
                                                                 res[i], heads, concat=concat))
            self.DAE = _levels(lambda i: DegradationAwareEnhancement(ch_h[i], res[i], heads))
        elif aft:
            self.cat_rec_syn = _levels(lambda i: PriorProjection(ch_h[i], res[i] // 16,
                                                                 concat=concat))
        if aft:
            self.AFT = _levels(lambda i: AdaptiveFeatureTransform(ch_h[i]))

    checkpoint_levels: Tuple[int, ...] = ()

    @property
    def uses_priors(self) -> bool:
        return self.use_dae or self.use_aft

    def _guide(self, i: int, h: Tensor, feat_vq: Tensor, s_v: Tensor):
        """Level i's prior guidance: h -> (h, logit of DAE's w1 or None)."""
        if not self.uses_priors:
            return h, None
        if i in self.checkpoint_levels and torch.is_grad_enabled() and self.training:
            return checkpoint(self._guide_level, i, h, feat_vq, s_v, use_reentrant=False)
        return self._guide_level(i, h, feat_vq, s_v)

    def _guide_level(self, i: int, h: Tensor, feat_vq: Tensor, s_v: Tensor):
        key = f"Level_{i}"
        wlogit = None
        if self.use_dae:
            g = self.cat_rec_syn_bf[key](self.cat_rec_syn_bf_nm[key](torch.cat((feat_vq, h), 1)))
            p = self.cat_rec_syn[key](g, s_v)
            h, wlogit = self.DAE[key](h, p)
        else:
            p = self.cat_rec_syn[key](s_v)
        if self.use_aft:
            h = self.AFT[key](h, p)
        return h, wlogit


class MainEncoder(_PriorGuidance):
    """lq [B, 3, 256, 256], S_v, E_vq -> (z [B, 32, 16, 16], E_main {Level_0..4})."""

    def __init__(self, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 32, resolution: int = 256,
                 heads: int = 8, concat_priors: bool = True, dae: bool = True,
                 aft: bool = True):
        super().__init__()
        n = len(ch_mult)
        in_mult = (1,) + tuple(ch_mult)
        res = [resolution // 2 ** i for i in range(n)]
        ch_h = [ch * in_mult[i] for i in range(n)]          # h entering level i
        ch_vq = [ch * ch_mult[i] for i in range(n)]         # VQ encoder Level_i
        self.num_resolutions = n
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        for i in range(n):
            level = make_level(ch_h[i], ch_vq[i], num_res_blocks, i == n - 1)
            if i != n - 1:
                level.downsample = Downsample2x(ch_vq[i])
            self.down.append(level)
        c = ch_vq[-1]
        self.mid = make_mid(c)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, 1, 1)
        self._build(ch_h, ch_vq, ch_vq, heads, res, concat_priors, dae, aft)

    def forward(self, x: Tensor, s_v: Tensor, e_vq: Dict[str, Tensor]):
        feats: Dict[str, Tensor] = {}
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            if i >= 1:
                h, wlogit = self._guide(i, h, e_vq.get(f"Level_{i}"), s_v)
                if i == 1 and wlogit is not None:
                    feats["weighted_z"] = F.interpolate(wlogit, scale_factor=2, mode="nearest")
            h = feats[f"Level_{i}"] = run_level(level, h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h))), feats


class MainDecoder(_PriorGuidance):
    """(lq, S_v, z [B, 32, 16, 16], E_main, D_vq) -> restored [B, 3, 256, 256] (not clamped).
    ``skip=False``: no adaptive mix-up skip (θ not built, E_main unused)."""

    def __init__(self, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 32, resolution: int = 256,
                 heads: int = 4, concat_priors: bool = True, dae: bool = True,
                 aft: bool = True, skip: bool = True):
        super().__init__()
        n = len(ch_mult)
        in_mult = (1,) + tuple(ch_mult)
        res = [resolution // 2 ** i for i in range(n)]
        ch_h = [ch * ch_mult[i] for i in range(n)]          # h entering level i
        ch_out = [ch * in_mult[i] for i in range(n)]        # after the level's blocks
        self.num_resolutions = n
        self.use_skip = skip
        if skip:
            self.theta = nn.Parameter(torch.ones(n))
        self.input_w = nn.Parameter(torch.tensor(0.5))
        c = ch_h[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, 1, 1)
        self.mid = make_mid(c)
        levels = []
        for i in range(n):
            level = make_level(ch_h[i], ch_out[i], num_res_blocks, i == n - 1)
            if i != 0:
                level.upsample = Upsample2x(ch_out[i])
            levels.append(level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(ch_out[0])
        self.conv_out = nn.Conv2d(ch_out[0], 3, 3, 1, 1)
        self.conv1__w = nn.Conv2d(1, 1, 1)
        self._build(ch_h, ch_h, ch_h, heads, res, concat_priors, dae, aft)

    def forward(self, lq: Tensor, s_v: Tensor, z: Tensor, e_main: Dict[str, Tensor],
                d_vq: Dict[str, Tensor]) -> Tensor:
        h = run_mid(self.mid, self.conv_in(z))
        w = torch.sigmoid(self.theta) if self.use_skip else None
        for i in reversed(range(self.num_resolutions)):
            if w is not None:
                h = w[i] * h + (1 - w[i]) * e_main[f"Level_{i}"]      # mix-up skip (Eq. 6)
            if i >= 1:
                h, _ = self._guide(i, h, d_vq.get(f"Level_{i}"), s_v)
            h = run_level(self.up[i], h)
            if i != 0:
                h = self.up[i].upsample(h)
        y = self.conv_out(F.silu(self.norm_out(h)))
        # official: lq weighted by a softmax over one channel (identically 1), i.e. lq itself
        return (1 - self.input_w) * y + self.input_w * lq


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
ABLATION_SWITCHES = ("skip", "adapter", "aft", "dae")
# Table 5 of the paper: which of (skip, adapter, AFT, DAE) each experiment keeps
TABLE5_VARIANTS: Dict[str, Dict[str, bool]] = {
    "a": dict(skip=False, adapter=False, aft=False, dae=False),
    "b": dict(skip=False, adapter=True, aft=True, dae=True),
    "c": dict(skip=True, adapter=False, aft=True, dae=True),
    "d": dict(skip=True, adapter=True, aft=False, dae=True),
    "e": dict(skip=True, adapter=False, aft=False, dae=True),
    "f": dict(skip=True, adapter=True, aft=True, dae=True),
}


def resolve_ablation(ablation=None) -> Dict[str, bool]:
    """None (everything on), a Table-5 letter ``"a"``…``"f"`` or a mapping of some of
    ``ABLATION_SWITCHES`` to bools (missing ones stay on) -> {skip, adapter, aft, dae}."""
    if ablation is None:
        return dict.fromkeys(ABLATION_SWITCHES, True)
    if isinstance(ablation, str):
        if ablation.lower() not in TABLE5_VARIANTS:
            raise ValueError(f"ablation: a Table-5 variant is one of "
                             f"{', '.join(TABLE5_VARIANTS)}, got {ablation!r}")
        return dict(TABLE5_VARIANTS[ablation.lower()])
    if not hasattr(ablation, "items"):
        raise TypeError(f"ablation: expected None, a Table-5 letter or a mapping of "
                        f"{ABLATION_SWITCHES} to bools, got {type(ablation).__name__}")
    unknown = sorted(set(ablation) - set(ABLATION_SWITCHES))
    if unknown:
        raise ValueError(f"ablation: unknown switches {unknown}; the switches are "
                         f"{list(ABLATION_SWITCHES)}")
    out = dict.fromkeys(ABLATION_SWITCHES, True)
    for k, v in ablation.items():
        if not isinstance(v, bool):
            raise TypeError(f"ablation: switch {k!r} must be true or false, got {v!r}")
        out[k] = v
    return out


def table5_letter(ablation) -> Optional[str]:
    """The Table-5 experiment (a…f) with these switches, or None."""
    sw = resolve_ablation(ablation)
    return next((k for k, v in TABLE5_VARIANTS.items() if v == sw), None)


class VarFormer(nn.Module):
    """VarFormer with official names. Defaults: the released model (VAR d16, 8 cross-attention
    blocks, ch 160). ``VarFormer.small()`` is a CPU-sized preset of the same topology.

    ``ablation`` (paper Table 5; ``resolve_ablation``: None = all on, a letter ``"a"``…``"f"``,
    or e.g. ``{"dae": False}``) switches off modules, which are then not built (their keys are
    absent from the state dict, so a checkpoint of the same variant loads strictly):

    * ``skip=False`` — no adaptive mix-up skip (Eq. 6): the decoder keeps its own feature at
      every level, F_d^i = F̂_d^i; ``main_decoder.theta`` is not built. (The official input
      blend α stays: it is not the skip.)
    * ``adapter=False`` — no Adapter (``ft_layers`` is a parameter-free identity): the
      quantizer and the VAR branch take the VQVAE latent f itself; the feature loss then has no
      trainable input.
    * ``aft=False`` — no AFT (Eq. 5) at any level: the DAE output goes straight into the level's
      residual blocks, F_in^{i+1} = F_g^i.
    * ``dae=False`` — no DAE: neither the weight predictor of Eq. 3 (the guide convs
      ``cat_rec_syn_bf_nm``/``cat_rec_syn_bf``, its Swin blocks and scale-weight conv) nor the
      region fusion of Eq. 4 (``DAE``). With AFT on, the prior still reaches AFT through the
      projection head M alone with uniform scale weights (1/K each), P = M(Σ_j S_v^j / K), and
      AFT transforms the level's feature itself (F_g = F): AFT(F, P). With AFT also off the
      U-Net uses no prior (Table 5 a); the VQ decoder features, used only by the decoder's
      weight predictors, are then not computed.
    """

    def __init__(self, mode: str = "official", var_depth: int = 16, n_cross: Optional[int] = None,
                 ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 vocab_size: int = 4096, z_channels: int = 32, n_adapter_layers: int = 4,
                 cfg: float = 0.5, enc_heads: int = 8, dec_heads: int = 4,
                 cross_heads: int = 16, vae_ch: int = 160, concat_priors: Optional[bool] = None,
                 use_fused_kernels: Optional[bool] = None, checkpoint_levels: Sequence[int] = (),
                 var_grad: Optional[bool] = None, ablation=None):
        super().__init__()
        self.ablation = ab = resolve_ablation(ablation)
        self.use_fused_kernels = use_fused_kernels
        self.var_grad = (mode == "official") if var_grad is None else var_grad
        if mode not in MODES:
            raise ValueError(f"VarFormer: mode must be one of {MODES}, got {mode!r}")
        self.mode, self.cfg = mode, cfg
        self.patch_nums = VAR_PATCH_NUMS
        concat = (mode == "official") if concat_priors is None else concat_priors
        vae = VQVAE(vocab_size=vocab_size, z_channels=z_channels, ch=vae_ch, ch_mult=ch_mult)
        var = VAR(depth=var_depth, Cvae=z_channels, vocab_size=vocab_size)
        for name, mod in vae.named_children():              # VQVAE parts at the top level
            setattr(self, name, mod)
        for name in ("word_embed", "class_emb", "lvl_embed", "blocks", "head_nm", "head"):
            setattr(self, name, getattr(var, name))
        self.pos_start, self.pos_1LC = var.pos_start, var.pos_1LC
        self.register_buffer("lvl_1L", var.lvl_1L)
        self.register_buffer("attn_bias_for_masking", var.attn_bias_for_masking)
        self._var_cfg = dict(C=var.C, L=var.L, first_l=var.first_l, begin_ends=var.begin_ends,
                             num_classes=var.num_classes, Cvae=z_channels)
        self.ft_layers = (Adapter(z_channels, n_adapter_layers) if ab["adapter"]
                          else nn.Identity())
        n_cross = var_depth // 2 if n_cross is None else n_cross
        self.cross_attn_blocks = nn.ModuleList([CrossAttentionAR(i, var.C, cross_heads)
                                                for i in range(n_cross)])
        self.Mainencoder = MainEncoder(ch, ch_mult, 2, z_channels, 256, enc_heads, concat,
                                       dae=ab["dae"], aft=ab["aft"])
        self.main_decoder = MainDecoder(ch, ch_mult, 2, z_channels, 256, dec_heads, concat,
                                        dae=ab["dae"], aft=ab["aft"], skip=ab["skip"])
        self.set_checkpointing(checkpoint_levels)

    def set_checkpointing(self, levels: Sequence[int] = (1, 2)) -> None:
        """Recompute the WeightPredictor, DAE and AFT of these levels in the backward instead of
        storing their activations (levels 1 and 2 are the 128² and 64² ones)."""
        for part in (self.Mainencoder, self.main_decoder):
            part.checkpoint_levels = tuple(levels)

    @classmethod
    def small(cls, mode: str = "official", **kw) -> "VarFormer":
        """CPU preset: ch 32, VAR depth 2 (C 128), 1 cross-attention block, 2/2/2 heads."""
        cfg = dict(var_depth=2, n_cross=1, ch=32, vae_ch=32, enc_heads=2, dec_heads=2,
                   cross_heads=2)
        cfg.update(kw)
        return cls(mode=mode, **cfg)

    # ---- checks ---------------------------------------------------------------------------------
    @staticmethod
    def _check_lq(lq: Tensor) -> None:
        if not isinstance(lq, Tensor) or lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f"VarFormer: lq must be [B, 3, 256, 256], got "
                             f"{getattr(lq, 'shape', type(lq).__name__)}")
        if tuple(lq.shape[2:]) != (256, 256):
            raise ValueError(f"VarFormer: forward takes 256×256 inputs, got {tuple(lq.shape[2:])};"
                             " use varformer.restore(model, image) for other sizes")
        if not lq.is_floating_point():
            raise TypeError(f"VarFormer: lq must be a float tensor in [-1, 1], got {lq.dtype}")

    # ---- the VAR branch -----------------------------------------------------------------------
    def var_branch(self, f_a: Tensor):
        """Adapter latent f_a [B, 32, 16, 16] -> (S_v [B, 10, 32, 16, 16], f_hat_pred
        [B, 32, 16, 16], logits [B, 680, V] after CFG, lq_feat (straight-through f_a))."""
        q: MultiScaleQuantizer = self.quantize
        B = f_a.shape[0]
        cfgv = self._var_cfg
        idx_lq = q.f_to_idxBl_or_fhat(f_a, to_fhat=False)
        tf = q.idxBl_to_var_input(idx_lq)                                   # [B, 679, 32]
        fhat_lq = q.embed_to_fhat([q.embedding(i).transpose(1, 2).reshape(B, -1, pn, pn)
                                   for i, pn in zip(idx_lq, self.patch_nums)], last_one=True)
        lq_feat = f_a + (fhat_lq - f_a).detach()
        official = self.mode == "official"
        copies = 2 if official else 1
        label = torch.full((copies * B,), cfgv["num_classes"], device=f_a.device)
        cond = self.class_emb(label)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = (cond[:, None].expand(-1, cfgv["first_l"], -1) + self.pos_start.expand(copies * B,
                                                                                   -1, -1)
             + lvl_pos[:, :cfgv["first_l"]])
        tf_tok = x
        f_hat = f_a.new_zeros(B, cfgv["Cvae"], self.patch_nums[-1], self.patch_nums[-1])
        priors, logits_all = [], []
        n_ca = len(self.cross_attn_blocks)
        for b in self.blocks:
            b.attn.kv_caching(True)
        try:
            cur = 0
            for si, pn in enumerate(self.patch_nums):
                cur += pn * pn
                for j, blk in enumerate(self.blocks):
                    x = blk(x, cond, None)
                    if j < n_ca:
                        ca = self.cross_attn_blocks[j](tf_tok, x, official=official)
                        x = ca if official else x + ca
                with torch.autocast(x.device.type, enabled=False):
                    logits = self.head(self.head_nm(x.float(), cond.float())).float()
                if official:
                    t = self.cfg * si / (len(self.patch_nums) - 1)
                    logits = (1 + t) * logits[:B] - t * logits[B:]
                logits_all.append(logits)
                idx = logits.argmax(-1)
                h = q.embedding(idx).transpose(1, 2).reshape(B, cfgv["Cvae"], pn, pn)
                f_hat, nxt, h_up = q.get_next_autoregressive_input_h(si, len(self.patch_nums),
                                                                     f_hat, h)
                priors.append(h_up)
                if si != len(self.patch_nums) - 1:
                    n_next = self.patch_nums[si + 1] ** 2
                    pos = lvl_pos[:, cur:cur + n_next]
                    tf_tok = (self.word_embed(tf[:, cur - 1:cur - 1 + n_next]) + pos
                              ).repeat(copies, 1, 1)
                    x = (self.word_embed(nxt.view(B, cfgv["Cvae"], -1).transpose(1, 2)) + pos
                         ).repeat(copies, 1, 1)
        finally:
            for b in self.blocks:
                b.attn.kv_caching(False)
        s_v = torch.stack(priors, 1).detach()
        return s_v, f_hat.detach(), torch.cat(logits_all, 1), lq_feat

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, lq: Tensor, return_all: bool = False):
        """lq [B, 3, 256, 256] in [-1, 1] -> restored [B, 3, 256, 256] in [-1, 1]; with
        ``return_all`` -> (restored, lq_feat [B, 32, 16, 16], logits [B, 680, V]) for the
        losses."""
        self._check_lq(lq)
        with contextlib.ExitStack() as stack:
            if self.use_fused_kernels is not None:
                stack.enter_context(_dispatch.use_fused_kernels(self.use_fused_kernels))
            load_aware = (lq.device.type == "cpu" and _dispatch.requested() != "reference"
                          and not torch.compiler.is_compiling())
            if load_aware:
                stack.enter_context(_ext.load_aware())
            out = self._forward(lq, return_all)
        if load_aware and torch.is_grad_enabled():
            _ext.load_aware_backward(*(out if isinstance(out, tuple) else (out,)))
        return out

    def _forward(self, lq: Tensor, return_all: bool):
        h, e_vq = self.encoder(lq, return_features=True)
        f = self.quant_conv(h)
        f_a = self.ft_layers(f)
        with torch.set_grad_enabled(self.var_grad and torch.is_grad_enabled()):
            s_v, f_hat, logits, lq_feat = self.var_branch(f_a)
        if not self.var_grad:     # paper mode: only the adapter's straight-through latent trains
            lq_feat = f_a + (lq_feat - f_a).detach()
        z, e_main = self.Mainencoder(lq, s_v, e_vq)
        z = self.quant_conv(z)
        d_vq = {}
        if self.main_decoder.use_dae:       # the decoder's weight predictors are guided by them
            _, d_vq = self.decoder(self.post_quant_conv(f_hat), return_features=True)
        out = self.main_decoder(lq, s_v, z, e_main, d_vq).clamp(-1, 1)
        return (out, lq_feat, logits) if return_all else out

    # ---- weights ----------------------------------------------------------------------------------
    def to_official_state_dict(self) -> Dict[str, Tensor]:
        """The state dict under the official key names (identical to ``state_dict()``: the module
        tree uses the official names)."""
        return self.state_dict()

    @classmethod
    def from_pretrained(cls, path: Optional[str] = None, *, vae: Optional[str] = None,
                        var: Optional[str] = None, mode: Optional[str] = None,
                        map_location="cpu", preset: Optional[str] = None,
                        **kw) -> "VarFormer":
        """Released VarFormer weights (BasicSR ``{'params_ema': sd}``, ``{'params': sd}`` or a
        bare state dict, or a ``.safetensors`` file as our trainer writes; every key must
        match), or ``vae=``/``var=`` official VQVAE and VAR files to start training from.

        A ``.safetensors`` checkpoint of ``varformer train`` carries its model's ``preset``,
        ``mode`` and constructor kwargs in its header; they are used unless ``mode`` /
        ``preset`` / ``**kw`` are given. Files without that header (the released ``.pth``)
        default to ``mode="official"``, ``preset="full"``. ``preset="small"`` builds the
        ``VarFormer.small()`` topology. A file that does not fit the model is a
        ``WeightsMismatchError`` (a ``KeyError`` and ``ValueError``) whose one-line message
        names the counts, one key with both shapes, and the preset/mode that would fit."""
        info = _checkpoint_info(path) if path is not None else None
        saved = info or {}
        build_kw = dict(saved.get("kwargs") or {})
        build_kw.update(kw)
        mode = mode if mode is not None else saved.get("mode") or "official"
        preset = preset if preset is not None else saved.get("preset") or "full"
        if preset not in ("full", "small"):
            raise ValueError(f"VarFormer.from_pretrained: preset must be 'full' or 'small', "
                             f"got {preset!r}")
        if mode not in MODES:
            raise ValueError(f"VarFormer.from_pretrained: mode must be one of {MODES}, "
                             f"got {mode!r}")
        if path is None and vae is None and var is None:
            raise ValueError("VarFormer.from_pretrained: give the released weights file, or "
                             "vae= and/or var= files")
        sds = {name: _read_state_dict(p, map_location)
               for name, p in (("path", path), ("vae", vae), ("var", var)) if p is not None}

        def build(preset_, mode_, device=None):
            with torch.device(device) if device is not None else contextlib.nullcontext():
                return (cls.small(mode_, **build_kw) if preset_ == "small"
                        else cls(mode=mode_, **build_kw))

        if path is not None:   # compare on a meta-device build before allocating the model
            problem = _mismatch(build(preset, mode, "meta").state_dict(), sds["path"])
            if problem:
                overridden = info is not None and (saved.get("preset"), saved.get("mode")) \
                    != (preset, mode)
                if overridden:
                    origin, hint = "", (f"; its metadata says preset={saved.get('preset')!r} "
                                        f"mode={saved.get('mode')!r}: drop the override")
                else:
                    origin = (" (as its metadata says)" if info is not None else
                              " (the defaults for a file without varformer metadata)")
                    fits = [(p_, m_) for p_ in ("full", "small") for m_ in MODES
                            if (p_, m_) != (preset, mode)
                            and not _mismatch(build(p_, m_, "meta").state_dict(), sds["path"])]
                    hint = (f"; the file fits preset={fits[0][0]!r} mode={fits[0][1]!r} "
                            f"(--preset {fits[0][0]} --mode {fits[0][1]})" if fits else
                            "; no preset/mode fits it: is it a VarFormer checkpoint?")
                extra = f" and {kw}" if kw else ""
                raise WeightsMismatchError(
                    f"VarFormer: {path} does not match the model built with preset={preset!r} "
                    f"mode={mode!r}{extra}{origin}: {problem}{hint}")
        model = build(preset, mode)
        if path is not None:
            model.load_official(sds["path"], strict=True)
        if vae is not None:
            _load_part(model, sds["vae"], ("encoder", "decoder", "quantize", "quant_conv",
                                           "post_quant_conv"), vae)
        if var is not None:
            _load_part(model, sds["var"], ("word_embed", "class_emb", "lvl_embed", "blocks",
                                           "head_nm", "head", "pos_start", "pos_1LC", "lvl_1L",
                                           "attn_bias_for_masking"), var)
        return model

    def load_official(self, sd: Dict[str, Tensor], strict: bool = True) -> None:
        """Load an official-format state dict; a missing or unexpected key is an error that
        lists the keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
        if strict and (missing or unexpected or wrong):
            def show(keys):
                return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
            raise KeyError(f"VarFormer: checkpoint does not match the model: "
                           f"{len(missing)} missing [{show(missing)}], {len(unexpected)} "
                           f"unexpected [{show(unexpected)}], {len(wrong)} with other shapes "
                           f"[{show(wrong)}]")
        self.load_state_dict(sd, strict=strict)


def _read_state_dict(path: str, map_location) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VarFormer: weights file not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device=str(map_location))
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"VarFormer: {path} holds no state dict (expected {{'params_ema': ...}}, "
                     "{'params': ...} or a dict of tensors)")


class WeightsMismatchError(KeyError, ValueError):
    """A weights file that does not fit the model (``from_pretrained``); str() is the message
    itself (not quoted as KeyError's)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _checkpoint_info(path: str) -> Optional[Dict]:
    """The ``varformer`` safetensors header entry written by ``varformer train`` (preset,
    mode, kwargs, ...), or None for other files."""
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return None
    import json

    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["varformer"]) if "varformer" in meta else None
    except Exception as e:  # unreadable header: say so rather than guess
        raise ValueError(f"VarFormer: cannot read the header of {path}: {e}") from None


def _mismatch(own: Dict[str, Tensor], sd: Dict[str, Tensor]) -> str:
    """'' if ``sd`` has exactly the keys and shapes of ``own``, else a one-line summary with
    the counts and one example key."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if not (missing or unexpected or wrong):
        return ""

    def show(keys):
        return ", ".join(keys[:3]) + (f" … (+{len(keys) - 3})" if len(keys) > 3 else "")

    text = (f"{len(missing)} missing [{show(missing)}], {len(unexpected)} unexpected "
            f"[{show(unexpected)}], {len(wrong)} with other shapes")
    if wrong:
        k = wrong[0]
        text += (f", e.g. {k} is {list(sd[k].shape)} in the file but "
                 f"{list(own[k].shape)} in the model")
    return text


def _load_part(model: nn.Module, sd: Dict[str, Tensor], prefixes, path: str) -> None:
    own = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in prefixes}
    missing = sorted(set(own) - set(sd))
    if missing:
        raise KeyError(f"VarFormer: {path} lacks {len(missing)} keys, e.g. {missing[:5]}")
    model.load_state_dict({k: sd[k] for k in own}, strict=False)


__all__ = ["VarFormer", "WeightsMismatchError", "CrossAttentionAR", "WeightPredictor",
           "DegradationAwareEnhancement", "AdaptiveFeatureTransform", "MainEncoder",
           "MainDecoder", "MODES", "PriorProjection", "ABLATION_SWITCHES", "TABLE5_VARIANTS",
           "resolve_ablation", "table5_letter"]
