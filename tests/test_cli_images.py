"""Image files in and out (varformer.restoration.read_image_file / save_image, and the
`varformer restore` command on them): every PIL mode, EXIF orientation, alpha and 16-bit."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import varformer.models
from varformer import cli
from varformer.data.pairing import read_image
from varformer.restoration import ImageFormatError, read_image_file, save_image

H, W = 13, 21     # odd, H != W


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _rgb8(rng):
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _check(data, want_rgb, *, alpha=None, bits=8, gray=False, atol=1e-6):
    assert data.rgb.dtype == torch.float32 and tuple(data.rgb.shape) == (3, H, W)
    np.testing.assert_allclose(data.rgb.permute(1, 2, 0).numpy(), want_rgb, atol=atol)
    assert data.bits == bits and data.gray == gray
    if alpha is None:
        assert data.alpha is None
    else:
        np.testing.assert_allclose(data.alpha[0].numpy(), alpha, atol=atol)


def test_8bit_modes(tmp_path, rng):
    a = _rgb8(rng)
    Image.fromarray(a).save(tmp_path / "rgb.png")
    _check(read_image_file(tmp_path / "rgb.png"), a / 255)

    g = a[..., 0]
    Image.fromarray(g).save(tmp_path / "l.png")
    _check(read_image_file(tmp_path / "l.png"), np.repeat(g[..., None], 3, 2) / 255, gray=True)

    al = a[..., 1]
    Image.fromarray(np.dstack([g, al])).save(tmp_path / "la.png")
    _check(read_image_file(tmp_path / "la.png"), np.repeat(g[..., None], 3, 2) / 255,
           alpha=al / 255, gray=True)

    Image.fromarray(np.dstack([a, al])).save(tmp_path / "rgba.png")
    _check(read_image_file(tmp_path / "rgba.png"), a / 255, alpha=al / 255)

    bw = g > 127
    Image.fromarray(bw).convert("1").save(tmp_path / "bw.png")
    _check(read_image_file(tmp_path / "bw.png"), np.repeat(bw[..., None], 3, 2).astype(float),
           gray=True)


def test_palette_with_and_without_transparency(tmp_path, rng):
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, (H, W), dtype=np.uint8)
    im = Image.fromarray(idx, mode=None).convert("L").convert("P")
    im = Image.frombytes("P", (W, H), idx.tobytes())
    im.putpalette(palette.flatten().tolist())
    im.save(tmp_path / "p.png")
    _check(read_image_file(tmp_path / "p.png"), palette[idx] / 255)
    im.info["transparency"] = 3
    im.save(tmp_path / "pt.png", transparency=3)
    _check(read_image_file(tmp_path / "pt.png"), palette[idx] / 255,
           alpha=(idx != 3).astype(float))


def test_cmyk_and_ycbcr(tmp_path, rng):
    a = _rgb8(rng)
    cmyk = Image.fromarray(a).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    want = np.asarray(cmyk.convert("RGB")) / 255          # PIL's CMYK -> RGB
    data = read_image_file(tmp_path / "c.tif")
    _check(data, want)
    np.testing.assert_allclose(want, a / 255, atol=1 / 255)   # PIL's pair is lossless here
    ycc = Image.fromarray(a).convert("YCbCr")
    buf = io.BytesIO()
    ycc.save(tmp_path / "y.tif")
    _check(read_image_file(tmp_path / "y.tif"), np.asarray(ycc.convert("RGB")) / 255)


def test_16bit_grey_and_colour_png_keep_their_depth(tmp_path, rng):
    g16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")                 # PIL mode I;16
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    data = read_image_file(tmp_path / "g16.png")
    _check(data, np.repeat(g16[..., None], 3, 2) / 65535, bits=16, gray=True)
    assert data.rgb.max() < 1.0 + 1e-6 and data.rgb.mean() < 0.9    # never all white

    from varformer.restoration import _png_bytes
    for c in (2, 3, 4):
        a = rng.integers(0, 65536, (H, W, c), dtype=np.uint16)
        (tmp_path / f"c{c}.png").write_bytes(_png_bytes(a))
        data = read_image_file(tmp_path / f"c{c}.png")
        colour = a[..., :1].repeat(3, 2) if c == 2 else a[..., :3]
        _check(data, colour / 65535, bits=16, gray=c == 2,
               alpha=a[..., -1] / 65535 if c in (2, 4) else None)
        # what PIL itself sees (8-bit, the high bytes) agrees
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"c{c}.png"))[..., 0],
                              (a[..., 0] >> 8).astype(np.uint8))


def test_16bit_big_endian_and_32bit_int_and_float(tmp_path, rng):
    g16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.frombytes("I;16B", (W, H), g16.astype(">u2").tobytes()).save(tmp_path / "b.tif")
    _check(read_image_file(tmp_path / "b.tif"), np.repeat(g16[..., None], 3, 2) / 65535,
           bits=16, gray=True)
    Image.fromarray(g16.astype(np.int32)).save(tmp_path / "i.tif")     # mode I
    assert Image.open(tmp_path / "i.tif").mode == "I"
    _check(read_image_file(tmp_path / "i.tif"), np.repeat(g16[..., None], 3, 2) / 65535,
           bits=16, gray=True)
    Image.fromarray((g16.astype(np.int32) * 70000)).save(tmp_path / "big.tif")
    with pytest.raises(ImageFormatError, match="big.tif: 32-bit integer image with values"):
        read_image_file(tmp_path / "big.tif")
    f = rng.random((H, W), dtype=np.float32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    _check(read_image_file(tmp_path / "f.tif"), np.repeat(f[..., None], 3, 2), bits=32,
           gray=True)
    Image.fromarray(f * 300).save(tmp_path / "f300.tif")
    with pytest.raises(ImageFormatError, match=r"float image with values \[.*expected \[0, 1\]"):
        read_image_file(tmp_path / "f300.tif")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, rng, orientation):
    a = _rgb8(rng)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.png", exif=exif)
    want = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB"))
    got = read_image_file(tmp_path / "o.png").rgb.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want / 255, atol=1e-6)
    assert got.shape[:2] == ((W, H) if orientation >= 5 else (H, W))


def test_refused_files(tmp_path, rng):
    frames = [Image.fromarray(_rgb8(rng)) for _ in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageFormatError, match="anim.gif: 3 frames"):
        read_image_file(tmp_path / "anim.gif")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageFormatError, match="junk.png: not an image PIL can read"):
        read_image_file(tmp_path / "junk.png")


def test_save_keeps_depth_alpha_and_grey(tmp_path, rng):
    x = torch.from_numpy(rng.random((3, H, W))).float()
    alpha = torch.from_numpy(rng.random((1, H, W))).float()
    assert save_image(x, tmp_path / "o16.png", bits=16, alpha=alpha) == []
    back = read_image_file(tmp_path / "o16.png")
    assert back.bits == 16
    torch.testing.assert_close(back.rgb, x, atol=0.6 / 65535, rtol=0)
    torch.testing.assert_close(back.alpha, alpha, atol=0.6 / 65535, rtol=0)
    save_image(x, tmp_path / "g16.png", bits=16, gray=True)
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    torch.testing.assert_close(read_image_file(tmp_path / "g16.png").rgb[0], luma,
                               atol=0.6 / 65535, rtol=0)
    save_image(x, tmp_path / "g.tif", bits=32, gray=True)
    assert Image.open(tmp_path / "g.tif").mode == "F"
    notes = save_image(x, tmp_path / "o.jpg", bits=16, alpha=alpha)
    assert len(notes) == 2 and "alpha channel dropped" in notes[0] and "8-bit" in notes[1]
    save_image(x, tmp_path / "o8.png", alpha=alpha)
    assert Image.open(tmp_path / "o8.png").mode == "RGBA"
    with pytest.raises(ValueError, match="alpha: expected shape"):
        save_image(x, tmp_path / "bad.png", alpha=alpha[:, :-1])


def test_data_loader_reads_the_same(tmp_path, rng):
    g16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    torch.testing.assert_close(read_image(tmp_path / "g16.png"),
                               read_image_file(tmp_path / "g16.png").rgb)


class _Shift(torch.nn.Module):
    """Stand-in model: a small fixed change so that the output differs from the input."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (x * 0.9 + self.p).clamp(-1, 1)


@pytest.fixture
def fake_model(monkeypatch):
    class Fake:
        @staticmethod
        def from_pretrained(path, mode=None, preset=None):
            return _Shift()

    monkeypatch.setattr(varformer.models, "VarFormer", Fake, raising=False)


def test_cli_restore_keeps_16_bits_grey_and_alpha(tmp_path, rng, fake_model, capsys):
    """The issue's case: a 16-bit grey PNG came out all white. Now it comes out 16-bit grey,
    equal to the model's output; RGBA keeps its alpha, a JPEG its ICC profile."""
    src = tmp_path / "in"
    src.mkdir()
    g16 = rng.integers(1000, 60000, (H, W), dtype=np.uint16)
    Image.fromarray(g16).save(src / "g16.png")
    a = _rgb8(rng)
    al = rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(np.dstack([a, al])).save(src / "rgba.png")
    from PIL import ImageCms
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(a).save(src / "icc.jpg", icc_profile=srgb, quality=95)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    out = tmp_path / "out"
    assert cli.main(["restore", str(src), "-o", str(out), "--weights", str(weights),
                     "--device", "cpu", "--tile", "64", "--tile-overlap", "8"]) == 0
    g_out = Image.open(out / "g16.png")
    assert g_out.mode == "I;16"
    want = ((g16 / 65535 * 2 - 1) * 0.9 + 1) / 2
    np.testing.assert_allclose(np.asarray(g_out) / 65535, want, atol=2e-5)
    rgba = Image.open(out / "rgba.png")
    assert rgba.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(rgba)[..., 3], al)
    assert Image.open(out / "icc.png").info.get("icc_profile") == srgb   # profile carried over


def test_restore_api_takes_pil_images_of_any_mode(rng):
    from varformer.restoration import restore
    g16 = rng.integers(1000, 60000, (H, W), dtype=np.uint16)
    out = restore(_Shift(), Image.fromarray(g16), tile=32, overlap=4)
    assert out.mode == "RGB" and out.size == (W, H)
    want = np.round(((g16 / 65535 * 2 - 1) * 0.9 + 1) / 2 * 255)
    np.testing.assert_allclose(np.asarray(out)[..., 0], want, atol=1)
    la = Image.fromarray(np.dstack([g16 >> 8, g16 & 255]).astype(np.uint8))
    assert np.asarray(restore(_Shift(), la, tile=32, overlap=4)).shape == (H, W, 3)


def _tiff_be_strips(a16, rows_per_strip, deflate=False):
    """An independent encoder for the reader's test: big-endian ('MM') RGB(A) 16-bit TIFF,
    several strips, arrays after the pixel data; ``deflate``: zlib-compressed strips with the
    horizontal-differencing predictor (as image editors save 16-bit 'ZIP' TIFFs)."""
    import struct
    import zlib
    h, w, c = a16.shape
    src = a16
    if deflate:          # predictor 2: each sample minus its left neighbour, modulo 2^16
        src = a16.copy()
        src[:, 1:] = a16[:, 1:] - a16[:, :-1]
    strips = [src[y:y + rows_per_strip].astype(">u2").tobytes() for y in range(0, h, rows_per_strip)]
    if deflate:
        strips = [zlib.compress(s) for s in strips]
    data = b"".join(strips)
    data_at = 8
    offs_at = data_at + len(data)
    counts_at = offs_at + 4 * len(strips)
    bits_at = counts_at + 4 * len(strips)
    ifd_at = bits_at + 2 * c
    offsets = [data_at + sum(len(s) for s in strips[:i]) for i in range(len(strips))]
    e = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, bits_at), (259, 3, 1, 8 if deflate else 1),
         (262, 3, 1, 2), (273, 4, len(strips), offs_at), (277, 3, 1, c),
         (278, 4, 1, rows_per_strip), (279, 4, len(strips), counts_at)]
    if deflate:
        e.append((317, 3, 1, 2))
    if c == 4:
        e.append((338, 3, 1, 2))
    ent = b"".join(struct.pack(">HHIHH", t, k, n, v, 0) if k == 3 and n == 1
                   else struct.pack(">HHII", t, k, n, v) for t, k, n, v in e)
    return (b"MM" + struct.pack(">HI", 42, ifd_at) + data
            + struct.pack(f">{len(strips)}I", *offsets)
            + struct.pack(f">{len(strips)}I", *map(len, strips))
            + struct.pack(f">{c}H", *[16] * c)
            + struct.pack(">H", len(e)) + ent + struct.pack(">I", 0))


def test_16bit_colour_tiff_in_and_out(tmp_path, rng):
    """16-bit colour TIFFs keep their depth both ways (PIL alone reads and writes them with 8
    bits): save_image writes them, read_image_file reads them in any strip layout, byte order
    and compression PIL decodes, and the data loader reads the same."""
    x = torch.from_numpy(rng.random((3, H, W))).float()
    alpha = torch.from_numpy(rng.random((1, H, W))).float()
    assert save_image(x, tmp_path / "o16.tif", bits=16) == []
    assert Image.open(tmp_path / "o16.tif").tile[0].args[0] == "RGB;16L"   # a TIFF PIL parses
    back = read_image_file(tmp_path / "o16.tif")
    assert back.bits == 16 and back.alpha is None
    torch.testing.assert_close(back.rgb, x, atol=0.6 / 65535, rtol=0)
    assert save_image(x, tmp_path / "a16.tif", bits=16, alpha=alpha) == []
    back = read_image_file(tmp_path / "a16.tif")
    torch.testing.assert_close(back.rgb, x, atol=0.6 / 65535, rtol=0)
    torch.testing.assert_close(back.alpha, alpha, atol=0.6 / 65535, rtol=0)
    torch.testing.assert_close(read_image(tmp_path / "a16.tif"), back.rgb)
    notes = save_image(x, tmp_path / "ga16.tif", bits=16, alpha=alpha, gray=True)
    assert len(notes) == 1 and "as RGBA" in notes[0]
    back = read_image_file(tmp_path / "ga16.tif")
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    for ch in back.rgb:
        torch.testing.assert_close(ch, luma, atol=0.6 / 65535, rtol=0)
    torch.testing.assert_close(back.alpha, alpha, atol=0.6 / 65535, rtol=0)
    save_image(x, tmp_path / "g16.tif", bits=16, gray=True)
    assert Image.open(tmp_path / "g16.tif").mode == "I;16"
    for c, deflate in [(3, False), (4, False), (3, True), (4, True)]:
        a16 = rng.integers(0, 65536, (H, W, c), dtype=np.uint16)
        f = tmp_path / f"be{c}{'z' if deflate else ''}.tif"
        f.write_bytes(_tiff_be_strips(a16, rows_per_strip=4, deflate=deflate))
        codec = Image.open(f).tile[0].codec_name
        assert codec == ("libtiff" if deflate else "raw"), codec
        _check(read_image_file(f), a16[..., :3] / 65535,
               alpha=a16[..., 3] / 65535 if c == 4 else None, bits=16)


def test_icc_profile_is_carried_over(tmp_path, rng):
    """An embedded ICC profile is read (not applied) and embedded again where its colour space
    matches the output and the format holds one, 8 and 16 bits; otherwise a note says so."""
    from PIL import ImageCms
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(_rgb8(rng)).save(tmp_path / "in.png", icc_profile=srgb)
    data = read_image_file(tmp_path / "in.png")
    assert data.icc == srgb
    x, alpha = data.rgb, torch.from_numpy(rng.random((1, H, W))).float()
    for name, bits, a in [("o8.png", 8, None), ("o8.jpg", 8, None), ("o8.tif", 8, alpha),
                          ("o16.png", 16, alpha), ("o16.tif", 16, None), ("o16a.tif", 16, alpha)]:
        assert save_image(x, tmp_path / name, bits=bits, alpha=a, icc=srgb) == [], name
        assert Image.open(tmp_path / name).info.get("icc_profile") == srgb, name
        assert read_image_file(tmp_path / name).icc == srgb, name
    back = read_image_file(tmp_path / "o16a.tif")           # the profile moved the pixel data
    assert back.bits == 16
    torch.testing.assert_close(back.rgb, x, atol=0.6 / 65535, rtol=0)
    torch.testing.assert_close(back.alpha, alpha, atol=0.6 / 65535, rtol=0)
    notes = save_image(x, tmp_path / "g.png", gray=True, icc=srgb)
    assert notes == ["ICC profile not embedded (a RGB profile; the output is grey)"]
    assert "icc_profile" not in Image.open(tmp_path / "g.png").info
    notes = save_image(x, tmp_path / "o.bmp", icc=srgb)
    assert len(notes) == 1 and "BMP holds none" in notes[0]
    assert save_image(x, tmp_path / "plain.png") == []
    assert read_image_file(tmp_path / "plain.png").icc is None
