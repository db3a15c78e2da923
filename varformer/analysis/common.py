"""Shared parts of the analysis tools: loading a model (as ``varformer restore`` does, or a
training run's folder), reading images at the model's 256x256, the VQVAE / VAR latents of an
image, and small image helpers (colour map, captioned grids)."""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 256               # VarFormer's input size: every image is resized to SIZE x SIZE
VAR_INPUTS = ("adapter", "encoder")
WEIGHTS_HELP = ("give --weights FILE (the released net_g_last.pth from the Hugging Face repo "
                "wsy541/VarFormer, a checkpoint of varformer train, or a training run folder), "
                "or --random-init --preset small to try the tool on an untrained model")


class UsageError(ValueError):
    """A problem with the command line or its files: printed as one line, exit status 2."""


# ---- models ------------------------------------------------------------------------------------
def resolve_weights(path: str) -> str:
    """A weights file, or a ``varformer train`` run folder (-> its latest EMA checkpoint), as
    ``varformer restore --weights`` takes it."""
    from varformer.cli import resolve_weights as resolve
    try:
        path = resolve(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not os.path.isfile(path):
        raise UsageError(f"weights file {path!r} not found; {WEIGHTS_HELP}")
    return path


def load_model(weights: Optional[str], *, mode: Optional[str] = None,
               preset: Optional[str] = None, device: str = "cpu", random_init: bool = False,
               seed: int = 0):
    """VarFormer in eval mode on ``device``: from ``weights`` with
    ``VarFormer.from_pretrained`` (``mode`` / ``preset`` None: what the checkpoint says, else
    official / full), or an untrained model (``random_init``; preset default small)."""
    from varformer.models import VarFormer

    if random_init:
        if weights:
            raise UsageError("give either --weights or --random-init, not both")
        torch.manual_seed(seed)
        build = VarFormer.small if (preset or "small") == "small" else VarFormer
        model = build(mode=mode or "official")
    else:
        if not weights:
            raise UsageError(f"no weights: {WEIGHTS_HELP}")
        kw = {k: v for k, v in (("mode", mode), ("preset", preset)) if v is not None}
        model = VarFormer.from_pretrained(resolve_weights(weights), **kw)
    return model.to(device).eval()


# ---- images --------------------------------------------------------------------------------------
def list_images(path: str) -> List[str]:
    """An image file, or the image files directly in a folder (sorted)."""
    from varformer.restoration import IMAGE_EXTENSIONS

    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(path, n)))
        if not found:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path!r}")
        return found
    if not os.path.isfile(path):
        raise UsageError(f"image {path!r} not found")
    return [path]


def read_image(path: str, size: int = SIZE) -> Tensor:
    """An image file -> [1, 3, size, size] in [-1, 1] (bicubic resize, antialiased when
    shrinking, as the official 256x256 protocol)."""
    from varformer.restoration import load_image

    try:
        img = load_image(path)
    except OSError as e:
        raise UsageError(f"cannot read image {path!r}: {e}") from None
    return to_model_input(img, size)


def to_model_input(img: Tensor, size: int = SIZE) -> Tensor:
    """[3, H, W] or [B, 3, H, W] in [0, 1] -> [B, 3, size, size] in [-1, 1]."""
    x = img[None] if img.dim() == 3 else img
    if tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False,
                          antialias=shrink).clamp(0, 1)
    return x.float() * 2 - 1


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


# ---- latents (paper Sec. 3.1) --------------------------------------------------------------------
@torch.no_grad()
def latents(model, lq: Tensor, var_input: str = "adapter") -> Dict[str, Tensor]:
    """One image lq [1, 3, 256, 256] in [-1, 1] -> the per-scale latents of Eq. 2:

    ``F_e`` [1, K, 32, 16, 16]: the multi-scale quantization of the VQVAE encoder latent
    f = quant_conv(encoder(lq)), φ(up(E[idx_k])) per scale (their sum is the VQVAE's own
    reconstruction latent); ``F_v`` [1, K, 32, 16, 16]: the VAR branch's predictions (the
    model's S_v, greedy tokens) with the branch fed the adapter's latent (``var_input=
    "adapter"``, as the model runs; the encoder latent itself for a model without adapter) or
    the encoder latent (``"encoder"``, the paper's Sec. 3.1 set-up before the adapter);
    ``f_hat_v`` [1, 32, 16, 16]: the VAR branch's predicted latent (sum of F_v)."""
    if var_input not in VAR_INPUTS:
        raise UsageError(f"var_input must be one of {VAR_INPUTS}, got {var_input!r}")
    f = model.quant_conv(model.encoder(lq))
    fe = model.quantize.quantize(f).priors
    f_in = model.ft_layers(f) if var_input == "adapter" else f
    s_v, f_hat_v, _, _ = model.var_branch(f_in)
    return {"F_e": fe.float(), "F_v": s_v.float(), "f_hat_v": f_hat_v.float()}


@torch.no_grad()
def decode(model, z: Tensor) -> Tensor:
    """VQVAE decoder D: latent [B, 32, 16, 16] -> image [B, 3, 256, 256] in [-1, 1]."""
    return model.decoder(model.post_quant_conv(z)).clamp(-1, 1)


# ---- pictures ------------------------------------------------------------------------------
_JET = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0],
                 [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] [H, W] -> RGB [H, W, 3] in [0, 1] (a jet-like map: blue low, red high)."""
    v = np.clip(values, 0.0, 1.0) * (len(_JET) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_JET) - 2)
    t = (v - lo)[..., None]
    return _JET[lo] * (1 - t) + _JET[lo + 1] * t


def to_uint8(img) -> np.ndarray:
    """[3, H, W] tensor or [H, W, 3] array in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(img, Tensor):
        img = img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def grid(tiles: Sequence[np.ndarray], captions: Sequence[str], ncols: int,
         caption_h: int = 14):
    """uint8 tiles [h, w, 3] (equal sizes) with a caption above each -> PIL image, row-major,
    ``ncols`` per row."""
    from PIL import Image, ImageDraw

    h, w = tiles[0].shape[:2]
    nrows = -(-len(tiles) // ncols)
    canvas = Image.new("RGB", (ncols * w, nrows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, cap) in enumerate(zip(tiles, captions)):
        x, y = (i % ncols) * w, (i // ncols) * (h + caption_h)
        canvas.paste(Image.fromarray(tile), (x, y + caption_h))
        draw.text((x + 2, y + 1), cap[: max(1, w // 6)], fill="black")
    return canvas


def progress(total: int, desc: str):
    from varformer._progress import Progress
    return Progress(total, desc)


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def unique_stems(paths: Sequence[str]) -> List[str]:
    """File stems, made unique with a counter where two inputs share one."""
    out, seen = [], {}
    for p in paths:
        s = stem(p)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(s if n == 0 else f"{s}_{n}")
    return out


__all__: Tuple[str, ...] = ("SIZE", "VAR_INPUTS", "UsageError", "load_model", "resolve_weights",
                            "list_images", "read_image", "to_model_input", "to_unit", "latents",
                            "decode", "colormap", "to_uint8", "grid", "progress", "stem",
                            "unique_stems", "WEIGHTS_HELP")


def write_csv(path: str, fields: Sequence[str], rows: Sequence[dict]) -> None:
    """rows (dicts keyed by ``fields``) as a CSV file with a header line."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
