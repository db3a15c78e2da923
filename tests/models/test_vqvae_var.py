"""VQVAE and VAR: official state-dict manifests (full size, built on the meta device), shapes and
features of a small preset, strict round trips, the block-causal mask and the KV-cached
autoregressive loop against teacher forcing."""
from pathlib import Path

import pytest
import torch

from varformer.models import VAR, VQVAE, build_var, sample_top_k_top_p
from varformer.ops import MultiScaleQuantizer

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL_PN = (1, 2, 3, 4)


def manifest(name):
    rows = (DATA / name).read_text().splitlines()[1:]
    out = {}
    for r in rows:
        key, shape, dtype, kind = r.split("\t")
        out[key] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype, kind)
    return out


def ours(model):
    params = {k for k, _ in model.named_parameters()}
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", ""),
                "param" if k in params else "buffer") for k, v in model.state_dict().items()}


def test_vqvae_matches_official_manifest():
    with torch.device("meta"):
        m = VQVAE()
    assert ours(m) == manifest("vae_ch160v4096z32_state_dict.tsv")
    assert list(m.state_dict()) == list(manifest("vae_ch160v4096z32_state_dict.tsv"))


def test_var_d16_matches_official_manifest():
    with torch.device("meta"):
        m = VAR(depth=16)
    assert ours(m) == manifest("var_d16_state_dict.tsv")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e6 - 310.28) < 0.01


def small_vqvae(**kw):
    torch.manual_seed(0)
    return VQVAE(vocab_size=64, ch=32, v_patch_nums=SMALL_PN, **kw).eval()


def test_vqvae_small_shapes_and_features():
    m = small_vqvae()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    f, enc = m.encode(x)
    assert f.shape == (2, 32, 4, 4)
    want = {"Level_0": (32, 64), "Level_1": (32, 32), "Level_2": (64, 16), "Level_3": (64, 8),
            "Level_4": (128, 4), "middle": (128, 4)}
    assert {k: (v.shape[1], v.shape[2]) for k, v in enc.items()} == want
    img, dec = m.decode(f)
    assert img.shape == x.shape
    assert {k: (v.shape[1], v.shape[2]) for k, v in dec.items()} == {
        "z_quant": (128, 4), "Level_4": (128, 4), "Level_3": (64, 8), "Level_2": (64, 16),
        "Level_1": (32, 32), "Level_0": (32, 64)}
    with torch.no_grad():
        idx = m.img_to_idxBl(x)
        assert [t.shape for t in idx] == [(2, pn * pn) for pn in SMALL_PN]
        rec = m.idxBl_to_img(idx, same_shape=True, last_one=True)
        f_hat = m.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
        torch.testing.assert_close(rec, m.fhat_to_img(f_hat), rtol=1e-4, atol=1e-4)
        assert rec.abs().max() <= 1
        rec2, usages, loss = m(x)
        assert rec2.shape == x.shape and loss.ndim == 0 and usages is None


def test_vqvae_state_dict_round_trip_and_bad_input():
    a, b = small_vqvae(), VQVAE(vocab_size=64, ch=32, v_patch_nums=SMALL_PN)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(b.eval().encode(x)[0], a.encode(x)[0])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        a.encode(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        a.encode(torch.rand(1, 3, 60, 64))
    assert not any(p.requires_grad for p in VQVAE(ch=32, v_patch_nums=SMALL_PN,
                                                  vocab_size=64, test_mode=True).parameters())


def small_var():
    torch.manual_seed(0)
    var = build_var(depth=2, patch_nums=SMALL_PN, vocab_size=64, num_classes=10).eval()
    q = MultiScaleQuantizer(vocab_size=64, v_patch_nums=SMALL_PN).eval()
    with torch.no_grad():      # a non-trivial model: AdaLN gammas away from their tiny init
        for b in var.blocks:
            b.ada_lin[-1].weight.normal_(0, 0.05)
        var.head.weight.normal_(0, 0.5)
    return var, q


def test_var_teacher_forcing_shapes_and_block_causality():
    var, q = small_var()
    L = sum(pn * pn for pn in SMALL_PN)
    x = torch.randn(3, L - 1, 32)
    label = torch.tensor([1, 2, 10])
    logits = var(label, x)
    assert logits.shape == (3, L, 64) and logits.dtype == torch.float32
    y = x.clone()
    y[:, 5:] += 1.0                    # change the inputs of scales 2.. (tokens 6..)
    logits2 = var(label, y)
    torch.testing.assert_close(logits2[:, :5], logits[:, :5])    # scales 0 and 1 untouched
    assert (logits2[:, 5:] - logits[:, 5:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="teacher-forcing tokens"):
        var(label, torch.randn(3, L, 32))


def test_var_kv_cached_inference_equals_teacher_forcing():
    var, q = small_var()
    label = torch.tensor([3, 7])
    f_hat, idx = var.autoregressive_infer_cfg(2, label, q, cfg=0.0, top_k=1, return_indices=True)
    assert [t.shape for t in idx] == [(2, pn * pn) for pn in SMALL_PN]
    f_hat2, idx2 = var.autoregressive_infer_cfg(2, label, q, cfg=0.0, top_k=1,
                                                return_indices=True)
    assert all(torch.equal(a, b) for a, b in zip(idx, idx2))   # greedy is deterministic
    with torch.no_grad():
        logits = var(label, q.idxBl_to_var_input(idx))
    assert torch.equal(logits.argmax(-1), torch.cat(idx, 1))
    # the sampled pyramid rebuilds the same f_hat through the quantizer
    torch.testing.assert_close(q.embed_to_fhat(
        [q.embedding(i).transpose(1, 2).reshape(2, 32, pn, pn) for i, pn in zip(idx, SMALL_PN)],
        last_one=True), f_hat)
    assert all(b.attn._k is None for b in var.blocks)           # caches released


def test_var_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[[0.0, 1.0, 5.0, 2.0]]]).repeat(1, 200, 1)
    assert torch.equal(sample_top_k_top_p(logits, top_k=1), torch.full((1, 200), 2))
    s = sample_top_k_top_p(logits, top_k=2, generator=g)
    assert set(s.unique().tolist()) <= {2, 3}
    s = sample_top_k_top_p(logits, top_p=0.5, generator=g)
    assert set(s.unique().tolist()) == {2}
