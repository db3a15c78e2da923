"""PSNR and SSIM with the BasicSR conventions (``calculate_psnr`` / ``calculate_ssim``).

Images: a numpy array is laid out [H, W] or [H, W, C] (BasicSR's HWC); a torch tensor is laid
out [C, H, W] or [1, C, H, W] (PyTorch's CHW). C is 1 or 3, colour order RGB.

Values, following BasicSR, are 8-bit levels:

- an integer image (uint8, ...) is taken as levels 0..255 as it is;
- a float image is taken to lie in [0, ``input_range``] (default 1, i.e. [0, 1]; pass
  ``input_range=255`` for [0, 255] data). It is scaled to [0, 255], clipped and rounded to
  integers (round half to even), as BasicSR's ``tensor2img`` does before its metrics. A float
  image whose maximum exceeds ``input_range`` by more than 1 % is an error, not a silent clip.

Both metrics then work on float64 values in [0, 255]:

- ``crop_border`` pixels are removed on each side;
- ``test_y_channel=True`` (RGB images only) keeps BT.601 luma on the 0-255 scale,
  Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1]; as in BasicSR's
  ``to_y_channel`` the result is rounded to float32;
- PSNR = 10 log10(255^2 / MSE), the MSE over all pixels and channels (inf for identical images);
- SSIM (Wang et al. 2004) per channel with an 11x11 Gaussian window (sigma 1.5), constants
  C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, 'valid' filtering (the map is 10 pixels smaller in
  each dimension), mean of the map, then the mean over channels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "to_levels", "rgb_to_y", "gaussian_window"]

_Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601 luma weights for R, G, B in [0, 1]


def to_levels(img, input_range: float = 1.0) -> np.ndarray:
    """An image as documented in the module -> float64 array [H, W, C] of integer levels 0..255."""
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3:
            raise ValueError(f"image: expected a tensor [C, H, W] or [1, C, H, W], "
                             f"got shape {tuple(img.shape)}")
        if t.is_floating_point():
            t = t.double()  # numpy has no bfloat16
        arr = t.permute(1, 2, 0).numpy()
    elif isinstance(img, np.ndarray):
        arr = img[..., None] if img.ndim == 2 else img
        if arr.ndim != 3:
            raise ValueError(f"image: expected an array [H, W] or [H, W, C], got shape {img.shape}")
    else:
        raise TypeError(f"image: expected a numpy array or a torch tensor, "
                        f"got {type(img).__name__}")
    if arr.shape[2] not in (1, 3):
        raise ValueError(f"image: expected 1 or 3 channels, got {arr.shape[2]} "
                         f"(shape {tuple(img.shape)}; arrays are HWC, tensors CHW)")
    if arr.size == 0:
        raise ValueError(f"image: empty image of shape {tuple(img.shape)}")

    if np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.float64)
        if out.min() < 0 or out.max() > 255:
            raise ValueError(f"image: integer values must be 8-bit levels 0..255, got "
                             f"[{out.min():g}, {out.max():g}]")
        return out
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"image: unsupported dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("image: contains NaN or infinite values")
    if not input_range > 0:
        raise ValueError(f"input_range: expected a positive number, got {input_range!r}")
    if arr.max() > input_range * 1.01:
        raise ValueError(f"image: float values reach {arr.max():.4g}, above input_range="
                         f"{input_range:g}; for data in [0, 255] pass input_range=255")
    return np.round(np.clip(arr * (255.0 / input_range), 0, 255))


def rgb_to_y(levels: np.ndarray) -> np.ndarray:
    """float64 RGB levels [H, W, 3] in [0, 255] -> BT.601 luma [H, W, 1] on the 0-255 scale
    (16..235), with BasicSR's ``to_y_channel`` float steps (float32 input / 255, float64 dot
    product in BGR order, float32 result / 255, times 255 in float32) so the values match it."""
    x = levels.astype(np.float32) / np.float32(255.0)
    y = x[..., ::-1] @ np.array(_Y_WEIGHTS[::-1]) + 16.0
    y = (y / 255.0).astype(np.float32) * np.float32(255.0)
    return y.astype(np.float64)[..., None]


def _prepare(img, ref, crop_border: int, test_y_channel: bool, input_range: float):
    a, b = to_levels(img, input_range), to_levels(ref, input_range)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs reference {b.shape} (as [H, W, C])")
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) \
            or crop_border < 0:
        raise ValueError(f"crop_border: expected an integer >= 0, got {crop_border!r}")
    if crop_border:
        h, w = a.shape[:2]
        if 2 * crop_border >= min(h, w):
            raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel:
        if a.shape[2] != 3:
            raise ValueError("test_y_channel=True needs RGB images (3 channels)")
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def psnr(img, ref, crop_border: int = 0, test_y_channel: bool = False,
         input_range: float = 1.0) -> float:
    """PSNR in dB of ``img`` against ``ref`` (see the module docstring for formats); inf for
    identical images."""
    a, b = _prepare(img, ref, crop_border, test_y_channel, input_range)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D Gaussian [size], normalised to sum 1 (what cv2.getGaussianKernel(11, 1.5) gives)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering of [N, 1, H, W] with the 1-D kernel g [k]."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1))
    return F.conv2d(x, g.view(1, 1, 1, k))


def ssim(img, ref, crop_border: int = 0, test_y_channel: bool = False,
         input_range: float = 1.0) -> float:
    """SSIM of ``img`` against ``ref`` (see the module docstring): 11x11 Gaussian window,
    sigma 1.5, valid filtering, mean over the map and the channels. Needs H, W >= 11 after
    cropping."""
    a, b = _prepare(img, ref, crop_border, test_y_channel, input_range)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"ssim: the image ({a.shape[0]}x{a.shape[1]} after cropping) must be "
                         f"at least 11x11")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[:, None]  # [C, 1, H, W]
    y = torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1)))[:, None]
    g = torch.from_numpy(gaussian_window())
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(ssim_map.mean(dim=(1, 2, 3)).mean())
