"""``varformer analyze scales`` — paper Eq. 2 / Fig. 2 (c-d): which VAR scales remove which
degradation.

For a degraded image, F_e = [F_e_i] (i = 1..K = 10) are the per-scale embeddings of the
multi-scale quantization of its VQVAE encoder latent and F_v = [F_v_i] the VAR branch's
per-scale predictions (``common.latents``). For each replacement set C ⊆ {1..K}

    I_rec(C) = D( Σ_{i∉C} F_e_i + Σ_{i∈C} F_v_i )

is decoded by the VQVAE decoder D: C = none is the VQVAE's own reconstruction of the input,
C = all the decoding of the VAR prediction. Default sets: none, every prefix {1..k}
(k = 1..K−1), every suffix {k..K} (k = 2..K) and all. Images are resized to 256x256 first;
with a clean image (also resized), PSNR / SSIM (``varformer.eval.metrics``, 8-bit RGB) of each
I_rec(C) against it.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .common import (UsageError, decode, grid, latents, list_images, progress, read_image,
                     to_uint8, to_unit, unique_stems, write_csv)

K = 10   # VAR scales (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def default_sets(k: int = K) -> List[Tuple[int, ...]]:
    """none, prefixes {1..j} (j < k), suffixes {j..k} (j > 1), all — 1-based scale numbers."""
    out = [()]
    out += [tuple(range(1, j + 1)) for j in range(1, k)]
    out += [tuple(range(j, k + 1)) for j in range(2, k + 1)]
    out.append(tuple(range(1, k + 1)))
    return out


def parse_sets(spec: str, k: int = K) -> List[Tuple[int, ...]]:
    """``"none;1-3;4-10;1,5,9;all"`` -> [(), (1, 2, 3), (4..10), (1, 5, 9), (1..10)]: sets
    separated by ``;``, each ``none``, ``all``, ``default`` (the default sets) or a comma list
    of scale numbers 1..k and ranges a-b."""
    out: List[Tuple[int, ...]] = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        if part == "none":
            out.append(())
            continue
        if part == "all":
            out.append(tuple(range(1, k + 1)))
            continue
        if part == "default":
            out += default_sets(k)
            continue
        scales = set()
        for item in (x.strip() for x in part.split(",")):
            try:
                a, b = (item.split("-", 1) if "-" in item else (item, item))
                a, b = int(a), int(b)
            except ValueError:
                raise UsageError(f"--sets: {item!r} in {part!r} is not a scale number 1..{k} "
                                 f"or a range a-b") from None
            if not (1 <= a <= b <= k):
                raise UsageError(f"--sets: {item!r} is outside the scales 1..{k}")
            scales.update(range(a, b + 1))
        out.append(tuple(sorted(scales)))
    if not out:
        raise UsageError("--sets: no replacement set given")
    return out


def set_label(c: Sequence[int], k: int = K) -> str:
    """() -> 'none', all -> 'all', a run -> '1-3', else '1,5,9'."""
    c = tuple(c)
    if not c:
        return "none"
    if c == tuple(range(1, k + 1)):
        return "all"
    if c == tuple(range(c[0], c[-1] + 1)) and len(c) > 1:
        return f"{c[0]}-{c[-1]}"
    return ",".join(map(str, c))


@torch.no_grad()
def replace_scales(model, lq: Tensor, sets: Sequence[Sequence[int]],
                   var_input: str = "adapter") -> Dict[str, object]:
    """lq [1, 3, 256, 256] in [-1, 1] -> {"images": [1, 3, 256, 256] in [-1, 1] per set
    (Eq. 2), "F_e", "F_v" [1, K, 32, 16, 16], "f_hat_v" [1, 32, 16, 16]}."""
    lat = latents(model, lq, var_input)
    fe, fv = lat["F_e"], lat["F_v"]
    k = fe.shape[1]
    images = []
    for c in sets:
        mask = torch.zeros(k, dtype=torch.bool, device=fe.device)
        if len(c):
            mask[torch.tensor([i - 1 for i in c], device=fe.device)] = True
        z = torch.where(mask[None, :, None, None, None], fv, fe).sum(1)
        images.append(decode(model, z))
    return dict(lat, images=images)


def scales_main(args: argparse.Namespace, model) -> int:
    from varformer.eval.metrics import psnr, ssim

    sets = parse_sets(args.sets) if args.sets else default_sets()
    files = [f for p in args.inputs for f in list_images(p)]
    cleans: List[Optional[str]] = [None] * len(files)
    if args.clean:
        cleans = [f for p in args.clean for f in list_images(p)]
        if len(cleans) != len(files):
            raise UsageError(f"--clean gives {len(cleans)} images for {len(files)} degraded "
                             f"ones; give one clean image per degraded image, in the same order")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    names = unique_stems(files)
    bar = progress(len(files) * len(sets), "scales")
    for path, clean_path, name in zip(files, cleans, names):
        lq = read_image(path).to(args.device)
        gt = to_unit(read_image(clean_path))[0] if clean_path else None
        res = replace_scales(model, lq, sets, args.var_input)
        tiles = [to_uint8(to_unit(lq)[0])]
        captions = ["input"]
        if gt is not None:
            tiles.append(to_uint8(gt))
            captions.append("clean")
        for c, img in zip(sets, res["images"]):
            out = to_unit(img)[0].cpu()
            label = set_label(c)
            row = {"image": name, "set": label, "scales": " ".join(map(str, c)),
                   "psnr": "", "ssim": ""}
            cap = f"C={label}"
            if gt is not None:
                out8 = (out * 255).round() / 255
                row["psnr"], row["ssim"] = f"{psnr(out8, gt):.4f}", f"{ssim(out8, gt):.4f}"
                cap += f" {float(row['psnr']):.2f}dB"
            rows.append(row)
            tiles.append(to_uint8(out))
            captions.append(cap)
            bar.update()
        grid(tiles, captions, ncols=args.columns).save(os.path.join(args.out,
                                                                    f"{name}_scales.png"))
    bar.close()
    write_csv(os.path.join(args.out, "scales.csv"), ["image", "set", "scales", "psnr", "ssim"],
              rows)
    print(f"varformer analyze scales: {len(files)} image(s) x {len(sets)} sets -> "
          f"{args.out} (<name>_scales.png, scales.csv)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "scales", help="Eq. 2 / Fig. 2: decode the VQVAE latent with some scales replaced by "
                       "the VAR predictions",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IN", help="degraded image files or folders")
    p.add_argument("--clean", nargs="+", metavar="GT",
                   help="the clean image of each degraded one (files or folders, same order): "
                        "adds PSNR / SSIM per replacement set to scales.csv")
    p.add_argument("--sets", metavar="SPEC",
                   help="replacement sets, e.g. 'none;1-3;4-10;1,5,9;all' (1-based scales; "
                        "default: none, each prefix, each suffix, all)")
    p.add_argument("--columns", type=int, default=6, help="tiles per row of the grid (6)")
    p.set_defaults(run=scales_main)


__all__ = ["default_sets", "parse_sets", "set_label", "replace_scales", "scales_main", "K"]
