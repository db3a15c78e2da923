"""``varformer data sample DIR``: a few small LQ/GT image pairs to try the commands on.

GT images are smooth random colour fields with edges and texture (seeded, so every run writes
the same files); LQ images add Gaussian noise of ``sigma`` (0-255 scale). Written as
``DIR/gt/sample_<i>.png`` and ``DIR/lq/sample_<i>.png`` (8-bit RGB), the layout that
``configs/eval.yml`` and ``varformer restore DIR/lq`` read."""
from __future__ import annotations

import os


def make_samples(folder: str, n: int = 2, height: int = 96, width: int = 128,
                 sigma: float = 25.0, seed: int = 0) -> list[tuple[str, str]]:
    """Write ``n`` pairs of ``height`` x ``width`` images; returns [(lq_path, gt_path)]."""
    import numpy as np
    from PIL import Image

    for name, value, low in (("n", n, 1), ("height", height, 8), ("width", width, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma: expected a number >= 0, got {sigma!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    pairs = []
    for sub in ("gt", "lq"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(n):
        img = np.zeros((height, width, 3))
        for c in range(3):   # a few random plane waves per channel plus a hard edge
            for _ in range(3):
                fx, fy, ph = rng.uniform(-12, 12), rng.uniform(-12, 12), rng.uniform(0, 6.3)
                img[..., c] += np.sin(fx * xx + fy * yy + ph) / 3
        img += 0.5 * (xx + yy * rng.uniform(-1, 1) > rng.uniform(0.3, 0.7))[..., None]
        img = (img - img.min()) / max(img.max() - img.min(), 1e-9)
        gt = np.round(img * 255).astype(np.uint8)
        noisy = gt.astype(np.float64) + rng.normal(0, sigma, gt.shape)
        lq = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        paths = tuple(os.path.join(folder, sub, f"sample_{i}.png") for sub in ("lq", "gt"))
        Image.fromarray(lq).save(paths[0])
        Image.fromarray(gt).save(paths[1])
        pairs.append(paths)
    return pairs
