"""LPIPS (Zhang et al. 2018), AlexNet backbone, version 0.1: the de-facto standard variant.

d(x, y) = sum over the 5 AlexNet relu layers l of mean over (h, w) of
          w_l . (n(f_l(s(x))) - n(f_l(s(y))))^2
where s is the scaling layer (x - shift) / scale with shift (-.030, -.088, -.188) and scale
(.458, .448, .450), f_l the relu outputs of torchvision's ``alexnet().features`` (modules 0-1,
2-4, 5-7, 8-9, 10-11; channels 64, 192, 384, 256, 256), n the unit normalisation over channels
(x / (||x||_2 + 1e-10)) and w_l a 1x1 linear layer without bias (learned, [1, C_l, 1, 1]).

Weights are not bundled; ``LPIPS.from_files`` reads two files:

- ``backbone_path``: torchvision's ImageNet AlexNet, ``alexnet-owt-7be5be79.pth`` (a state dict
  with keys ``features.{0,3,6,8,10}.{weight,bias}``; ``classifier.*`` keys are ignored);
- ``linear_path``: the lpips package's ``lpips/weights/v0.1/alex.pth`` (keys
  ``lin{0..4}.model.1.weight``); get it with ``pip install --no-deps lpips``.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

__all__ = ["LPIPS", "AlexNetFeatures", "CHANNELS"]

CHANNELS = (64, 192, 384, 256, 256)
_RELU_INDICES = (1, 4, 7, 9, 11)  # positions of the tapped relus in alexnet().features
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

BACKBONE_HELP = ("the AlexNet backbone is torchvision's ImageNet checkpoint "
                 "alexnet-owt-7be5be79.pth (torchvision.models.AlexNet_Weights.IMAGENET1K_V1 "
                 "downloads it into the torch hub cache, checkpoints/ folder)")
LINEAR_HELP = ("the LPIPS linear layers ship with the lpips package: install it without its "
               "dependencies (pip install --no-deps lpips) and use the file "
               "lpips/weights/v0.1/alex.pth inside the installed package")


class AlexNetFeatures(nn.Module):
    """The convolutional part of torchvision's AlexNet up to the 5th relu; ``features.<i>`` has
    torchvision's numbering. forward: [B, 3, H, W] -> list of the 5 relu outputs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),    # 0, 1
            nn.MaxPool2d(3, stride=2),                               # 2
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),             # 3, 4
            nn.MaxPool2d(3, stride=2),                               # 5
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),            # 6, 7
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),            # 8, 9
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),            # 10, 11
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _RELU_INDICES:
                outs.append(x)
        return outs


class LPIPS(nn.Module):
    """LPIPS distance (AlexNet, v0.1). ``LPIPS()`` has random weights; use ``from_files``.

    forward(x, y, normalize=False): images [B, 3, H, W] (or [3, H, W]) in [-1, 1], or in [0, 1]
    with normalize=True; H, W >= 32. Returns the distances, a tensor [B] (0 for identical
    images)."""

    def __init__(self):
        super().__init__()
        self.net = AlexNetFeatures()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, backbone_path, linear_path, map_location="cpu") -> "LPIPS":
        """Build from torchvision's AlexNet state dict and the lpips package's v0.1 alex.pth."""
        model = cls()
        backbone = _read(backbone_path, "backbone_path", BACKBONE_HELP, map_location)
        linear = _read(linear_path, "linear_path", LINEAR_HELP, map_location)

        feats = {k: v for k, v in backbone.items() if k.startswith("features.")}
        other = sorted(k for k in backbone if not k.startswith(("features.", "classifier.")))
        _load(model.net, feats, other, backbone_path, "a torchvision AlexNet state dict")

        lin = {}
        for k, v in linear.items():
            head, _, rest = k.partition(".model.1.")
            if head.startswith("lin") and head[3:].isdigit() and rest == "weight":
                lin[f"{head[3:]}.weight"] = v
        other = sorted(k for k in linear if ".model.1." not in k)
        _load(model.lins, lin, other, linear_path, "the lpips package's v0.1 alex.pth")
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.dim() == 3:
            x, y = x[None], y[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS: expected images [B, 3, H, W] or [3, H, W], "
                             f"got {tuple(x.shape)}")
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"LPIPS: images must be at least 32x32, got {tuple(x.shape[-2:])}")
        p = self.shift
        x, y = x.to(device=p.device, dtype=p.dtype), y.to(device=p.device, dtype=p.dtype)
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy):
            diff = (_unit(a) - _unit(b)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide [B, C, h, w] by its L2 norm over channels."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _read(path, arg: str, help_text: str, map_location) -> dict:
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS: {arg} file not found: {path!r}; {help_text}")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"LPIPS: {path!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _load(module: nn.Module, sd: dict, unexpected: list, path, what: str) -> None:
    """Strict load with an error naming the file and the offending keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = list(unexpected) + sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        raise KeyError(f"LPIPS: {path!r} is not {what}: missing {missing[:6]}, unexpected "
                       f"{unexpected[:6]}, wrong shape {wrong[:6]}")
    module.load_state_dict(sd)
