"""``varformer analyze dae`` — paper Fig. 7: the DAE's region-specific fusion weights.

At each level i = 1..4 of the main encoder and decoder, DAE fuses the feature F with the
projected prior Ŝ per pixel (Eq. 4): (w1^g, w2^g) = softmax(conv(RSTBs(cat(F, Ŝ)))) and
F_g = w1^g·F + w2^g·Ŝ, so w1^g + w2^g = 1 at every pixel; w1^g weights the image feature,
w2^g the VAR prior. For each image (resized to 256x256) the model runs once and the weights
of every level are upsampled (bilinear) to 256x256, drawn with a colour map (blue 0, red 1)
and overlaid on the input: ``<name>_dae.png`` (rows: encoder levels 1-4, decoder levels 4-1;
columns: input, w1^g, w2^g), ``<name>_dae.npz`` (the weights at their own resolution, keys
``encoder_L1`` … ``decoder_L1``, each [2, H_i, W_i]) and ``dae.csv`` (mean and spread of w2^g
per image and level).
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (SIZE, UsageError, colormap, grid, list_images, progress, read_image,
                     to_uint8, to_unit, unique_stems, write_csv)

PARTS = (("encoder", "Mainencoder", (1, 2, 3, 4)), ("decoder", "main_decoder", (4, 3, 2, 1)))


@torch.no_grad()
def dae_weights(model, lq: Tensor) -> Dict[Tuple[str, int], Tensor]:
    """lq [B, 3, 256, 256] in [-1, 1] -> {(part, level): [B, 2, H_i, W_i]} with channel 0 =
    w1^g (feature) and 1 = w2^g (VAR prior), per pixel summing to 1; one model forward with
    hooks on the DAE fusion convs."""
    if not model.ablation.get("dae", True):
        raise UsageError("this model was built without DAE (ablation dae=false): it has no "
                         "fusion weights to show")
    found: Dict[Tuple[str, int], Tensor] = {}
    handles = []
    for part, attr, levels in PARTS:
        for i in levels:
            conv = getattr(model, attr).DAE[f"Level_{i}"].conv1x1

            def hook(_mod, _inp, out, key=(part, i)):
                found[key] = out.float().softmax(1)
            handles.append(conv.register_forward_hook(hook))
    try:
        model(lq)
    finally:
        for h in handles:
            h.remove()
    order = [(part, i) for part, _, levels in PARTS for i in levels]
    return {k: found[k] for k in order if k in found}


def overlay(image: Tensor, weight: Tensor, alpha: float = 0.55) -> np.ndarray:
    """image [3, 256, 256] in [0, 1], weight [h, w] in [0, 1] -> uint8 [256, 256, 3]: the
    bilinearly upsampled weight's colour map blended over the image."""
    w = F.interpolate(weight[None, None].float(), size=image.shape[-2:], mode="bilinear",
                      align_corners=False)[0, 0].clamp(0, 1).cpu().numpy()
    img = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return to_uint8((1 - alpha) * img + alpha * colormap(w))


def dae_main(args: argparse.Namespace, model) -> int:
    files = [f for p in args.inputs for f in list_images(p)]
    os.makedirs(args.out, exist_ok=True)
    names = unique_stems(files)
    rows = []
    bar = progress(len(files), "dae")
    for path, name in zip(files, names):
        lq = read_image(path).to(args.device)
        weights = dae_weights(model, lq)
        img = to_unit(lq)[0].cpu()
        tiles, captions = [], []
        arrays = {}
        for (part, i), w in weights.items():
            w = w[0].cpu()
            arrays[f"{part}_L{i}"] = w.numpy()
            tiles += [to_uint8(img), overlay(img, w[0]), overlay(img, w[1])]
            res = f"{w.shape[-2]}x{w.shape[-1]}"
            captions += [f"{part} L{i} ({res})", f"w1 feature {float(w[0].mean()):.2f}",
                         f"w2 prior {float(w[1].mean()):.2f}"]
            rows.append({"image": name, "part": part, "level": i, "resolution": res,
                         "w2_mean": f"{float(w[1].mean()):.5f}",
                         "w2_std": f"{float(w[1].std()):.5f}",
                         "w2_min": f"{float(w[1].min()):.5f}",
                         "w2_max": f"{float(w[1].max()):.5f}"})
        grid(tiles, captions, ncols=3).save(os.path.join(args.out, f"{name}_dae.png"))
        np.savez_compressed(os.path.join(args.out, f"{name}_dae.npz"), **arrays)
        bar.update()
    bar.close()
    write_csv(os.path.join(args.out, "dae.csv"), ["image", "part", "level", "resolution",
                                                   "w2_mean", "w2_std", "w2_min", "w2_max"], rows)
    print(f"varformer analyze dae: {len(files)} image(s) -> {args.out} "
          f"(<name>_dae.png, <name>_dae.npz, dae.csv); input size {SIZE}x{SIZE}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("dae", help="Fig. 7: DAE fusion weights w1/w2 per level, overlaid on "
                                   "the input",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders")
    p.set_defaults(run=dae_main)


__all__ = ["dae_weights", "overlay", "dae_main", "PARTS"]
