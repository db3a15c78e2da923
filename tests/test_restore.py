"""Tiled and resized full-resolution restoration and `varformer restore`, with tiny stand-ins."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import varformer.models
from varformer import cli
from varformer.restoration import load_image, restore, save_image


class Identity(torch.nn.Module):
    """Returns its input; counts calls and records batch shapes."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.shapes = []

    def forward(self, x):
        assert not torch.is_grad_enabled()
        self.shapes.append(tuple(x.shape))
        return x + self.p


class AddConstant(torch.nn.Module):
    def forward(self, x):
        return x + 0.1


class TileConstant(torch.nn.Module):
    """Returns a random constant per tile. The input encodes pixel coordinates (channel 0: x,
    channel 1: y, scaled to [-1, 1]), so each tile's origin is read from its first pixel."""

    def __init__(self, h, w):
        super().__init__()
        self.h, self.w, self.tiles = h, w, {}

    def forward(self, x):
        out = torch.empty_like(x)
        for k, t in enumerate(x):
            x0 = round((t[0, 0, 0].item() + 1) / 2 * (self.w - 1))
            y0 = round((t[1, 0, 0].item() + 1) / 2 * (self.h - 1))
            c = torch.empty(()).uniform_(-0.8, 0.8).item()
            self.tiles[(y0, x0)] = c
            out[k] = c
        return out


def n_windows(length, tile, overlap):
    return 1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1


# ----------------------------------------------------------------------------- tiled mode

@pytest.mark.parametrize("shape", [(3, 300, 517), (2, 3, 300, 517), (3, 100, 37),
                                   (3, 200, 250), (3, 256, 256), (1, 3, 256, 600)])
def test_identity_round_trip(shape):
    x = torch.rand(shape)
    y = restore(Identity(), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("value_range", [(0, 255), (-1, 1)])
def test_identity_other_value_ranges(value_range):
    lo, hi = value_range
    x = torch.rand(3, 270, 300, dtype=torch.float64) * (hi - lo) + lo
    y = restore(lambda t: t, x, value_range=value_range)  # no parameters: runs in float64
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x, atol=1e-9 * (hi - lo), rtol=0)


def test_identity_uint8_and_pil():
    a = np.random.default_rng(0).integers(0, 256, (300, 517, 3), dtype=np.uint8)
    out = restore(Identity(), a)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)
    im = Image.fromarray(a[:90, :140])
    out = restore(Identity(), im)
    assert isinstance(out, Image.Image) and out.size == im.size and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), a[:90, :140])


def test_constant_shift_has_no_seams():
    x = torch.full((3, 300, 517), 0.4)
    y = restore(AddConstant(), x, overlap=48)
    assert (y.max() - y.min()).item() < 1e-6
    assert abs(y.mean().item() - (0.4 + 0.1 / 2)) < 1e-6  # +0.1 in [-1, 1] is +0.05 in [0, 1]


@pytest.mark.parametrize("h,w,tile,overlap", [(300, 517, 256, 32), (150, 301, 64, 20),
                                              (64, 64, 16, 15)])
def test_blend_is_convex_and_single_cover_is_exact(h, w, tile, overlap):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x = torch.stack([xx, yy, torch.zeros_like(xx)])
    model = TileConstant(h, w)
    out = restore(model, x, tile=tile, overlap=overlap, batch_size=5)[0] * 2 - 1  # [-1, 1]

    ys = sorted({y0 for y0, _ in model.tiles})
    xs = sorted({x0 for _, x0 in model.tiles})
    assert len(model.tiles) == len(ys) * len(xs)
    for starts, length in ((ys, h), (xs, w)):  # spaced tile - overlap apart, last one at the end
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a == tile - overlap for a, b in zip(starts[:-2], starts[1:-1]))
        assert 0 < starts[-1] - starts[-2] <= tile - overlap

    count = torch.zeros(h, w, dtype=torch.long)
    lo = torch.full((h, w), math.inf)
    hi = torch.full((h, w), -math.inf)
    single = torch.full((h, w), math.nan)
    for (y0, x0), c in model.tiles.items():
        region = (slice(y0, y0 + tile), slice(x0, x0 + tile))
        count[region] += 1
        lo[region] = lo[region].clamp(max=c)
        hi[region] = hi[region].clamp(min=c)
        single[region] = c
    assert (count >= 1).all()
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()
    once = count == 1
    assert once.any()
    torch.testing.assert_close(out[once], single[once], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 4, 8, 50])
def test_model_called_in_batches_of_tiles(batch_size):
    model = Identity().train()
    restore(model, torch.rand(2, 3, 300, 517), batch_size=batch_size)
    tiles = 2 * n_windows(300, 256, 32) * n_windows(517, 256, 32)
    assert all(s[1:] == (3, 256, 256) and 1 <= s[0] <= batch_size for s in model.shapes)
    assert sum(s[0] for s in model.shapes) == tiles
    assert len(model.shapes) == math.ceil(tiles / batch_size)
    assert model.training  # left as the caller set it


# ----------------------------------------------------------------------------- resize mode

@pytest.mark.parametrize("shape", [(3, 300, 517), (2, 3, 100, 37), (3, 256, 256)])
def test_resize_mode(shape):
    model = Identity()
    x = torch.rand(shape)
    y = restore(model, x, mode="resize", batch_size=1)
    assert y.shape == x.shape
    assert 0 <= y.min() and y.max() <= 1
    assert model.shapes == [(1, 3, 256, 256)] * (shape[0] if len(shape) == 4 else 1)
    if shape[-2:] == (256, 256):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    else:  # a smooth image survives the round trip approximately
        yy, xx = torch.meshgrid(torch.linspace(0, 1, shape[-2]), torch.linspace(0, 1, shape[-1]),
                                indexing="ij")
        smooth = torch.stack([xx, yy, (xx + yy) / 2])
        assert (restore(model, smooth, mode="resize") - smooth).abs().max() < 0.02


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("image,kwargs,exc,match", [
    (torch.rand(4, 64, 64), {}, ValueError, r"image: expected 3 \(RGB\) channels"),
    (torch.rand(64, 64), {}, ValueError, r"image: .*\[3, H, W\] or \[B, 3, H, W\]"),
    (torch.rand(3, 64, 64) * 255, {}, ValueError, r"value_range=\(0, 255\)"),
    (torch.rand(3, 64, 64) * 2 - 1, {}, ValueError, r"value_range=\(-1, 1\)"),
    (torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), {}, TypeError, "floating-point"),
    (np.zeros((64, 64, 3), np.float32), {}, TypeError, "uint8"),
    (np.zeros((64, 64, 4), np.uint8), {}, ValueError, r"\[H, W, 3\]"),
    ([[0.0]], {}, TypeError, "image"),
    (torch.rand(3, 64, 64), {"overlap": 256}, ValueError, "overlap"),
    (torch.rand(3, 64, 64), {"overlap": -1}, ValueError, "overlap"),
    (torch.rand(3, 64, 64), {"tile": 8, "overlap": 2}, ValueError, "tile"),
    (torch.rand(3, 64, 64), {"mode": "bilinear"}, ValueError, "mode"),
    (torch.rand(3, 64, 64), {"batch_size": 0}, ValueError, "batch_size"),
    (torch.rand(3, 64, 64), {"value_range": (1, 0)}, ValueError, "value_range"),
])
def test_bad_inputs(image, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        restore(Identity(), image, **kwargs)


def test_model_output_shape_checked():
    with pytest.raises(ValueError, match="model: returned shape"):
        restore(lambda t: t[:, :, :128], torch.rand(3, 300, 300))
    with pytest.raises(TypeError, match="model"):
        restore(lambda t: (t,), torch.rand(3, 300, 300))


def test_load_save_round_trip(tmp_path):
    x = (torch.randint(0, 256, (3, 33, 47)) / 255).float()
    save_image(x, tmp_path / "a.png")
    torch.testing.assert_close(load_image(tmp_path / "a.png"), x, atol=0, rtol=0)


# ----------------------------------------------------------------------------- CLI

def test_cli_requires_weights(tmp_path, capsys):
    assert cli.main(["restore", "x.png", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "wsy541/VarFormer" in err and "net_g_last.pth" in err
    assert cli.main(["restore", "x.png", "-o", str(tmp_path),
                     "--weights", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert "missing.pth" in err and "not found" in err and "wsy541/VarFormer" in err


def _write_images(folder):
    rng = np.random.default_rng(1)
    folder.mkdir()
    images = {"a.png": rng.integers(0, 256, (70, 300, 3), dtype=np.uint8),
              "b.bmp": rng.integers(0, 256, (260, 40, 3), dtype=np.uint8)}
    for name, a in images.items():
        Image.fromarray(a).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return images


@pytest.fixture
def fake_varformer(monkeypatch):
    calls = []

    class FakeVarFormer:
        @staticmethod
        def from_pretrained(path, mode=None, preset=None):
            calls.append((path, mode, preset))
            return Identity()

    monkeypatch.setattr(varformer.models, "VarFormer", FakeVarFormer, raising=False)
    return calls


def test_cli_restores_folder_and_single_file(tmp_path, fake_varformer, capsys):
    images = _write_images(tmp_path / "in")
    weights = tmp_path / "net_g_last.pth"
    weights.write_bytes(b"")
    out = tmp_path / "out"
    assert cli.main(["restore", str(tmp_path / "in"), "-o", str(out), "--weights", str(weights),
                     "--device", "cpu", "--tile", "64", "--tile-overlap", "8",
                     "--mode", "paper"]) == 0
    assert fake_varformer == [(str(weights), "paper", None)]   # preset: the file's metadata
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    for name, a in images.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / (name[:-4] + ".png"))), a)

    single = tmp_path / "single" / "restored.png"
    assert cli.main(["restore", str(tmp_path / "in" / "b.bmp"), "-o", str(single), "--weights",
                     str(weights), "--device", "cpu", "--resize"]) == 0
    assert Image.open(single).size == (40, 260)
    # a file name as OUT for several images is refused
    assert cli.main(["restore", str(tmp_path / "in"), "-o", str(single), "--weights",
                     str(weights), "--device", "cpu"]) == 2
    assert "give a folder" in capsys.readouterr().err


def test_cli_bad_options(tmp_path, fake_varformer, capsys):
    _write_images(tmp_path / "in")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    base = ["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
            str(weights), "--device", "cpu"]
    assert cli.main(base + ["--tile-overlap", "300"]) == 2
    assert "overlap" in capsys.readouterr().err
    assert cli.main(["restore", str(tmp_path / "nope"), *base[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert fake_varformer == []  # no model built


def test_cli_without_model_class(tmp_path, monkeypatch, capsys):
    _write_images(tmp_path / "in")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    monkeypatch.delattr(varformer.models, "VarFormer", raising=False)
    assert cli.main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                     str(weights), "--device", "cpu"]) == 2
    assert "the VarFormer model is not available in this version" in capsys.readouterr().err


def test_cli_tile_size_the_model_serves(tmp_path, monkeypatch, capsys):
    """VarFormer takes 256x256 tiles only: another --tile is a one-line error saying so."""
    _write_images(tmp_path / "in")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")

    class VarFormer(Identity):                 # named like the real class
        @staticmethod
        def from_pretrained(path, mode=None, preset=None):
            return VarFormer()

    monkeypatch.setattr(varformer.models, "VarFormer", VarFormer, raising=False)
    base = ["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
            str(weights), "--device", "cpu"]
    assert cli.main(base + ["--tile", "128"]) == 2
    err = capsys.readouterr().err
    assert "--tile 128: VarFormer works on 256x256 tiles only" in err and "\n" not in err.strip()
    assert cli.main(base + ["--tile-overlap", "100"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
