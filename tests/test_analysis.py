"""varformer analyze scales / tsne / dae: invariants of what they compute (Eq. 2 with C = none
and C = all against the VQVAE's own paths, DAE weights that sum to 1 and are the ones the
fusion used, one t-SNE point per image and latent), their files and their command line."""
import csv
import os

import numpy as np
import pytest
import torch

from varformer.analysis import analyze_main
from varformer.analysis.common import UsageError, decode, latents
from varformer.analysis.dae import dae_weights
from varformer.analysis.scales import default_sets, parse_sets, replace_scales, set_label
from varformer.models import VQVAE, VarFormer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = VarFormer.small().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():             # a non-identity adapter, so that var_input matters
        for blk in m.ft_layers.blks:
            blk.beta.copy_(torch.randn(blk.beta.shape, generator=g) * 0.5)
            blk.gamma.copy_(torch.randn(blk.gamma.shape, generator=g) * 0.5)
        # untrained, the cross-attention is nearly uniform, the logits are flat and the greedy
        # tokens do not depend on the image; sharpened, those of the larger scales do
        for ca in m.cross_attn_blocks:
            ca.mat_q.weight.mul_(20)
            ca.mat_kv.weight.mul_(20)
            ca.proj.weight.mul_(5)
        m.head.weight.mul_(10)
    return m


@pytest.fixture(scope="module")
def lq():
    g = torch.Generator().manual_seed(2)
    return torch.rand(1, 3, 256, 256, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three small RGB files of odd, non-square sizes."""
    from PIL import Image
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(61, 97), (300, 257), (64, 64)]):
        base = np.linspace(0, 1, w)[None, :, None] * np.linspace(1, 0.2, h)[:, None, None]
        img = np.clip(base * [1.0, 0.6 + 0.1 * i, 0.3] + rng.normal(0, 0.05, (h, w, 3)), 0, 1)
        p = d / f"img{i}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_replacement_sets():
    sets = default_sets()
    assert len(sets) == 20 and sets[0] == () and sets[-1] == tuple(range(1, 11))
    assert (1,) in sets and (1, 2, 3, 4, 5, 6, 7, 8, 9) in sets and (10,) in sets
    assert (2, 3, 4, 5, 6, 7, 8, 9, 10) in sets
    assert parse_sets("none; 1-3 ;4-10;1,5,9;all") == [(), (1, 2, 3), tuple(range(4, 11)),
                                                       (1, 5, 9), tuple(range(1, 11))]
    assert parse_sets("default") == sets
    assert [set_label(c) for c in [(), (1, 2, 3), (1, 5), tuple(range(1, 11)), (4,)]] == \
        ["none", "1-3", "1,5", "all", "4"]
    for bad in ("0-3", "1-11", "a", "3-1", ";"):
        with pytest.raises(UsageError):
            parse_sets(bad)


def test_scale_replacement_invariants(model, lq):
    vq = VQVAE(ch=32)
    vq.load_state_dict({k: v for k, v in model.state_dict().items()
                        if k.split(".")[0] in ("encoder", "decoder", "quantize", "quant_conv",
                                               "post_quant_conv")}, strict=True)
    vq.eval()
    sets = [(), tuple(range(1, 11)), (1, 2, 3)]
    res = replace_scales(model, lq, sets)
    with torch.no_grad():
        recon = vq.img_to_reconstructed_img(lq, last_one=True)    # VQVAE's own round trip
        f = vq.quant_conv(vq.encoder(lq))
        f_hat_q = vq.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
        _, f_hat_v, _, _ = model.var_branch(model.ft_layers(f))
        pred = vq.fhat_to_img(f_hat_v)
    torch.testing.assert_close(res["F_e"].sum(1), f_hat_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res["images"][0], recon, rtol=1e-4, atol=1e-4)   # C = none
    torch.testing.assert_close(res["images"][1], pred, rtol=1e-4, atol=1e-4)    # C = all
    mixed = res["images"][2]
    assert (mixed - recon).abs().max() > 1e-3 and (mixed - pred).abs().max() > 1e-3
    # the VAR branch fed the encoder latent itself: F_e unchanged, F_v from f
    enc = latents(model, lq, var_input="encoder")
    torch.testing.assert_close(enc["F_e"], res["F_e"])
    with torch.no_grad():
        s_v_f = model.var_branch(f)[0]
    torch.testing.assert_close(enc["F_v"], s_v_f)
    assert (enc["F_v"] - res["F_v"]).abs().max() > 0      # the adapter changed the input
    torch.testing.assert_close(decode(model, enc["F_v"].sum(1)),
                               decode(model, enc["f_hat_v"]), rtol=1e-4, atol=1e-4)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scales_cli_writes_grid_and_metrics(model, images, tmp_path, capsys):
    from varformer.analysis.common import read_image, to_unit
    from varformer.eval.metrics import psnr, ssim

    out = tmp_path / "scales"
    rc = analyze_main(["scales", images[0], "--clean", images[1], "--sets", "none;2,4;all",
                       "--out", str(out)], _model=model)
    assert rc == 0
    rows = _rows(out / "scales.csv")
    assert [r["set"] for r in rows] == ["none", "2,4", "all"]
    assert all(r["image"] == "img0" for r in rows)
    assert all(np.isfinite(float(r["psnr"])) and -1 <= float(r["ssim"]) <= 1 for r in rows)
    res = replace_scales(model, read_image(images[0]), [()])
    recon8 = (to_unit(res["images"][0])[0] * 255).round() / 255
    gt = to_unit(read_image(images[1]))[0]
    assert abs(float(rows[0]["psnr"]) - psnr(recon8, gt)) < 1e-3
    assert abs(float(rows[0]["ssim"]) - ssim(recon8, gt)) < 1e-3
    from PIL import Image
    with Image.open(out / "img0_scales.png") as im:
        assert im.size[0] >= 5 * 256 // 2
    # no clean image: the sets are listed, metrics left empty
    rc = analyze_main(["scales", images[2], "--sets", "1", "--out", str(tmp_path / "s2")],
                      _model=model)
    rows = _rows(tmp_path / "s2" / "scales.csv")
    assert rc == 0 and len(rows) == 1 and rows[0]["psnr"] == "" and rows[0]["scales"] == "1"
    # one clean image per degraded image
    rc = analyze_main(["scales", images[0], images[2], "--clean", images[1],
                       "--out", str(tmp_path / "s3")], _model=model)
    assert rc == 2 and "one clean image per degraded" in capsys.readouterr().err


def test_dae_weights_sum_to_one_and_are_the_fusion_weights(model, lq):
    seen = {}

    def grab(name):
        def hook(mod, inp, out):
            seen[name] = (inp[0], inp[1], out[0])
        return hook
    handles = [model.Mainencoder.DAE["Level_2"].register_forward_hook(grab("enc2")),
               model.main_decoder.DAE["Level_1"].register_forward_hook(grab("dec1"))]
    try:
        w = dae_weights(model, lq)
    finally:
        for h in handles:
            h.remove()
    assert list(w) == [("encoder", i) for i in (1, 2, 3, 4)] + \
        [("decoder", i) for i in (4, 3, 2, 1)]
    for (part, i), t in w.items():
        assert t.shape == (1, 2, 256 >> i, 256 >> i)
        torch.testing.assert_close(t.sum(1), torch.ones(1, 256 >> i, 256 >> i))
        assert t.min() >= 0
    for name, key in (("enc2", ("encoder", 2)), ("dec1", ("decoder", 1))):
        h, p, fused = seen[name]
        ww = w[key]
        torch.testing.assert_close(fused, ww[:, :1] * h + ww[:, 1:] * p, rtol=1e-5, atol=1e-5)


def test_dae_cli(model, images, tmp_path, capsys):
    out = tmp_path / "dae"
    assert analyze_main(["dae", images[1], "--out", str(out)], _model=model) == 0
    rows = _rows(out / "dae.csv")
    assert [(r["part"], r["level"]) for r in rows] == \
        [("encoder", str(i)) for i in (1, 2, 3, 4)] + [("decoder", str(i)) for i in (4, 3, 2, 1)]
    npz = np.load(out / "img1_dae.npz")
    assert sorted(npz.files) == sorted(f"{p}_L{i}" for p in ("encoder", "decoder")
                                       for i in (1, 2, 3, 4))
    for k in npz.files:
        np.testing.assert_allclose(npz[k].sum(0), 1.0, atol=1e-5)
    assert abs(float(rows[0]["w2_mean"]) - npz["encoder_L1"][1].mean()) < 1e-4
    assert (out / "img1_dae.png").is_file()
    no_dae = VarFormer.small(ablation={"dae": False})
    assert analyze_main(["dae", images[1], "--out", str(out)], _model=no_dae) == 2
    assert "without DAE" in capsys.readouterr().err


def test_tsne_one_point_per_image_and_latent(model, images, tmp_path):
    out = tmp_path / "tsne"
    d = os.path.dirname(images[0])          # a folder: all three images
    rc = analyze_main(["tsne", "--group", f"clean={d}", "--group", f"rain={images[1]}",
                       "--group", f"noise={images[2]}", "--out", str(out)], _model=model)
    assert rc == 0
    rows = _rows(out / "tsne.csv")
    n = len(images) + 2
    assert len(rows) == 2 * n
    for lat in ("F_e", "F_v"):
        mine = [r for r in rows if r["latent"] == lat]
        assert len(mine) == n
        assert [r["group"] for r in mine] == ["clean"] * 3 + ["rain", "noise"]
        assert all(np.isfinite(float(r["x"])) and np.isfinite(float(r["y"])) for r in mine)
        assert (out / f"tsne_{lat}.png").is_file()
    fe = np.array([[float(r["x"]), float(r["y"])] for r in rows if r["latent"] == "F_e"])
    assert np.ptp(fe, axis=0).max() > 0                  # distinct images, distinct points


def test_tsne_needs_scikit_learn(monkeypatch):
    import sys

    from varformer.analysis.tsne import embed
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(UsageError, match="pip install scikit-learn"):
        embed(np.random.rand(5, 4))


def test_tsne_identical_latents_do_not_crash():
    from varformer.analysis.tsne import embed
    assert np.array_equal(embed(np.ones((4, 6))), np.zeros((4, 2)))
    pts = embed(np.random.default_rng(0).normal(size=(7, 5)))
    assert pts.shape == (7, 2) and np.isfinite(pts).all()


def test_cli_without_weights_refuses_in_one_line(images, tmp_path, capsys):
    from varformer.cli import main
    assert main(["analyze", "scales", images[0], "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weights" in err and "--random-init" in err
    assert main(["analyze", "dae", images[0], "--out", str(tmp_path), "--weights",
                 str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
    assert main(["analyze", "dae", images[0], "--out", str(tmp_path), "--weights",
                 str(tmp_path), "--random-init"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(t in out for t in ("scales", "tsne", "dae"))
