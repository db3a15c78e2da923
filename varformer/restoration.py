"""Full-resolution restoration with a fixed-size model (VarFormer works on 256x256 crops).

``restore(model, image)`` runs ``model`` (any callable mapping [n, 3, tile, tile] in [-1, 1]
to the same shape) over an image of any size:

- ``mode="tiled"`` (default): overlapping tile x tile windows, blended with a smooth weight
  window, so the model sees the image at its native resolution;
- ``mode="resize"``: the official protocol, bicubic resize to tile x tile and back.

``read_image_file`` / ``save_image`` read and write image files with PIL as float [3, H, W] in
[0, 1], keeping the alpha channel, grey and the sample depth of the file (16-bit in, 16-bit
out); ``load_image`` returns the RGB tensor only.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MODES = ("tiled", "resize")
_RANGE_TOL = 1e-2  # accepted excursion outside value_range, as a fraction of its width


# ----------------------------------------------------------------------------- file helpers

class ImageFormatError(OSError):
    """An image file that cannot be converted to RGB faithfully (one-line message)."""


@dataclass
class ImageData:
    """An image file as read by ``read_image_file``.

    rgb: float32 [3, H, W] in [0, 1] (grey images repeated to 3 channels); alpha: float32
    [1, H, W] in [0, 1] or None; bits: sample depth of the file (8, 16, or 32 for float
    images); gray: the file had one colour channel; mode: PIL's mode of the file; icc: the
    file's embedded ICC colour profile (bytes, not applied: the samples are as stored) or None."""
    rgb: torch.Tensor
    alpha: Optional[torch.Tensor] = None
    bits: int = 8
    gray: bool = False
    mode: str = "RGB"
    icc: Optional[bytes] = None


_EXIF_ORIENTATION = 0x0112
_PNG16_RAW = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _orient(a: np.ndarray, orientation) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an [H, W, C] array, as PIL's exif_transpose."""
    if orientation in (None, 1):
        return a
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.transpose(1, 0, 2), 6: lambda x: np.rot90(x, -1),
           7: lambda x: x[::-1, ::-1].transpose(1, 0, 2), 8: lambda x: np.rot90(x, 1)}
    if orientation not in ops:
        return a
    return np.ascontiguousarray(ops[orientation](a))


def _high_low(path, low_args) -> np.ndarray:
    """uint16 samples of a 16-bit file whose 8-bit decode by PIL keeps the high bytes: that
    decode plus one whose tiles unpack with ``low_args(tile)`` (the other byte order, so the
    low bytes)."""
    from PIL import Image

    with Image.open(path) as lo_im:
        lo_im.tile = [t._replace(args=low_args(t)) for t in lo_im.tile]
        lo = np.asarray(lo_im)
    with Image.open(path) as hi_im:
        hi = np.asarray(hi_im)
    if lo.shape != hi.shape or lo.dtype != np.uint8:
        raise ValueError("the two decodes differ")
    return hi.astype(np.uint16) * 256 + lo


def _png16(path, im) -> Optional[np.ndarray]:
    """16-bit colour PNGs, which PIL decodes to 8 bits: the full uint16 [H, W, C] array
    (C = 2 grey + alpha, 3 RGB, 4 RGBA), decoded by PIL twice (high and low bytes) or, for
    grey + alpha, as raw bytes; None if the file is not such a PNG or the trick fails."""
    from PIL import Image

    tile = getattr(im, "tile", None)
    if im.format != "PNG" or not tile or len(tile) != 1:
        return None
    raw = tile[0][3] if not hasattr(tile[0], "args") else tile[0].args
    raw = raw[0] if isinstance(raw, tuple) else raw
    try:
        if raw in _PNG16_RAW:
            return _high_low(path, lambda t: _PNG16_RAW[raw])
        if raw == "LA;16B":                    # 4 bytes per pixel: read them as 8-bit RGBA
            with Image.open(path) as b_im:
                b_im.tile = [b_im.tile[0]._replace(args="RGBA")]
                b = np.asarray(b_im).astype(np.uint16)
            return np.stack([b[..., 0] * 256 + b[..., 1], b[..., 2] * 256 + b[..., 3]], -1)
    except Exception:  # unusual PNG layouts: PIL's 8-bit decode below
        return None
    return None


def _tiff16(path, im) -> Optional[np.ndarray]:
    """16-bit colour TIFFs (RGB, RGBA; any compression PIL's TIFF support decodes), which PIL
    decodes to 8 bits: the full uint16 [H, W, C] array (``_high_low``); None if the file is not
    such a TIFF or the trick fails."""
    tiles = getattr(im, "tile", None)
    if im.format != "TIFF" or not tiles:
        return None
    try:
        modes = {t.args[0] if isinstance(t.args, tuple) else t.args for t in tiles}
        if len(modes) != 1:
            return None
        base, sep, order = next(iter(modes)).partition(";16")
        if base not in ("RGB", "RGBA") or not sep or order not in ("L", "B", "N"):
            return None
        if order == "N":
            order = "L" if sys.byteorder == "little" else "B"
        low = f"{base};16{'B' if order == 'L' else 'L'}"
        return _high_low(path, lambda t: (low,) + tuple(t.args[1:]))
    except Exception:  # unusual layouts: PIL's 8-bit decode
        return None


def _pil_to_array(im, name, deep: Optional[np.ndarray] = None):
    """An opened PIL image -> (float32 array [H, W] or [H, W, C] in [0, 1], bits, gray,
    mode); C = 2 or 4 when the last channel is alpha. ``deep``: the full 16-bit array of
    a colour PNG (``_png16``). Raises ``ImageFormatError`` naming ``name``."""
    path = name
    mode, bits, gray = im.mode, 8, False
    try:
        if deep is not None:
            arr, bits = deep.astype(np.float32) / 65535.0, 16
            gray = arr.shape[-1] == 2
        elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            arr, bits, gray = np.asarray(im).astype(np.float32) / 65535.0, 16, True
        elif mode == "I":
            a = np.asarray(im)
            lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
            if lo < 0 or hi > 65535:
                raise ImageFormatError(f"{path}: 32-bit integer image with values "
                                       f"[{lo}, {hi}], not 16-bit data; convert it to an "
                                       f"8- or 16-bit image first")
            arr, bits, gray = a.astype(np.float32) / 65535.0, 16, True
        elif mode == "F":
            arr, bits, gray = np.asarray(im).astype(np.float32), 32, True
            if not np.isfinite(arr).all():
                raise ImageFormatError(f"{path}: float image with NaN or infinite values")
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ImageFormatError(f"{path}: float image with values [{lo:.4g}, "
                                       f"{hi:.4g}]; expected [0, 1] (scale it first)")
            arr = arr.clip(0, 1)
        elif mode in ("1", "L"):
            arr, gray = np.asarray(im.convert("L")).astype(np.float32) / 255.0, True
        elif mode in ("LA", "La", "PA") or (mode == "P" and "transparency" in im.info) \
                or mode in ("RGBA", "RGBa"):
            conv = im.convert("LA") if mode == "LA" else im.convert("RGBA")
            arr = np.asarray(conv).astype(np.float32) / 255.0
            gray = mode == "LA"
        elif mode == "LAB":
            from PIL import ImageCms
            srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
            conv = ImageCms.applyTransform(im, ImageCms.buildTransform(lab, srgb, "LAB",
                                                                      "RGB"))
            arr = np.asarray(conv).astype(np.float32) / 255.0
        else:   # RGB, RGBX, P, CMYK, YCbCr, HSV
            arr = np.asarray(im.convert("RGB")).astype(np.float32) / 255.0
    except ImageFormatError:
        raise
    except Exception as e:
        raise ImageFormatError(f"{path}: cannot convert PIL mode {mode!r} to RGB "
                               f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    return arr, bits, gray, mode


def read_image_file(path) -> ImageData:
    """Read any single-frame image PIL opens, EXIF orientation applied (see ``ImageData``).

    8-bit modes (1, L, LA, P with or without transparency, RGB, RGBA, CMYK, YCbCr, HSV, LAB
    via an sRGB transform) scale by 1/255; 16-bit grey (I;16*), 16-bit colour PNGs and
    TIFFs by 1/65535; 32-bit integer images (I) whose values fit
    16 bits by 1/65535; float images (F) must hold values in [0, 1]. Anything else (animated
    or multi-page files, I or F data outside those ranges, NaN) raises ``ImageFormatError``
    naming the file and the reason. The embedded ICC profile, if any, is returned unapplied."""
    from PIL import Image

    try:
        im = Image.open(path)
    except Exception as e:
        raise ImageFormatError(f"{path}: not an image PIL can read ({type(e).__name__}: "
                               f"{' '.join(str(e).split())})") from None
    with im:
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            raise ImageFormatError(f"{path}: {frames} frames (animated or multi-page); "
                                   f"extract one frame and restore that")
        deep = _png16(path, im)     # before anything loads the image (getexif may)
        deep = _tiff16(path, im) if deep is None else deep
        icc = im.info.get("icc_profile") or None
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION)
        except Exception:
            orientation = None
        arr, bits, gray, mode = _pil_to_array(im, path, deep)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = _orient(arr, orientation)
    alpha = None
    if arr.shape[2] in (2, 4):
        alpha = torch.from_numpy(np.ascontiguousarray(arr[:, :, -1:].transpose(2, 0, 1)))
        arr = arr[:, :, :-1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    rgb = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return ImageData(rgb=rgb, alpha=alpha, bits=bits, gray=gray, mode=mode,
                     icc=bytes(icc) if icc else None)


def load_image(path) -> torch.Tensor:
    """Read an image file as RGB: float32 tensor [3, H, W] in [0, 1] (``read_image_file``
    without the alpha channel and file details)."""
    return read_image_file(path).rgb


def _png_bytes(a: np.ndarray, icc: Optional[bytes] = None) -> bytes:
    """A 16-bit PNG (grey, grey + alpha, RGB, RGBA) of uint16 [H, W, C]; rows Sub-filtered;
    ``icc``: an ICC profile to embed (iCCP chunk)."""
    import struct
    import zlib

    h, w, c = a.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(a.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    bpp = 2 * c
    filt = rows.copy()
    filt[:, bpp:] = rows[:, bpp:] - rows[:, :-bpp]            # uint8 wrap-around = PNG Sub
    data = np.concatenate([np.ones((h, 1), np.uint8), filt], 1).tobytes()

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    iccp = chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)) if icc else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + iccp
            + chunk(b"IDAT", zlib.compress(data, 6)) + chunk(b"IEND", b""))


def _tiff_bytes(a: np.ndarray, icc: Optional[bytes] = None) -> bytes:
    """An uncompressed little-endian baseline TIFF of uint16 [H, W, C] (C = 1 grey, 3 RGB,
    4 RGBA; alpha unassociated), one strip of chunky samples; ``icc``: an ICC profile to embed
    (tag 34675)."""
    import struct

    h, w, c = a.shape
    data = np.ascontiguousarray(a.astype("<u2")).tobytes()
    icc = icc or b""
    n_entries = (12 if c == 4 else 11) + (1 if icc else 0)
    ifd_at = 8
    extra_at = ifd_at + 2 + 12 * n_entries + 4        # arrays that do not fit in an entry
    bits_at, fmt_at = extra_at, extra_at + 2 * c
    icc_at = fmt_at + 2 * c
    data_at = icc_at + len(icc)
    data_at += data_at % 2
    if data_at + len(data) >= 2 ** 32:
        raise ValueError(f"image of {w}x{h}x{c} 16-bit samples is too large for a baseline "
                         f"TIFF (4 GB); write .png")

    def entry(tag, kind, count, value):           # kind 3 SHORT, 4 LONG
        if kind == 3 and count == 1:
            return struct.pack("<HHIHH", tag, kind, count, value, 0)
        return struct.pack("<HHII", tag, kind, count, value)

    def shorts(tag, at):                          # c SHORTs: inline when one
        return entry(tag, 3, 1, 16 if tag == 258 else 1) if c == 1 else entry(tag, 3, c, at)

    entries = [entry(256, 4, 1, w), entry(257, 4, 1, h), shorts(258, bits_at),
               entry(259, 3, 1, 1), entry(262, 3, 1, 1 if c == 1 else 2), entry(273, 4, 1, data_at),
               entry(277, 3, 1, c), entry(278, 4, 1, h), entry(279, 4, 1, len(data)),
               entry(284, 3, 1, 1)]
    if c == 4:
        entries.append(entry(338, 3, 1, 2))       # ExtraSamples: unassociated alpha
    entries.append(shorts(339, fmt_at))           # SampleFormat: unsigned integer
    if icc:
        entries.append(struct.pack("<HHII", 34675, 7, len(icc), icc_at))   # ICC, UNDEFINED
    assert len(entries) == n_entries
    head = b"II" + struct.pack("<HI", 42, ifd_at)
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    arrays = struct.pack(f"<{c}H", *([16] * c)) + struct.pack(f"<{c}H", *([1] * c)) + icc
    body = head + ifd + arrays
    return body + b"\0" * (data_at - len(body)) + data


def _icc_space(icc: bytes) -> str:
    """The data colour space of an ICC profile ('RGB', 'GRAY', 'CMYK', ...; '?' if unreadable)."""
    if len(icc) < 128:
        return "?"
    return icc[16:20].decode("ascii", "replace").strip() or "?"


def save_image(tensor: torch.Tensor, path, *, alpha: Optional[torch.Tensor] = None,
               bits: int = 8, gray: bool = False, icc: Optional[bytes] = None) -> list[str]:
    """Write a float tensor [3, H, W] (or [1, 3, H, W]) in [0, 1]; the format follows the
    extension of ``path``. ``alpha`` [1, H, W] / [H, W] in [0, 1] is written as the alpha
    channel; ``bits`` 16 (or 32: float input) writes 16-bit PNG/TIFF samples (float TIFF for a
    grey 32); ``gray`` writes one channel (BT.601 luma); ``icc`` (an ICC profile, e.g.
    ``ImageData.icc``) is embedded when its colour space matches the output (RGB, or GRAY for
    ``gray``) and the format holds one (PNG, JPEG, TIFF). Where the format cannot hold what is
    asked (JPEG: no alpha, 8 bits; BMP: 8 bits, no profile), it writes what it can and returns
    a note per thing it dropped (else [])."""
    from PIL import Image

    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"tensor: expected shape [3, H, W] or [1, 3, H, W], "
                         f"got {tuple(tensor.shape)}")
    if bits not in (8, 16, 32):
        raise ValueError(f"bits: expected 8, 16 or 32, got {bits!r}")
    h, w = tensor.shape[-2:]
    if alpha is not None:
        alpha = alpha.reshape(-1, *alpha.shape[-2:])[0] if alpha.dim() == 3 else alpha
        if tuple(alpha.shape) != (h, w):
            raise ValueError(f"alpha: expected shape [1, {h}, {w}] or [{h}, {w}], "
                             f"got {tuple(alpha.shape)}")
    ext = str(path).lower().rsplit(".", 1)[-1]
    notes = []
    if ext in ("jpg", "jpeg") and alpha is not None:
        notes.append("alpha channel dropped (JPEG has none; write .png to keep it)")
        alpha = None
    if bits > 8 and ext not in ("png", "tif", "tiff"):
        notes.append(f"written with 8-bit samples ({ext.upper()} holds no {bits}-bit data; "
                     f"write .png to keep the depth)")
        bits = 8
    if icc:
        space, want = _icc_space(icc), "GRAY" if gray else "RGB"
        if space != want:
            notes.append(f"ICC profile not embedded (a {space} profile; the output is "
                         f"{'grey' if gray else 'RGB'})")
            icc = None
        elif ext not in ("png", "jpg", "jpeg", "tif", "tiff"):
            notes.append(f"ICC profile not embedded ({ext.upper()} holds none here; write .png "
                         f"to keep it)")
            icc = None
    kw = {"icc_profile": icc} if icc else {}
    x = tensor.detach().to(torch.float64).clamp(0, 1).cpu()
    if gray:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    planes = x if alpha is None else torch.cat([x, alpha.detach().to(x).clamp(0, 1)[None]])
    hwc = planes.permute(1, 2, 0).numpy()
    options = dict(kw, quality=95) if ext in ("jpg", "jpeg") else kw
    if bits == 32 and ext in ("tif", "tiff") and gray and alpha is None:
        Image.fromarray(hwc[:, :, 0].astype(np.float32)).save(path, **kw)
        return notes
    if bits > 8:
        a16 = np.round(hwc * 65535).astype(np.uint16)
        if ext == "png":
            with open(path, "wb") as f:
                f.write(_png_bytes(a16, icc))
            return notes
        if a16.shape[2] == 2:       # grey + alpha: as RGBA (PIL reads no 16-bit LA TIFF)
            a16 = a16[:, :, [0, 0, 0, 1]]
            notes.append("grey + alpha written as RGBA (16-bit grey + alpha TIFFs are not "
                         "widely readable; write .png to keep one grey channel)")
            if icc:
                notes.append("ICC profile not embedded (a GRAY profile; the TIFF is RGBA)")
                icc = None
        with open(path, "wb") as f:                              # TIFF
            f.write(_tiff_bytes(a16, icc))
        return notes
    a8 = np.round(hwc * 255).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[a8.shape[2]]
    img = Image.fromarray(a8[:, :, 0] if mode == "L" else a8)
    if ext in ("jpg", "jpeg", "bmp") and mode == "LA":
        img = img.convert("L")
    img.save(path, **options)
    return notes


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

def count_tiles(height: int, width: int, tile: int = 256, overlap: int = 32,
                mode: str = "tiled", batch: int = 1) -> int:
    """Number of model inputs (tiles) ``restore`` runs for ``batch`` images of H x W."""
    if mode == "resize":
        return batch
    h, w = max(height, tile), max(width, tile)
    return batch * len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))


def restore(model, image, *, tile: int = 256, overlap: int = 32, batch_size: int = 8,
            mode: str = "tiled", device=None, value_range=(0, 1), progress=None):
    """Restore an image of any size with a model that works on [n, 3, tile, tile] in [-1, 1].

    image: float tensor [3, H, W] or [B, 3, H, W] with values in ``value_range``; or a PIL image
    of any mode (converted as ``read_image_file`` does; its alpha is not used) or a uint8 numpy
    array [H, W, 3] (``value_range`` is then ignored). Returns the restored image as the same
    kind and shape: a tensor on the image's device in its dtype, clamped to ``value_range``; an
    8-bit PIL RGB image; or a uint8 array [H, W, 3]. To keep alpha and 16-bit depth in files,
    use ``read_image_file`` and ``save_image`` around a tensor call (as ``varformer restore``).

    mode="tiled": tile x tile windows whose starts are ``tile - overlap`` apart (the last one
    aligned to the image end; images smaller than a tile are reflect-padded), blended with a
    raised-cosine weight over the ``overlap`` border of each tile. mode="resize": bicubic resize
    to tile x tile (antialiased when shrinking), one model call per image, bicubic back to H x W.

    The model runs under torch.no_grad() on ``device`` (default: its first parameter's device,
    else the image's) in batches of at most ``batch_size`` tiles; its train/eval state is left
    as the caller set it. ``progress``: optional callable(n) told after every model call how
    many tiles it ran (``count_tiles`` gives the total), e.g. ``Progress.update``.
    """
    check_options(tile, overlap, batch_size, mode)
    kind = "tensor"
    if _is_pil(image):   # any mode, converted as read_image_file does (alpha not used)
        arr = _pil_to_array(image, "image")[0]
        arr = np.repeat(arr[:, :, None], 3, 2) if arr.ndim == 2 else arr
        arr = arr[:, :, :3] if arr.shape[2] != 2 else np.repeat(arr[:, :, :1], 3, 2)
        kind, (lo, hi) = "pil", (0.0, 1.0)
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
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
        run = _Runner(model, run_device, model_dtype, tile, progress)
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

    def __init__(self, model, device, dtype, tile, progress=None):
        self.model, self.device, self.dtype, self.tile = model, device, dtype, tile
        self.progress = progress

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inp = batch.to(device=self.device, dtype=self.dtype)
        out = self.model(inp)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected it to return a tensor [n, 3, {self.tile}, "
                            f"{self.tile}], got {type(out).__name__}")
        if out.shape != inp.shape:
            raise ValueError(f"model: returned shape {tuple(out.shape)} for input "
                             f"{tuple(inp.shape)}; expected the input's shape")
        if self.progress is not None:
            self.progress(len(batch))
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
