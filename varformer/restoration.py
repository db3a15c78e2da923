"""Full-resolution restoration with a fixed-size model (VarFormer works on 256x256 crops).

``restore(model, image)`` runs ``model`` (any callable mapping [n, 3, tile, tile] in [-1, 1]
to the same shape) over an image of any size:

- ``mode="tiled"`` (default): overlapping tile x tile windows, blended with a smooth weight
  window, so the model sees the image at its native resolution;
- ``mode="resize"``: the official protocol, bicubic resize to tile x tile and back.

``load_image`` / ``save_image`` read and write RGB files with PIL as float [3, H, W] in [0, 1].
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MODES = ("tiled", "resize")
_RANGE_TOL = 1e-2  # accepted excursion outside value_range, as a fraction of its width


# ----------------------------------------------------------------------------- file helpers

def load_image(path) -> torch.Tensor:
    """Read an image file as RGB: float32 tensor [3, H, W] in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        return _from_uint8(np.asarray(im.convert("RGB")))


def save_image(tensor: torch.Tensor, path) -> None:
    """Write a float tensor [3, H, W] (or [1, 3, H, W]) in [0, 1] as an 8-bit RGB file; the
    format follows the extension of ``path``."""
    from PIL import Image

    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"tensor: expected shape [3, H, W] or [1, 3, H, W], "
                         f"got {tuple(tensor.shape)}")
    options = {"quality": 95} if str(path).lower().endswith((".jpg", ".jpeg")) else {}
    Image.fromarray(_to_uint8(tensor)).save(path, **options)


def _from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    # np.array copies: arrays of PIL images are read-only
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255


def _to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """float [3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    t = (tensor.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return t.permute(1, 2, 0).cpu().numpy()


def _is_pil(obj) -> bool:
    pil = sys.modules.get("PIL.Image")  # a PIL image implies PIL is already imported
    return pil is not None and isinstance(obj, pil.Image)


# ----------------------------------------------------------------------------- argument checks

def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_options(tile: int = 256, overlap: int = 32, batch_size: int = 8,
                  mode: str = "tiled") -> None:
    """Raise ValueError for a bad tile / overlap / batch_size / mode (what ``restore`` takes)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    tile = _int_arg("tile", tile, 16)
    _int_arg("batch_size", batch_size, 1)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) \
            or not 0 <= overlap < tile:
        raise ValueError(f"overlap: expected an integer with 0 <= overlap < tile (= {tile}), "
                         f"got {overlap!r}")


def _check_value_range(value_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range: expected (low, high), got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range: expected finite (low, high) with low < high, "
                         f"got {value_range!r}")
    return lo, hi


def _check_tensor(x: torch.Tensor, lo: float, hi: float) -> None:
    """Shape, dtype and value checks for a tensor image [3, H, W] or [B, 3, H, W]."""
    if x.dim() not in (3, 4):
        raise ValueError(f"image: expected a tensor of shape [3, H, W] or [B, 3, H, W], "
                         f"got shape {tuple(x.shape)}")
    if x.shape[-3] != 3:
        raise ValueError(f"image: expected 3 (RGB) channels in dimension -3, got {x.shape[-3]} "
                         f"(shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"image: expected a floating-point tensor, got {x.dtype}; convert "
                        f"8-bit data with image.float() / 255 or pass a uint8 HxWx3 numpy array")
    if x.numel() == 0:
        raise ValueError(f"image: expected a non-empty image, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("image: contains NaN or infinite values")
    mn, mx = (v.item() for v in torch.aminmax(x))
    tol = _RANGE_TOL * (hi - lo)
    if mn >= lo - tol and mx <= hi + tol:
        return
    if mx > hi + tol and mx <= 255 + tol and hi <= 1:
        hint = "for 8-bit values pass value_range=(0, 255) or divide the image by 255"
    elif mn < lo - tol and mn >= -1 - tol and mx <= 1 + tol:
        hint = "for images in [-1, 1] pass value_range=(-1, 1)"
    else:
        hint = "pass the range the image is in as value_range=(low, high)"
    raise ValueError(f"image: values span [{mn:.4g}, {mx:.4g}], outside "
                     f"value_range=({lo:g}, {hi:g}); {hint}")


def _model_param(model):
    """The model's first parameter, or None."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    try:
        return next(iter(params()), None)
    except TypeError:
        return None


# ----------------------------------------------------------------------------- restoration

def restore(model, image, *, tile: int = 256, overlap: int = 32, batch_size: int = 8,
            mode: str = "tiled", device=None, value_range=(0, 1)):
    """Restore an image of any size with a model that works on [n, 3, tile, tile] in [-1, 1].

    image: float tensor [3, H, W] or [B, 3, H, W] with values in ``value_range``; or a PIL image
    or a uint8 numpy array [H, W, 3] (``value_range`` is then ignored). Returns the restored
    image as the same kind and shape: a tensor on the image's device in its dtype, clamped to
    ``value_range``; a PIL RGB image; or a uint8 array [H, W, 3].

    mode="tiled": tile x tile windows whose starts are ``tile - overlap`` apart (the last one
    aligned to the image end; images smaller than a tile are reflect-padded), blended with a
    raised-cosine weight over the ``overlap`` border of each tile. mode="resize": bicubic resize
    to tile x tile (antialiased when shrinking), one model call per image, bicubic back to H x W.

    The model runs under torch.no_grad() on ``device`` (default: its first parameter's device,
    else the image's) in batches of at most ``batch_size`` tiles; its train/eval state is left
    as the caller set it.
    """
    check_options(tile, overlap, batch_size, mode)
    kind = "tensor"
    if _is_pil(image):
        kind, x, (lo, hi) = "pil", _from_uint8(np.asarray(image.convert("RGB"))), (0.0, 1.0)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image: numpy arrays must be uint8 [H, W, 3], got dtype "
                            f"{image.dtype}; pass float data as a tensor [3, H, W]")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected a uint8 array of shape [H, W, 3], "
                             f"got shape {image.shape}")
        kind, x, (lo, hi) = "numpy", _from_uint8(image), (0.0, 1.0)
    elif isinstance(image, torch.Tensor):
        x, (lo, hi) = image, _check_value_range(value_range)
    else:
        raise TypeError(f"image: expected a float tensor [3, H, W] or [B, 3, H, W], a PIL image "
                        f"or a uint8 numpy array [H, W, 3], got {type(image).__name__}")
    _check_tensor(x, lo, hi)

    param = _model_param(model)
    run_device = torch.device(device) if device is not None else (
        param.device if param is not None else x.device)
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    model_dtype = param.dtype if param is not None and param.is_floating_point() else work_dtype

    with torch.no_grad():
        x4 = x if x.dim() == 4 else x[None]
        z = (x4.to(work_dtype).clamp(lo, hi) - lo) * (2 / (hi - lo)) - 1  # [B, 3, H, W] in [-1, 1]
        run = _Runner(model, run_device, model_dtype, tile)
        y = _tiled(run, z, tile, overlap, batch_size) if mode == "tiled" \
            else _resized(run, z, tile, batch_size)
        out = ((y + 1) * ((hi - lo) / 2) + lo).clamp(lo, hi).to(x.dtype)
    if x.dim() == 3:
        out = out[0]
    if kind == "numpy":
        return _to_uint8(out)
    if kind == "pil":
        from PIL import Image
        return Image.fromarray(_to_uint8(out))
    return out


class _Runner:
    """Calls the model on one batch [n, 3, tile, tile]: moves it to the model's device and dtype,
    checks the output shape and brings the result back as the batch's device and dtype."""

    def __init__(self, model, device, dtype, tile):
        self.model, self.device, self.dtype, self.tile = model, device, dtype, tile

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inp = batch.to(device=self.device, dtype=self.dtype)
        out = self.model(inp)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected it to return a tensor [n, 3, {self.tile}, "
                            f"{self.tile}], got {type(out).__name__}")
        if out.shape != inp.shape:
            raise ValueError(f"model: returned shape {tuple(out.shape)} for input "
                             f"{tuple(inp.shape)}; expected the input's shape")
        return out.to(device=batch.device, dtype=batch.dtype)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along an axis of ``length >= tile``: 0, tile - overlap, ... and the last
    window aligned to the end (length - tile)."""
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def blend_window(tile: int, overlap: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """1-D weights [tile]: 1 in the interior, a raised-cosine ramp over the ``overlap`` pixels
    next to each end, strictly positive everywhere."""
    i = torch.arange(tile, dtype=torch.float64)
    d = torch.minimum(i, tile - 1 - i)  # distance to the nearest tile edge
    ramp = torch.sin(0.5 * math.pi * (d + 1) / (overlap + 1)) ** 2
    return torch.where(d < overlap, ramp, torch.ones_like(ramp)).to(dtype=dtype, device=device)


def _pad_to(z: torch.Tensor, tile: int) -> torch.Tensor:
    """Pad [B, 3, H, W] at the bottom/right up to at least tile x tile (reflect, or replicate
    where the image is too small to reflect)."""
    h, w = z.shape[-2:]
    if w < tile:
        z = F.pad(z, (0, tile - w, 0, 0), mode="reflect" if tile - w < w else "replicate")
    if h < tile:
        z = F.pad(z, (0, 0, 0, tile - h), mode="reflect" if tile - h < h else "replicate")
    return z


def _tiled(run: _Runner, z: torch.Tensor, tile: int, overlap: int,
           batch_size: int) -> torch.Tensor:
    """Blend model outputs over overlapping windows: [B, 3, H, W] -> [B, 3, H, W]."""
    b, _, h, w = z.shape
    zp = _pad_to(z, tile)
    hp, wp = zp.shape[-2:]
    ys, xs = tile_starts(hp, tile, overlap), tile_starts(wp, tile, overlap)
    win = blend_window(tile, overlap, z.dtype, z.device)
    win = win[:, None] * win[None, :]  # [tile, tile]

    acc = torch.zeros_like(zp)  # sum of weight * output
    weight = zp.new_zeros(hp, wp)  # sum of weights; the same for every image of the batch
    for y0 in ys:
        for x0 in xs:
            weight[y0:y0 + tile, x0:x0 + tile] += win

    jobs = [(i, y0, x0) for i in range(b) for y0 in ys for x0 in xs]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        out = run(torch.stack([zp[i, :, y0:y0 + tile, x0:x0 + tile] for i, y0, x0 in chunk]))
        for (i, y0, x0), o in zip(chunk, out):
            acc[i, :, y0:y0 + tile, x0:x0 + tile] += win * o
    return (acc / weight)[..., :h, :w]


def _resized(run: _Runner, z: torch.Tensor, tile: int, batch_size: int) -> torch.Tensor:
    """Official protocol: [B, 3, H, W] -> bicubic tile x tile -> model -> bicubic [B, 3, H, W]."""
    h, w = z.shape[-2:]

    def resize(t, size, shrink):
        if tuple(t.shape[-2:]) == size:
            return t
        return F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=shrink)

    small = resize(z, (tile, tile), shrink=h > tile or w > tile)
    out = torch.cat([run(small[i:i + batch_size]) for i in range(0, len(small), batch_size)])
    return resize(out, (h, w), shrink=h < tile or w < tile)
