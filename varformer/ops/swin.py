"""Drop-in Swin modules on the fused window-attention op, and patching of existing models.

* ``WindowAttention`` — Swin's interface (forward(x [B·nW, N, C], mask [nW, N, N] or None)),
  bias, mask, softmax and @v in one ``scaled_dot_product_attention`` call with a float mask.
* ``SwinTransformerBlock`` / ``ResidualSwinTransformerBlock`` — SwinIR / VarFormer blocks
  (forward(x [B, H·W, C], x_size)) that run the image-layout op: no roll, partition or score
  tensor. Parameter and buffer names equal SwinIR's and VarFormer's (``attn_mask``, the dead
  ``patch_embed.proj``), so official weights load with ``strict=True``.
* ``patch_swin(model)`` / ``unpatch_swin(model)`` — rebind the ``forward`` of the Swin blocks of
  an existing model (SwinIR-style, VarFormer, timm) to the fused op, leaving parameters, buffers
  and state-dict keys untouched.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .window_attention import region_mask, relative_position_index, window_attention


def _pair(ws):
    return tuple(ws) if isinstance(ws, (tuple, list)) else (ws, ws)


class WindowAttention(nn.Module):
    """Swin window attention with a relative position bias (drop-in for Swin / SwinIR / timm).

    forward(x [B·nW, N, C], mask [nW, N, N] or None) -> [B·nW, N, C]. The state dict holds
    ``relative_position_index`` (persistent, as in Swin/SwinIR/VarFormer); a state dict without
    it (timm, where it is non-persistent) loads too."""

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: num_heads={num_heads} must divide dim={dim}")
        self.dim, self.window_size, self.num_heads = dim, _pair(window_size), num_heads
        if self.window_size[0] != self.window_size[1]:
            raise ValueError(f"WindowAttention: square windows only, got {self.window_size}")
        ws = self.window_size[0]
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "relative_position_index"
        if key not in state_dict:  # timm keeps the index out of its state dicts
            state_dict[key] = self.relative_position_index.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, C = x.shape
        nh = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, nh).permute(2, 0, 1).to(q.dtype)
        if mask is not None:
            nW = mask.shape[0]
            if B_ % nW:
                raise ValueError(f"WindowAttention: batch·windows {B_} is not a multiple of the "
                                 f"mask's {nW} windows")
            bias = (bias[None] + mask.to(q.dtype)[:, None]).repeat(B_ // nW, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, C)))


class Mlp(nn.Module):
    """Linear → GELU → Linear (SwinIR/VarFormer names fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _fused_attention(block, x: Tensor) -> Tensor:
    """norm1'd tokens x [B, H, W, C] -> attention output after proj [B, H, W, C].

    Pads H and W to multiples of the window (zeros, bottom/right, as timm does) and crops."""
    attn = block.attn
    ws = _pair(attn.window_size)[0]
    shift = _pair(getattr(block, "shift_size", 0))[0]
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % ws, (-W) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    y = window_attention(attn.qkv(x), attn.relative_position_bias_table.to(x.dtype),
                         window_size=ws, shift_size=shift, num_heads=attn.num_heads,
                         scale=float(attn.scale))
    return attn.proj(y[:, :H, :W])


class SwinTransformerBlock(nn.Module):
    """SwinIR / VarFormer Swin block on the image-layout op.

    forward(x [B, H·W, C], x_size (H, W)) -> [B, H·W, C]: x + attn(norm1(x)), then
    + mlp(norm2(·)). Windows shrink to the resolution (and the shift to 0) when the resolution
    is not larger than the window, as in SwinIR. ``attn_mask`` is kept as a buffer for
    state-dict compatibility only (the op computes the mask from pixel coordinates)."""

    def __init__(self, dim: int, input_resolution, num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads = dim, tuple(input_resolution), num_heads
        self.window_size, self.shift_size, self.mlp_ratio = window_size, shift_size, mlp_ratio
        if min(self.input_resolution) <= self.window_size:
            self.shift_size, self.window_size = 0, min(self.input_resolution)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"SwinTransformerBlock: shift_size must be in [0, window_size), got "
                             f"{self.shift_size} for window {self.window_size}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, self.window_size, num_heads, qkv_bias, qk_scale,
                                    attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        mask = (region_mask(*self.input_resolution, self.window_size, self.shift_size)
                if self.shift_size > 0 else None)
        self.register_buffer("attn_mask", mask)

    def forward(self, x: Tensor, x_size) -> Tensor:
        H, W = x_size
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"SwinTransformerBlock: x has {L} tokens, x_size {tuple(x_size)} "
                             f"needs {H * W}")
        y = _fused_attention(self, self.norm1(x).view(B, H, W, C)).reshape(B, L, C)
        x = x + y
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks alternating shift 0 and window//2 (SwinIR's BasicLayer, no
    downsampling)."""

    def __init__(self, dim: int, input_resolution, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias,
                                 qk_scale) for i in range(depth)])

    def forward(self, x: Tensor, x_size) -> Tensor:
        for blk in self.blocks:
            x = blk(x, x_size)
        return x


class _PatchEmbed(nn.Module):
    """VarFormer's PatchEmbed inside an RSTB: a pure reshape that still registers a dead
    ``proj`` conv with 0 input channels (it is in the released state dict)."""

    def __init__(self, dim: int, patch_size: int = 4):
        super().__init__()
        with warnings.catch_warnings():  # a zero-element weight: its init is a no-op
            warnings.simplefilter("ignore", UserWarning)
            self.proj = nn.Conv2d(0, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)


class ResidualSwinTransformerBlock(nn.Module):
    """SwinIR-style RSTB as VarFormer's DAE uses it: x + tokens(conv3×3(image(layer(x)))).

    forward(x [B, H·W, C], x_size (H, W)) -> [B, H·W, C]. Keys: ``residual_group.blocks.*``,
    ``conv``, ``patch_embed.proj`` (dead)."""

    def __init__(self, dim: int, input_resolution, depth: int = 2, num_heads: int = 8,
                 window_size: int = 4, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, patch_size: int = 4):
        super().__init__()
        self.dim, self.input_resolution = dim, tuple(input_resolution)
        self.residual_group = BasicLayer(dim, input_resolution, depth, num_heads, window_size,
                                         mlp_ratio, qkv_bias, qk_scale)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.patch_embed = _PatchEmbed(dim, patch_size)

    def forward(self, x: Tensor, x_size) -> Tensor:
        H, W = x_size
        y = self.residual_group(x, x_size)
        y = self.conv(y.transpose(1, 2).reshape(x.shape[0], self.dim, H, W))
        return self.patch_embed(y) + x


# --------------------------------------------------------------------------------------------
# patching existing models
# --------------------------------------------------------------------------------------------
def _fused_block_forward(self, x: Tensor, x_size=None, *args, **kwargs) -> Tensor:
    """Fused forward bound onto a foreign Swin block. Layouts: [B, H, W, C] (timm) or
    [B, H·W, C] with x_size (SwinIR, VarFormer) or the block's input_resolution (Swin)."""
    if x.dim() == 4:
        B, H, W, C = x.shape
        img = x
    else:
        H, W = x_size if x_size is not None else self.input_resolution
        B, L, C = x.shape
        img = x.view(B, H, W, C)
    dp1 = getattr(self, "drop_path1", getattr(self, "drop_path", nn.Identity()))
    dp2 = getattr(self, "drop_path2", getattr(self, "drop_path", nn.Identity()))
    ls1 = getattr(self, "ls1", nn.Identity())
    ls2 = getattr(self, "ls2", nn.Identity())
    img = img + dp1(ls1(_fused_attention(self, self.norm1(img))))
    img = img + dp2(ls2(self.mlp(self.norm2(img))))
    return img if x.dim() == 4 else img.reshape(B, H * W, C)


def _is_swin_block(m: nn.Module) -> bool:
    attn = getattr(m, "attn", None)
    return (hasattr(attn, "relative_position_bias_table") and hasattr(attn, "qkv")
            and hasattr(attn, "proj") and hasattr(m, "norm1") and hasattr(m, "mlp")
            and hasattr(m, "norm2") and not isinstance(m, SwinTransformerBlock))


def patch_swin(model: nn.Module) -> int:
    """Run the fused op in every Swin block of ``model`` (by duck typing: a block with ``attn``
    holding ``qkv``, ``proj`` and ``relative_position_bias_table``, plus ``norm1``, ``mlp``,
    ``norm2``). Rebinds ``forward`` per instance; returns how many blocks were patched."""
    n = 0
    for m in model.modules():
        if _is_swin_block(m) and "forward" not in m.__dict__:
            m.forward = _fused_block_forward.__get__(m)
            n += 1
    return n


def unpatch_swin(model: nn.Module) -> int:
    """Undo ``patch_swin``; returns how many blocks were restored."""
    n = 0
    for m in model.modules():
        f = m.__dict__.get("forward")
        if f is not None and getattr(f, "__func__", None) is _fused_block_forward:
            del m.forward
            n += 1
    return n
