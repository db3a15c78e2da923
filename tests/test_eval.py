"""varformer.eval: BasicSR-convention PSNR/SSIM, LPIPS (AlexNet v0.1) loading and maths, and the
test-set runner / tables / ``varformer eval`` entry point on tiny synthetic sets (CPU)."""
import csv
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from varformer.eval import runner
from varformer.eval.lpips import CHANNELS, LPIPS
from varformer.eval.metrics import gaussian_window, psnr, rgb_to_y, ssim


def _rand_u8(rng, shape, lo=0, hi=256):
    return rng.integers(lo, hi, size=shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- metrics

def test_identical_images():
    img = _rand_u8(np.random.default_rng(0), (24, 30, 3))
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255  # CHW float in [0, 1]
    assert psnr(t, img) == math.inf
    assert ssim(t[None], img) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 16])
def test_constant_offset_psnr(k):
    ref = _rand_u8(np.random.default_rng(k), (20, 28, 3), 0, 200)
    img = ref + np.uint8(k)
    expected = 20 * math.log10(255 / k)
    assert psnr(img, ref) == pytest.approx(expected, rel=1e-12)
    assert psnr(ref, img) == pytest.approx(expected, rel=1e-12)
    # the same image as float tensors in [0, 1] and as float arrays in [0, 255]
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1).double() / 255  # noqa: E731
    assert psnr(to_t(img), to_t(ref)) == pytest.approx(expected, rel=1e-12)
    assert psnr(img.astype(np.float32), ref.astype(np.float32), input_range=255) \
        == pytest.approx(expected, rel=1e-12)
    # a constant offset on every channel is a constant offset on Y: k * (65.481+128.553+24.966)/255
    dy = k * 219.0 / 255
    assert psnr(img, ref, test_y_channel=True) == pytest.approx(20 * math.log10(255 / dy), rel=1e-5)


def test_float_inputs_are_rounded_to_8_bit():
    ref = _rand_u8(np.random.default_rng(1), (16, 16, 3), 10, 200)
    t = torch.from_numpy(ref).permute(2, 0, 1).double() / 255
    assert psnr(t + 0.4 / 255, ref) == math.inf        # rounds back to the same levels
    assert psnr(t + 1.4 / 255, ref) == pytest.approx(20 * math.log10(255), rel=1e-12)


def test_y_channel_bt601():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [255, 255, 255]]],
                  dtype=np.float64)
    y = rgb_to_y(px)[0, :, 0]
    expected = [16 + 65.481, 16 + 128.553, 16 + 24.966, 16.0, 16 + 219.0]
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-4)  # float32 rounding, as BasicSR
    red = np.zeros((12, 12, 3), np.uint8)
    red[..., 0] = 255
    black = np.zeros_like(red)
    assert psnr(red, black, test_y_channel=True) == pytest.approx(20 * math.log10(255 / 65.481),
                                                                  rel=1e-6)
    assert psnr(red, black) == pytest.approx(10 * math.log10(255 ** 2 / (255 ** 2 / 3)), rel=1e-12)


def test_crop_border():
    rng = np.random.default_rng(2)
    ref = _rand_u8(rng, (20, 24, 3), 0, 200)
    img = ref.copy()
    k, b = 10, 2
    img[:b] += k                      # change a frame of width b only
    img[-b:] += k
    img[b:-b, :b] += k
    img[b:-b, -b:] += k
    frame = 20 * 24 - 16 * 20
    assert psnr(img, ref, crop_border=b) == math.inf
    assert ssim(img, ref, crop_border=b) == pytest.approx(1.0, abs=1e-12)
    assert psnr(img, ref) == pytest.approx(10 * math.log10(255 ** 2 / (k * k * frame / (20 * 24))),
                                           rel=1e-12)
    assert psnr(img, ref, crop_border=1) == pytest.approx(
        10 * math.log10(255 ** 2 / (k * k * (18 * 22 - 16 * 20) / (18 * 22))), rel=1e-12)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(img, ref, crop_border=10)


def _ssim_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM written out: for every valid 11x11 window position and channel the
    Gaussian-weighted means, variances and covariance, then the mean of the map."""
    w = np.array([[math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * 1.5 ** 2)) for j in range(11)]
                  for i in range(11)])
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    per_channel = []
    for ch in range(a.shape[2]):
        vals = []
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                x, y = a[i:i + 11, j:j + 11, ch], b[i:i + 11, j:j + 11, ch]
                mx, my = (w * x).sum(), (w * y).sum()
                vx = (w * (x - mx) ** 2).sum()
                vy = (w * (y - my) ** 2).sum()
                cxy = (w * (x - mx) * (y - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2)
                            / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_matches_direct_computation():
    rng = np.random.default_rng(3)
    a = _rand_u8(rng, (17, 19, 3))
    b = np.clip(a.astype(int) + rng.integers(-40, 41, size=a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_direct(a, b), abs=1e-10)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    g = gaussian_window()
    assert g.sum() == pytest.approx(1.0) and g.argmax() == 5
    # Y channel: the same formula on BT.601 luma
    ya, yb = rgb_to_y(a.astype(np.float64)), rgb_to_y(b.astype(np.float64))
    assert ssim(a, b, test_y_channel=True) == pytest.approx(_ssim_direct(ya, yb), abs=1e-10)
    # grey images (H, W) work too
    assert ssim(a[..., 0], b[..., 0]) == pytest.approx(_ssim_direct(a[..., :1], b[..., :1]),
                                                       abs=1e-10)


def test_metric_errors():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, np.zeros((16, 17, 3), np.uint8))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 15, 16))
    with pytest.raises(ValueError, match="input_range=255"):
        psnr(a.astype(np.float32) + 100, a.astype(np.float32))
    with pytest.raises(ValueError, match="11x11"):
        ssim(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        psnr(np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 4), np.uint8))


# ----------------------------------------------------------------------------- LPIPS

def _lpips_files(tmp_path, seed=0):
    """Random weights saved in torchvision's AlexNet format and the lpips package's format."""
    g = torch.Generator().manual_seed(seed)
    convs = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    backbone = {}
    for i, (co, ci, k) in convs.items():
        w = torch.randn(co, ci, k, k, generator=g) / math.sqrt(ci * k * k)
        backbone[f"features.{i}.weight"] = w
        backbone[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.1
    backbone["classifier.1.weight"] = torch.randn(16, 8, generator=g)  # ignored
    backbone["classifier.1.bias"] = torch.randn(16, generator=g)
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
              for i, c in enumerate(CHANNELS)}
    bp, lp = tmp_path / "alexnet-owt.pth", tmp_path / "alex.pth"
    torch.save(backbone, bp)
    torch.save(linear, lp)
    return bp, lp, backbone, linear


def _lpips_direct(x, y, backbone, linear):
    """LPIPS written out with functional ops from the raw state dicts."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def feats(t):
        t = (t - shift) / scale
        out = []
        specs = [(0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1)]
        for n, (i, stride, pad) in enumerate(specs):
            if n in (1, 2):
                t = F.max_pool2d(t, 3, 2)
            t = F.relu(F.conv2d(t, backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"],
                                stride=stride, padding=pad))
            out.append(t)
        return out

    total = 0
    for n, (a, b) in enumerate(zip(feats(x), feats(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        lin = linear[f"lin{n}.model.1.weight"]
        total = total + F.conv2d((a - b) ** 2, lin).mean(dim=(1, 2, 3))
    return total


def test_lpips_from_files(tmp_path):
    bp, lp, backbone, linear = _lpips_files(tmp_path)
    model = LPIPS.from_files(bp, lp)
    assert torch.equal(model.net.features[10].weight, backbone["features.10.weight"])
    assert torch.equal(model.lins[2].weight, linear["lin2.model.1.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 48, 64) * 2 - 1
    y = torch.rand(2, 3, 48, 64) * 2 - 1
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, _lpips_direct(x, y, backbone, linear), rtol=1e-5, atol=1e-7)
    assert torch.equal(model(x, x), torch.zeros(2))
    torch.testing.assert_close(model(y, x), d, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(model((x + 1) / 2, (y + 1) / 2, normalize=True), d,
                               rtol=1e-5, atol=1e-7)
    assert model(x[0], y[0]).shape == (1,)


def test_lpips_file_errors(tmp_path):
    bp, lp, backbone, linear = _lpips_files(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        LPIPS.from_files(bp, tmp_path / "nowhere" / "alex.pth")
    assert "pip install --no-deps lpips" in str(e.value)
    assert "lpips/weights/v0.1/alex.pth" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        LPIPS.from_files(tmp_path / "missing.pth", lp)
    assert "alexnet-owt-7be5be79.pth" in str(e.value)
    del linear["lin4.model.1.weight"]
    torch.save(linear, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="4.weight"):
        LPIPS.from_files(bp, tmp_path / "bad.pth")
    torch.save({"features.0.weight": backbone["features.0.weight"]}, tmp_path / "bad_bb.pth")
    with pytest.raises(KeyError, match="features.3.weight"):
        LPIPS.from_files(tmp_path / "bad_bb.pth", lp)
    with pytest.raises(ValueError, match="shapes differ"):
        LPIPS()(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 40))


# ----------------------------------------------------------------------------- runner

def _save_png(arr, path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def dataset(tmp_path):
    """root/{rain/input, rain/target}: 3 pairs of 40x56 images (input = target + noise),
    root/same/{input, target}: 2 identical pairs, root/clean: 3 mid-grey images for noise sets."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(3):
        gt = _rand_u8(rng, (40, 56, 3), 30, 220)
        lq = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
        _save_png(gt, root / "rain" / "target" / f"{i:03d}.png")
        _save_png(lq, root / "rain" / "input" / f"{i:03d}.png")
        _save_png(_rand_u8(rng, (40, 56, 3), 64, 192), root / "clean" / f"img{i}.png")
    for i in range(2):
        gt = _rand_u8(rng, (40, 56, 3))
        _save_png(gt, root / "same" / "target" / f"{i}.png")
        _save_png(gt, root / "same" / "input" / f"{i}.png")
    return root


class Identity1x1(nn.Module):
    """A model with a parameter: a 1x1 convolution initialised to the identity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def _read_u8(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_evaluate_identity_tiled(dataset, tmp_path):
    rain = dataset / "rain"
    sets = [("deraining", "Rain-A", rain / "input", rain / "target", "same"),
            {"task": "deraining", "name": "Same", "lq": str(dataset / "same" / "input"),
             "gt": str(dataset / "same" / "target")}]
    model = Identity1x1().train()
    rows = runner.evaluate(model, sets, protocol="tiled", save_dir=tmp_path / "out")
    assert model.training  # the caller's flag is restored
    images = [r for r in rows if r["image"] is not None]
    means = [r for r in rows if r["image"] is None]
    assert [r["image"] for r in images] == ["000.png", "001.png", "002.png", "0.png", "1.png"]
    assert [(r["set"], r["n"]) for r in means] == [("Rain-A", 3), ("Same", 2)]
    for r in images[:3]:   # identity restoration: the metrics of the LQ image itself
        name = r["image"]
        lq = _read_u8(dataset / "rain" / "input" / name)
        gt = _read_u8(dataset / "rain" / "target" / name)
        assert r["psnr"] == pytest.approx(psnr(lq, gt), rel=1e-12)
        assert r["ssim"] == pytest.approx(ssim(lq, gt), rel=1e-12)
        saved = tmp_path / "out" / "tiled" / "deraining" / "Rain-A" / name
        np.testing.assert_array_equal(_read_u8(saved), lq)
    assert means[0]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in images[:3]]))
    assert all(r["psnr"] == math.inf and r["ssim"] == pytest.approx(1.0) for r in images[3:])
    assert means[1]["lpips"] is None

    md, csv_text = runner.format_tables(rows)
    assert "Protocol: tiled" in md and "crop border 0" in md and "RGB" in md
    assert "| deraining | Rain-A | 3 |" in md and "| deraining | mean of 2 sets | 5 |" in md
    assert "LPIPS" not in md
    table = list(csv.DictReader(io.StringIO(csv_text)))
    assert [t["set"] for t in table] == ["Rain-A", "Same", "mean of 2 sets"]
    assert float(table[0]["psnr"]) == pytest.approx(means[0]["psnr"], abs=1e-6)
    assert table[1]["psnr"] == "inf"


def test_evaluate_resize_noise_and_lpips(dataset, tmp_path):
    bp, lp, _, _ = _lpips_files(tmp_path)
    metric = LPIPS.from_files(bp, lp)
    sets = [runner.TestSet(task="gaussian denoising", name="Clean", gt=str(dataset / "clean"),
                           sigma=25),
            ("deraining", "Rain-A", dataset / "rain" / "input", dataset / "rain" / "target")]
    rows = runner.evaluate(nn.Identity(), sets, protocol="tiled", lpips=metric,
                           save_dir=tmp_path / "out")
    noisy = [r for r in rows if r["set"] == "Clean (σ=25)" and r["image"]]
    assert len(noisy) == 3
    # identity on Gaussian noise of sigma 25 (no clipping on these grey images): MSE = 625 in
    # expectation over ~6700 samples per image, plus 1/12 from rounding the output to 8 bits
    from varformer.data.datasets import NoisyDataset
    ds = NoisyDataset(dataset / "clean", sigma=25, crop=None, phase="test", augment=False)
    for i, r in enumerate(noisy):
        assert r["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / (625 + 1 / 12)), abs=0.3)
        assert r["lpips"] > 0
        item = ds[i]   # the data package's test noise
        assert r["psnr"] == pytest.approx(psnr((item["lq"] + 1) / 2, (item["gt"] + 1) / 2),
                                          abs=1e-9)
    # the noise is a function of the image and the seed only
    again = runner.evaluate(nn.Identity(), [sets[0]], protocol="tiled")
    assert [r["psnr"] for r in again[:3]] == [r["psnr"] for r in noisy]
    seed1 = dict(task="g", name="Clean", gt=str(dataset / "clean"), sigma=25, seed=1)
    other_seed = runner.evaluate(nn.Identity(), [seed1], protocol="tiled")
    assert other_seed[0]["psnr"] != noisy[0]["psnr"]

    rows += runner.evaluate(nn.Identity(), sets[1:], protocol="resize", lpips=metric,
                            save_dir=tmp_path / "out")
    resized = [r for r in rows if r["protocol"] == "resize" and r["image"]]
    assert len(resized) == 3 and all(20 < r["psnr"] < 60 and 0 < r["ssim"] <= 1 for r in resized)
    assert (tmp_path / "out" / "resize" / "deraining" / "Rain-A" / "002.png").is_file()
    assert (tmp_path / "out" / "tiled" / "gaussian_denoising" / "Clean_sigma25"
            / "img0.png").is_file()
    md, csv_text = runner.format_tables(rows)
    assert "Protocol: tiled" in md and "Protocol: resize" in md and "official" in md
    assert "LPIPS↓" in md and "Clean (σ=25)" in md and "mean of" not in md
    table = list(csv.DictReader(io.StringIO(csv_text)))
    assert [(t["protocol"], t["set"], t["sigma"]) for t in table] == [
        ("tiled", "Clean (σ=25)", "25"), ("tiled", "Rain-A", ""), ("resize", "Rain-A", "")]
    assert all(float(t["lpips"]) > 0 for t in table)


def test_evaluate_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="either lq"):
        runner.TestSet(task="t", name="n", gt="g")
    with pytest.raises(ValueError, match="protocol"):
        runner.evaluate(nn.Identity(), [], protocol="bogus")
    (dataset / "rain" / "input" / "001.png").unlink()   # a GT without LQ partner
    with pytest.raises(ValueError, match="001"):
        runner.evaluate(nn.Identity(), [("t", "n", dataset / "rain" / "input",
                                         dataset / "rain" / "target")])


def _write_config(dataset, tmp_path):
    cfg = tmp_path / "eval.yml"
    cfg.write_text(
        f"root: {dataset.name}\n"
        "crop_border: 2\n"
        "sets:\n"
        "  - {task: deraining, name: Rain-A, lq: rain/input, gt: rain/target, rule: same}\n"
        "  - {task: gaussian denoising, name: Clean, gt: clean, sigma: [15, 50], "
        "test_y_channel: true}\n")
    return cfg


def test_load_config(dataset, tmp_path):
    cfg = runner.load_config(_write_config(dataset, tmp_path))
    assert cfg.crop_border == 2 and cfg.tile == 256 and not cfg.test_y_channel
    assert [s.label for s in cfg.sets] == ["Rain-A", "Clean (σ=15)", "Clean (σ=50)"]
    assert cfg.sets[0].lq == str(dataset / "rain" / "input")
    assert cfg.sets[2].test_y_channel is True
    bad = tmp_path / "bad.yml"
    bad.write_text("sets:\n  - {task: t, name: n, gt: g, lq: l, sigmaa: 3}\n")
    with pytest.raises(ValueError, match="sigmaa"):
        runner.load_config(bad)


def test_eval_main(dataset, tmp_path, monkeypatch, capsys):
    cfg = _write_config(dataset, tmp_path)

    def no_model(*a, **k):
        raise AssertionError("no model may be built")

    monkeypatch.setattr(runner, "_load_model", no_model)
    assert runner.eval_main([str(cfg)]) == 2
    assert "--weights" in capsys.readouterr().err
    assert runner.eval_main([str(cfg), "--weights", str(tmp_path / "none.pth")]) == 2
    assert "wsy541/VarFormer" in capsys.readouterr().err

    weights = tmp_path / "net_g_last.pth"
    weights.write_bytes(b"stand-in")
    bp, lp, _, _ = _lpips_files(tmp_path)
    assert runner.eval_main([str(cfg), "--weights", str(weights), "--lpips-backbone", str(bp)]) == 2
    assert runner.eval_main([str(cfg), "--weights", str(weights), "--lpips-backbone", str(bp),
                             "--lpips-linear", str(tmp_path / "x.pth")]) == 2
    assert "pip install --no-deps lpips" in capsys.readouterr().err

    built = []
    monkeypatch.setattr(runner, "_load_model",
                        lambda w, mode, device, preset="full":
                        built.append((w, mode, device)) or Identity1x1())
    out = tmp_path / "results"
    rc = runner.eval_main([str(cfg), "--weights", str(weights), "--out", str(out),
                           "--device", "cpu", "--mode", "paper",
                           "--lpips-backbone", str(bp), "--lpips-linear", str(lp)])
    assert rc == 0 and built == [(str(weights), "paper", "cpu")]
    md = (out / "results.md").read_text()
    assert "Protocol: tiled" in md and "Protocol: resize" in md and "Clean (σ=50)" in md
    assert "Y, crop 2" in md and "RGB, crop 2" in md          # mixed settings -> per-row column
    table = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert len(table) == 6
    per_image = list(csv.DictReader(io.StringIO((out / "per_image.csv").read_text())))
    assert len(per_image) == 2 * 9
    assert (out / "resize" / "gaussian_denoising" / "Clean_sigma15" / "img2.png").is_file()
    assert "Rain-A" in capsys.readouterr().out


def test_eval_main_with_model_object(dataset, tmp_path):
    """The hidden _model keyword runs without a weights file (stand-in model)."""
    cfg = _write_config(dataset, tmp_path)
    out = tmp_path / "res"
    assert runner.eval_main([str(cfg), "--protocol", "resize", "--out", str(out),
                             "--device", "cpu"], _model=nn.Identity()) == 0
    md = (out / "results.md").read_text()
    assert "Protocol: resize" in md and "Protocol: tiled" not in md and "Identity" in md
    assert not (out / "tiled").exists()
