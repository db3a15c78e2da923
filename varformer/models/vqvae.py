"""VAR's multi-scale VQVAE (``vae_ch160v4096z32``), with the per-level features VarFormer uses.

Image x [B, 3, 256, 256] in [-1, 1] -> encoder -> [B, 640, 16, 16] -> conv_out -> quant_conv ->
f [B, 32, 16, 16] -> ``MultiScaleQuantizer`` (10 scales, 680 tokens) -> f_hat -> post_quant_conv
-> decoder -> [B, 3, 256, 256]. Channels per level (ch = 160, ch_mult (1, 1, 2, 2, 4)):
160, 160, 320, 320, 640; self-attention only at the lowest level (16²) and in the middle.
Module and parameter names equal VAR's, so ``vae_ch160v4096z32.pth`` loads with strict=True
(``checkpoints/vae_ch160v4096z32_state_dict.tsv``).

Features (VarFormer's ``VarEncoder_2`` / ``VarDecoder2_2``): the encoder returns ``Level_0`` …
``Level_4`` (each level's output before its downsampling) and ``middle``; the decoder returns
``z_quant`` (after its middle block) and ``Level_4`` … ``Level_0`` (each level's output before
its upsampling).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from varformer.ops.quantizer import VAR_PATCH_NUMS, MultiScaleQuantizer


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), 1×1 ``nin_shortcut`` when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions: x + proj_out(softmax(qᵀk/√C) v), with
    q, k, v from one 1×1 conv of GN(x) (channel order q, k, v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    """Zero-pad right and bottom by one, 3×3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest ×2, 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def make_level(cin: int, cout: int, n_blocks: int, attn: bool, dropout: float = 0.0):
    """One resolution level: ``block`` (ResnetBlocks cin → cout, then cout → cout) and ``attn``
    (an AttnBlock after each block when ``attn``), with the official key names."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(), nn.ModuleList()
    for _ in range(n_blocks):
        level.block.append(ResnetBlock(cin, cout, dropout))
        cin = cout
        if attn:
            level.attn.append(AttnBlock(cout))
    return level


def run_level(level: nn.Module, h: Tensor) -> Tensor:
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def make_mid(c: int, dropout: float = 0.0, attn: bool = True) -> nn.Module:
    """ResnetBlock, AttnBlock (or identity), ResnetBlock at width c (``block_1``, ``attn_1``,
    ``block_2``)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c, dropout)
    mid.attn_1 = AttnBlock(c) if attn else nn.Identity()
    mid.block_2 = ResnetBlock(c, c, dropout)
    return mid


def run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, z, H/16, W/16] (+ features Level_0..4, middle)."""

    def __init__(self, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, in_channels: int = 3,
                 z_channels: int = 32, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            block_in = ch * ch_mult[i]
            level = make_level(ch * in_mult[i], block_in, num_res_blocks,
                               i == self.num_resolutions - 1 and using_sa, dropout)
            if i != self.num_resolutions - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = make_mid(block_in, dropout, using_mid_sa)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: Tensor, return_features: bool = False):
        feats: Dict[str, Tensor] = {}
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            h = feats[f"Level_{i}"] = run_level(level, h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = feats["middle"] = run_mid(self.mid, h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return (h, feats) if return_features else h


class Decoder(nn.Module):
    """[B, z, h, w] -> [B, 3, 16h, 16w] (+ features z_quant, Level_4..0)."""

    def __init__(self, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, in_channels: int = 3,
                 z_channels: int = 32, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = make_mid(block_in, dropout, using_mid_sa)
        levels: List[nn.Module] = []
        for i in reversed(range(self.num_resolutions)):
            level = make_level(block_in, ch * ch_mult[i], num_res_blocks + 1,
                               i == self.num_resolutions - 1 and using_sa, dropout)
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)          # indexed by level, 0 = full resolution
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, 1, 1)

    def forward(self, z: Tensor, return_features: bool = False):
        feats: Dict[str, Tensor] = {}
        h = feats["z_quant"] = run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            h = feats[f"Level_{i}"] = run_level(level, h)
            if i != 0:
                h = level.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return (h, feats) if return_features else h


class VQVAE(nn.Module):
    """VAR's VQVAE (defaults: the ``vae_ch160v4096z32`` checkpoint). ``test_mode`` freezes it
    and puts it in eval mode, as VAR builds it for inference."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), dropout: float = 0.0,
                 beta: float = 0.25, using_znorm: bool = False, quant_conv_ks: int = 3,
                 quant_resi: float = 0.5, share_quant_resi: int = 4,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence = VAR_PATCH_NUMS,
                 test_mode: bool = False):
        super().__init__()
        self.V, self.Cvae, self.ch_mult = vocab_size, z_channels, tuple(ch_mult)
        self.downsample = 2 ** (len(ch_mult) - 1)
        cfg = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=2, dropout=dropout, in_channels=3,
                   z_channels=z_channels, using_sa=True, using_mid_sa=True)
        self.encoder = Encoder(**cfg)
        self.decoder = Decoder(**cfg)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, using_znorm, beta,
                                            default_qresi_counts, v_patch_nums, quant_resi,
                                            share_quant_resi)
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    def _check_img(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VQVAE: images must be [B, 3, H, W], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"VQVAE: H and W must be multiples of {self.downsample}, got "
                             f"{tuple(x.shape[2:])}")

    # ---- VAR's API -------------------------------------------------------------------------------
    def forward(self, inp: Tensor, ret_usages: bool = False):
        """VQVAE training: -> (reconstruction, usages or None, VQ loss)."""
        self._check_img(inp)
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp)), ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: Tensor,
                     v_patch_nums: Optional[Sequence] = None) -> List[Tensor]:
        self._check_img(inp_img_no_grad)
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: List[Tensor], same_shape: bool, last_one: bool = False):
        B = ms_idx_Bl[0].shape[0]
        ms_h = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h.append(self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(
                B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[Tensor], all_to_max_scale: bool,
                     last_one: bool = False):
        if last_one:
            return self.fhat_to_img(self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale,
                                                                last_one=True))
        return [self.fhat_to_img(f) for f in self.quantize.embed_to_fhat(ms_h_BChw,
                                                                         all_to_max_scale)]

    def img_to_reconstructed_img(self, x: Tensor, v_patch_nums: Optional[Sequence] = None,
                                 last_one: bool = False):
        self._check_img(x)
        f = self.quant_conv(self.encoder(x))
        fhats = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(fhats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in fhats]

    # ---- VarFormer's feature paths -------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """x [B, 3, H, W] -> (f = quant_conv(encoder(x)) [B, 32, H/16, W/16],
        {Level_0..4, middle})."""
        self._check_img(x)
        h, feats = self.encoder(x, return_features=True)
        return self.quant_conv(h), feats

    def decode(self, f_hat: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """f_hat [B, 32, h, w] -> (image [B, 3, 16h, 16w] (not clamped),
        {z_quant, Level_4..0})."""
        return self.decoder(self.post_quant_conv(f_hat), return_features=True)
