"""VarFormer: the released checkpoint's key manifest (full size on the meta device), the small
preset end to end on CPU, loading formats and errors, the documented official quirks."""
from pathlib import Path

import pytest
import torch

import varformer.ops as vops
from varformer.models import Adapter, VarFormer
from varformer.models.varformer import CrossAttentionAR

DATA = Path(__file__).resolve().parents[1] / "data"


def manifest(name):
    out = {}
    for r in (DATA / name).read_text().splitlines()[1:]:
        key, shape, dtype, kind = r.split("\t")
        out[key] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), kind)
    return out


def test_released_model_matches_manifest():
    with torch.device("meta"):
        m = VarFormer()
    params = {k for k, _ in m.named_parameters()}
    ours = {k: (tuple(v.shape), "param" if k in params else "buffer")
            for k, v in m.state_dict().items()}
    want = manifest("varformer_released_d16_state_dict.tsv")
    assert set(ours) == set(want), (sorted(set(want) - set(ours))[:5],
                                    sorted(set(ours) - set(want))[:5])
    assert ours == want
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 908.17) < 0.01
    assert m.to_official_state_dict().keys() == m.state_dict().keys()


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return VarFormer.small().eval()


@pytest.fixture(scope="module")
def lq():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 256, 256, generator=g) * 2 - 1


def test_small_forward_shapes_and_determinism(small, lq):
    # a fixed thread count: ATen's parallel reductions round by it, and a busy machine changes it
    with torch.no_grad(), vops.fixed_threads():
        out, lq_feat, logits = small(lq, return_all=True)
        again = small(lq)
    assert out.shape == lq.shape and out.abs().max() <= 1
    assert lq_feat.shape == (1, 32, 16, 16) and logits.shape == (1, 680, 4096)
    assert torch.equal(out, again)                       # greedy AR: deterministic


def test_var_branch_priors_sum_to_fhat(small):
    f_a = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        s_v, f_hat, logits, lq_feat = small.var_branch(f_a)
    assert s_v.shape == (2, 10, 32, 16, 16)
    torch.testing.assert_close(s_v.sum(1), f_hat, rtol=1e-4, atol=1e-4)
    # lq_feat carries the quantised latent's value (straight-through to the adapter)
    q = small.quantize
    torch.testing.assert_close(lq_feat, q.f_to_idxBl_or_fhat(f_a, to_fhat=True)[-1],
                               rtol=1e-5, atol=1e-5)


def test_adapter_is_identity_at_init():
    a = Adapter()
    x = torch.randn(2, 32, 16, 16)
    torch.testing.assert_close(a(x), x, rtol=0, atol=0)


def test_input_blend_alone_returns_the_input(lq):
    torch.manual_seed(0)
    m = VarFormer.small().eval()
    with torch.no_grad():
        m.main_decoder.input_w.fill_(1.0)
        torch.testing.assert_close(m(lq), lq.clamp(-1, 1))


def test_official_cross_attention_mixes_heads_and_batch():
    torch.manual_seed(0)
    ca = CrossAttentionAR(0, 32, num_heads=4)
    fd, fv = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    off, std = ca(fd, fv, official=True), ca(fd, fv, official=False)
    assert (off - std).abs().max() > 1e-3
    fd2 = fd.clone()
    fd2[1] += 1.0                                           # change sample 1 only
    assert torch.equal(ca(fd2, fv, official=False)[0], std[0])     # per-sample: row 0 unchanged
    assert not torch.equal(ca(fd2, fv, official=True)[0], off[0])  # official: row 0 changes
    one = CrossAttentionAR(0, 32, num_heads=1)               # one head, one sample: identical
    torch.testing.assert_close(one(fd[:1], fv[:1], official=True),
                               one(fd[:1], fv[:1], official=False))


def test_paper_mode_differs_only_in_the_var_branch(small, lq):
    paper = VarFormer.small("paper", concat_priors=True).eval()
    paper.load_official(small.state_dict())
    f_a = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        s_off = small.var_branch(f_a)[0]
        s_pap = paper.var_branch(f_a)[0]
        assert not torch.equal(s_off, s_pap)
        # given the same priors, the restoration networks compute the same thing
        h, e_vq = small.encoder(lq, return_features=True)
        z1, e1 = small.Mainencoder(lq, s_off, e_vq)
        z2, e2 = paper.Mainencoder(lq, s_off, e_vq)
    torch.testing.assert_close(z1, z2)


def test_fused_and_reference_paths_agree(lq, monkeypatch):
    torch.manual_seed(0)
    m = VarFormer.small().eval()
    with torch.no_grad():
        fused = m(lq)
        monkeypatch.setenv("VARFORMER_BACKEND", "reference")
        ref = m(lq)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_cpu_forward_and_backward_follow_the_machine_load(lq, monkeypatch, fused):
    """On a busy machine the fused model's forward and its backward run on the free CPUs'
    threads (here: one), torch's count restored after each; reference ops keep it."""
    from varformer.ops import _ext
    torch.manual_seed(0)
    m = VarFormer.small("paper").train()
    m.use_fused_kernels = fused
    seen = {"fwd": [], "bwd": []}
    m.encoder.register_forward_hook(lambda *a: seen["fwd"].append(torch.get_num_threads()))
    m.main_decoder.norm_out.weight.register_hook(lambda g: seen["bwd"].append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    monkeypatch.setattr(_ext, "load_aware_threads", lambda want=None: 1)
    try:
        torch.set_num_threads(2)
        out, lq_feat, _ = m(lq, return_all=True)
        assert torch.get_num_threads() == 2
        (out.abs().mean() + lq_feat.square().mean()).backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    want = 1 if fused else 2
    assert seen == {"fwd": [want], "bwd": [want]}


def test_from_pretrained_formats_and_errors(small, lq, tmp_path):
    sd = small.state_dict()
    with torch.no_grad():
        want = small(lq)
    for i, obj in enumerate(({"params_ema": sd}, {"params": sd}, sd)):
        path = tmp_path / f"w{i}.pth"
        torch.save(obj, path)
        m = VarFormer.from_pretrained(str(path), **_small_kw()).eval()
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), sd.values()))
    with torch.no_grad():
        torch.testing.assert_close(m(lq), want)
    bad = dict(sd)
    bad.pop("main_decoder.theta")
    bad["extra.weight"] = torch.zeros(1)
    torch.save({"params_ema": bad}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="1 missing.*main_decoder.theta.*1 unexpected.*extra"):
        VarFormer.from_pretrained(str(tmp_path / "bad.pth"), **_small_kw())
    with pytest.raises(FileNotFoundError, match="not found"):
        VarFormer.from_pretrained(str(tmp_path / "nope.pth"), **_small_kw())
    with pytest.raises(ValueError, match="give the released weights"):
        VarFormer.from_pretrained(**_small_kw())
    # official VQVAE / VAR files for training
    vae = {k: v for k, v in sd.items() if k.split(".")[0] in
           ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}
    torch.save(vae, tmp_path / "vae.pth")
    m = VarFormer.from_pretrained(vae=str(tmp_path / "vae.pth"), **_small_kw())
    assert torch.equal(m.quantize.embedding.weight, sd["quantize.embedding.weight"])


def _small_kw():
    return dict(var_depth=2, n_cross=1, ch=32, vae_ch=32, enc_heads=2, dec_heads=2,
                cross_heads=2)


def test_bad_inputs(small):
    with pytest.raises(ValueError, match=r"\[B, 3, 256, 256\]"):
        small(torch.rand(1, 4, 256, 256))
    with pytest.raises(ValueError, match="256×256 inputs.*varformer.restore"):
        small(torch.rand(1, 3, 128, 256))
    with pytest.raises(TypeError, match="float"):
        small(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mode must be one of"):
        VarFormer(mode="fast")
