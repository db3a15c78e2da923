"""Training losses (spec §4.3; paper Eq. 7 and Eq. 8).

Stage 1 (Eq. 7, official weights): ``ce · CE(logits, gt_idx) + feat · MSE(lq_feat, f_hat_gt)``.
Stage 2 (Eq. 8 plus the official extra terms): ``psnr · PSNRLoss + percep · VGG19(relu5_4) +
l1 · L1 + feat · MSE + ce · CE``. A weight of 0 disables a term (it is not computed).

Images are in [-1, 1]; ``logits`` [B, 680, V]; ``gt_idx`` [B, 680]; latents [B, 32, 16, 16]."""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision's vgg19().features layout: (name, kind) per index; "M" = max-pool
_VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M")
VGG19_WEIGHTS_FILE = "vgg19-dcbb9e9d.pth"


def _vgg19_names():
    names, block, conv = [], 1, 1
    for v in _VGG19_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


VGG19_LAYERS = _vgg19_names()      # 37 names, index = position in vgg19().features


class VGG19Features(nn.Module):
    """VGG19 conv part laid out as torchvision's ``vgg19().features`` (keys ``features.N.*``),
    truncated after the last requested layer, frozen and in eval mode.

    forward(x [B, 3, H, W] in [0, 1]) -> {layer name: feature}; ImageNet mean/std applied
    inside. ``weights``: a torchvision-format ImageNet file (``vgg19-dcbb9e9d.pth``) or None
    (random init, for tests)."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, layers: Sequence[str] = ("relu5_4",), weights: Optional[str] = None):
        super().__init__()
        unknown = [n for n in layers if n not in VGG19_LAYERS]
        if unknown:
            raise ValueError(f"VGG19Features: unknown layers {unknown}; names are {VGG19_LAYERS}")
        self.layers = tuple(layers)
        last = max(VGG19_LAYERS.index(n) for n in layers)
        mods, cin = [], 3
        for v in _VGG19_CFG:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(cin, v, 3, 1, 1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*mods[:last + 1])
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            self.load_weights(weights)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"VGG19Features: weights file not found: {path!r}. The perceptual loss needs "
                f"torchvision's ImageNet VGG19 weights, file '{VGG19_WEIGHTS_FILE}' "
                "(torchvision.models.VGG19_Weights.IMAGENET1K_V1, from torchvision's model zoo);"
                " download it and set loss.vgg_weights to its path")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise KeyError(f"VGG19Features: {path} is not a torchvision vgg19 file; missing "
                           f"{missing[:4]}")
        self.load_state_dict({k: sd[k] for k in own})

    def train(self, mode: bool = True):          # always eval (no dropout/bn anyway)
        return super().train(False)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = {}
        for i, layer in enumerate(self.features):
            h = layer(h)
            if VGG19_LAYERS[i] in self.layers:
                out[VGG19_LAYERS[i]] = h
        return out


class PerceptualLoss(nn.Module):
    """Σ_layer w · criterion(ψ(out), ψ(gt).detach()) on [-1, 1] images (mapped to [0, 1]);
    criterion l1 (official) or l2 (paper Eq. 8, mean squared error)."""

    def __init__(self, layer_weights: Dict[str, float], criterion: str = "l1",
                 weights: Optional[str] = None):
        super().__init__()
        if criterion not in ("l1", "l2"):
            raise ValueError(f"PerceptualLoss: criterion must be l1 or l2, got {criterion!r}")
        self.layer_weights = dict(layer_weights)
        self.criterion = F.l1_loss if criterion == "l1" else F.mse_loss
        self.vgg = VGG19Features(tuple(self.layer_weights), weights)

    def forward(self, out: Tensor, gt: Tensor) -> Tensor:
        fo = self.vgg((out + 1) / 2)
        with torch.no_grad():
            fg = self.vgg((gt.detach() + 1) / 2)
        return sum(w * self.criterion(fo[k].float(), fg[k].float())
                   for k, w in self.layer_weights.items())


def psnr_loss(out: Tensor, gt: Tensor, eps: float = 1e-8) -> Tensor:
    """−PSNR up to a constant (official PSNRLoss without its weight, [-1, 1] RGB, toY False):
    (10 / ln 10) · mean_b log(mean_{c,h,w} (out − gt)² + eps). out, gt [B, 3, H, W]."""
    mse = (out.float() - gt.float()).pow(2).flatten(1).mean(1)
    return (10.0 / math.log(10.0)) * torch.log(mse + eps).mean()


def ce_loss(logits: Tensor, gt_idx: Tensor) -> Tensor:
    """logits [B, L, V], gt_idx [B, L] -> mean cross-entropy over the B·L tokens (fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), gt_idx.flatten())


def feat_loss(lq_feat: Tensor, f_hat_gt: Tensor) -> Tensor:
    """mean (lq_feat − sg(f_hat_gt))², both [B, 32, 16, 16]."""
    return F.mse_loss(lq_feat.float(), f_hat_gt.detach().float())


@torch.no_grad()
def gt_targets(model: nn.Module, gt: Tensor):
    """The stage-1 targets from the frozen VQVAE of ``model``: gt [B, 3, 256, 256] ->
    (gt_idx [B, 680] int64 = cat of the per-scale indices, f_hat_gt [B, 32, 16, 16])."""
    with torch.autocast(gt.device.type, enabled=False):
        f = model.quant_conv(model.encoder(gt.float()))
        q = model.quantize.quantize(f)
    return torch.cat(q.indices, 1), q.f_hat


class VarFormerLoss(nn.Module):
    """Weighted sum of the terms with nonzero weight.

    forward(out [B,3,H,W] or None, lq_feat, logits, gt, gt_idx, f_hat_gt) -> (total, {name: value})
    with the unweighted terms (detached) in the dict."""

    def __init__(self, ce: float = 0.1, feat: float = 0.5, l1: float = 0.0, psnr: float = 0.0,
                 percep: float = 0.0, percep_layer: str = "relu5_4",
                 percep_criterion: str = "l1", vgg_weights: Optional[str] = None):
        super().__init__()
        self.weights = {"ce": ce, "feat": feat, "l1": l1, "psnr": psnr, "percep": percep}
        self.percep = (PerceptualLoss({percep_layer: 1.0}, percep_criterion, vgg_weights)
                       if percep else None)
        if percep and vgg_weights is None:
            raise ValueError("VarFormerLoss: the perceptual term needs loss.vgg_weights (path to "
                             f"torchvision's '{VGG19_WEIGHTS_FILE}')")

    @property
    def needs_image(self) -> bool:
        """Whether any term uses the restored image (stage 1 skips the U-Net otherwise)."""
        return any(self.weights[k] for k in ("l1", "psnr", "percep"))

    def forward(self, out: Optional[Tensor], lq_feat: Tensor, logits: Optional[Tensor],
                gt: Tensor, gt_idx: Tensor, f_hat_gt: Tensor):
        w, terms = self.weights, {}
        if w["ce"] and logits is not None:
            terms["ce"] = ce_loss(logits, gt_idx)
        if w["feat"]:
            terms["feat"] = feat_loss(lq_feat, f_hat_gt)
        if out is not None:
            if w["l1"]:
                terms["l1"] = (out.float() - gt.float()).abs().mean()
            if w["psnr"]:
                terms["psnr"] = psnr_loss(out, gt)
            if w["percep"]:
                terms["percep"] = self.percep(out, gt)
        if not terms:
            raise ValueError("VarFormerLoss: every loss weight is 0")
        total = sum(w[k] * v for k, v in terms.items())
        return total, {k: v.detach() for k, v in terms.items()}


def build_loss(cfg: Dict) -> VarFormerLoss:
    """From the config's ``loss`` section."""
    return VarFormerLoss(**cfg)


__all__ = ["VGG19Features", "VGG19_LAYERS", "VGG19_WEIGHTS_FILE", "PerceptualLoss", "psnr_loss",
           "ce_loss", "feat_loss", "gt_targets", "VarFormerLoss", "build_loss"]
