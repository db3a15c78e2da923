"""``varformer analyze tsne`` — paper Fig. 3: t-SNE of the latents of clean and degraded images.

Per image (resized to 256x256) two latents of 32x16x16 = 8192 values (``common.latents``):
F_e = Σ_i F_e_i, the multi-scale quantized VQVAE encoder latent, and F_v = Σ_i F_v_i, the VAR
branch's predicted latent. Each latent gets its own 2-D t-SNE (scikit-learn's
``sklearn.manifold.TSNE``, PCA initialisation, fixed seed) over all images of all groups,
drawn as one scatter plot coloured by group (``--group clean=DIR --group rain=DIR ...``; the
paper uses 100 images per degradation). Written: ``tsne_F_e.png``, ``tsne_F_v.png`` and
``tsne.csv`` (latent, group, image, x, y: one row per image and latent). A smaller spread
between the groups in the F_v plot than in the F_e plot is the paper's "distribution
alignment".
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .common import UsageError, latents, list_images, progress, read_image, stem, write_csv

LATENTS = ("F_e", "F_v")


def parse_groups(items: Sequence[str]) -> List[Tuple[str, str]]:
    """["clean=DIR", "rain=DIR"] -> [("clean", "DIR"), ("rain", "DIR")]."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"--group {item!r}: expected NAME=FOLDER (e.g. clean=gt/ or "
                             f"rain=Rain100L/input)")
        if any(name.strip() == n for n, _ in out):
            raise UsageError(f"--group: the name {name.strip()!r} is given twice")
        out.append((name.strip(), path.strip()))
    if len(out) < 1:
        raise UsageError("give at least one --group NAME=FOLDER")
    return out


@torch.no_grad()
def collect(model, groups: Sequence[Tuple[str, Sequence[str]]], device: str = "cpu",
            var_input: str = "adapter") -> Dict[str, object]:
    """groups [(name, image paths)] -> {"group": [N], "image": [N], "F_e": [N, 8192],
    "F_v": [N, 8192]} (float64 numpy arrays), one row per image."""
    out = {"group": [], "image": [], "F_e": [], "F_v": []}
    total = sum(len(p) for _, p in groups)
    bar = progress(total, "latents")
    for name, paths in groups:
        for path in paths:
            lat = latents(model, read_image(path).to(device), var_input)
            out["F_e"].append(lat["F_e"].sum(1).flatten().double().cpu().numpy())
            out["F_v"].append(lat["f_hat_v"].flatten().double().cpu().numpy())
            out["group"].append(name)
            out["image"].append(path)
            bar.update()
    bar.close()
    for k in LATENTS:
        out[k] = np.stack(out[k])
    return out


def embed(x: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """[N, D] -> [N, 2] with scikit-learn's t-SNE; the perplexity is capped below N as
    scikit-learn requires (at (N − 1) / 3 for small N). Identical rows (no spread at all)
    give all points at (0, 0)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise UsageError("t-SNE needs scikit-learn: pip install scikit-learn") from None
    n = x.shape[0]
    if n < 3:
        raise UsageError(f"t-SNE needs at least 3 images, got {n}")
    if not np.ptp(x, axis=0).any():          # identical rows: t-SNE is undefined (NaN)
        return np.zeros((n, 2))
    perp = float(min(perplexity, max(1.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed)
    return tsne.fit_transform(x.astype(np.float64))


def plot(points: np.ndarray, groups: Sequence[str], title: str, path: str) -> None:
    """Scatter plot coloured by group -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    names = list(dict.fromkeys(groups))
    cmap = plt.get_cmap("tab10")
    g = np.asarray(groups)
    for i, name in enumerate(names):
        sel = g == name
        ax.scatter(points[sel, 0], points[sel, 1], s=14, color=cmap(i % 10), label=name,
                   alpha=0.85, edgecolors="none")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=1.5, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tsne_main(args: argparse.Namespace, model) -> int:
    groups = [(name, list_images(path)[: args.limit]) for name, path in parse_groups(args.group)]
    data = collect(model, groups, args.device, args.var_input)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    titles = {"F_e": "F_e: VQVAE encoder latent", "F_v": "F_v: VAR prediction"}
    for k in LATENTS:
        pts = embed(data[k], args.seed, args.perplexity)
        if not np.ptp(data[k], axis=0).any():
            print(f"varformer analyze tsne: warning: all {len(pts)} images have the same {k} "
                  f"(an untrained model?); its t-SNE is undefined, points put at (0, 0)",
                  file=sys.stderr)
            titles[k] += " (all identical)"
        plot(pts, data["group"], titles[k], os.path.join(args.out, f"tsne_{k}.png"))
        rows += [{"latent": k, "group": g, "image": stem(p), "x": f"{x:.5f}", "y": f"{y:.5f}"}
                 for g, p, (x, y) in zip(data["group"], data["image"], pts)]
    write_csv(os.path.join(args.out, "tsne.csv"), ["latent", "group", "image", "x", "y"], rows)
    print(f"varformer analyze tsne: {len(data['group'])} images in {len(groups)} groups -> "
          f"{args.out} (tsne_F_e.png, tsne_F_v.png, tsne.csv)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tsne", help="Fig. 3: t-SNE of F_e (VQVAE) and F_v (VAR) latents of "
                                    "clean and degraded images",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--group", action="append", required=True, metavar="NAME=FOLDER",
                   help="a group of images (one colour), e.g. clean=gt/ rain=Rain100L/input; "
                        "repeat for each group")
    p.add_argument("--limit", type=int, default=100, help="images per group (default 100)")
    p.add_argument("--perplexity", type=float, default=30.0,
                   help="t-SNE perplexity (default 30, capped for few images)")
    p.set_defaults(run=tsne_main)


__all__ = ["parse_groups", "collect", "embed", "plot", "tsne_main", "LATENTS"]
