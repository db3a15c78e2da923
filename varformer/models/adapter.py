"""The Adapter (paper: "Adapter for Domain Shift"; official ``EnhanceLayers`` of 4 AIEM blocks).

It maps the VQVAE latent of a degraded image f [B, 32, 16, 16] to f_a [B, 32, 16, 16] closer to
the clean latent, before the multi-scale quantizer. Convolutional only (no self-attention,
although the paper mentions it); exactly the identity at initialisation (both residual branch
scales start at zero). Parameter names are the official ones (``ft_layers.blks.{i}.*``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every pixel: x [B, C, H, W], eps 1e-6, affine."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        return self.weight[:, None, None] * y + self.bias[:, None, None]


def simple_gate(x: Tensor) -> Tensor:
    """[B, 2C, H, W] -> [B, C, H, W]: first half times second half."""
    a, b = x.chunk(2, dim=1)
    return a * b


class LargeKernelAttention(nn.Module):
    """Depthwise 5×5, depthwise 7×7 with dilation 3, then 1×1 to ``out`` channels."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.conv_spatial = nn.Conv2d(channels, channels, 7, padding=9, dilation=3,
                                      groups=channels)
        self.conv1 = nn.Conv2d(channels, out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(self.conv_spatial(self.conv0(x)))


class IMAConv(nn.Module):
    """Channel groups with learned intensity curves: the C channels split in ``groups`` groups;
    each group, clipped to [0, 1], takes ``n_curve`` steps x ← x + a_j·x·(1 − x) with per-pixel
    a = sigmoid(net(other groups)), then a 3×3 conv; groups are concatenated back."""

    def __init__(self, channels: int = 32, groups: int = 4, n_curve: int = 3):
        super().__init__()
        self.groups, self.n_curve = groups, n_curve
        g = channels // groups
        for i in range(groups):
            setattr(self, f"predictA{i}", nn.Sequential(
                nn.Conv2d(channels - g, g, 5, padding=2), nn.ReLU(),
                nn.Conv2d(g, g, 3, padding=1), nn.ReLU(),
                nn.Conv2d(g, n_curve, 1), nn.Sigmoid()))
            setattr(self, f"conv{i}", nn.Conv2d(g, g, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        parts = list(x.chunk(self.groups, dim=1))
        out = []
        for i, xi in enumerate(parts):
            others = torch.cat(parts[:i] + parts[i + 1:], dim=1)
            a = getattr(self, f"predictA{i}")(others)
            xi = F.relu(xi) - F.relu(xi - 1)
            for j in range(self.n_curve):
                xi = xi + a[:, j:j + 1] * xi * (1 - xi)
            out.append(getattr(self, f"conv{i}")(xi))
        return torch.cat(out, dim=1)


class AIEM(nn.Module):
    """One adapter block, x [B, C, H, W] -> same:
    y = x + β·conv3(SCA(t)·LKA(t)·gate(t)), t = dwconv(conv1(LN(x)));
    out = y + γ·conv5(IMAConv(gate(conv4(LN(y))))); β = γ = 0 at init."""

    def __init__(self, c: int = 32, dw_expand: int = 2, ffn_expand: int = 2,
                 split_group: int = 4, n_curve: int = 3):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca1 = LargeKernelAttention(dw, dw // 2)
        self.sca2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw, dw // 2, 1))
        ffn = c * ffn_expand
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.IMAC = IMAConv(ffn // 2, split_group, n_curve)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        t = self.conv2(self.conv1(self.norm1(x)))
        t = self.sca2(t) * self.sca1(t) * simple_gate(t)
        y = x + self.beta * self.conv3(t)
        u = self.IMAC(simple_gate(self.conv4(self.norm2(y))))
        return y + self.gamma * self.conv5(u)


class Adapter(nn.Module):
    """``n_layers`` AIEM blocks on the latent [B, embed_dim, h, w] (official ``EnhanceLayers``)."""

    def __init__(self, embed_dim: int = 32, n_layers: int = 4):
        super().__init__()
        self.blks = nn.ModuleList([AIEM(embed_dim) for _ in range(n_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blks:
            x = blk(x)
        return x
