"""MultiScaleQuantizer against a plain eager reference written from VAR's description
(area downsampling, |z|²+|e|²−2z·e with argmin, bicubic upsampling, φ per scale from the table
[0,0,1,1,1,2,2,3,3,3], f_hat/f_rest updates), on random weights and features."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, ON_GPU, triton_usable
from varformer.ops import MultiScaleQuantizer
from varformer.ops.quantizer import phi_index

PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PHI_OF_SCALE = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]

# VAR's VQVAE checkpoint keys under "quantize." (vae_ch160v4096z32) with shapes
VAR_KEYS = {"ema_vocab_hit_SV": (10, 4096), "embedding.weight": (4096, 32),
            **{f"quant_resi.qresi_ls.{i}.weight": (32, 32, 3, 3) for i in range(4)},
            **{f"quant_resi.qresi_ls.{i}.bias": (32,) for i in range(4)}}


def make(backend="auto", **kw):
    q = MultiScaleQuantizer(backend=backend, **kw).to(DEVICE)
    with torch.no_grad():
        q.embedding.weight.normal_()
        for p in q.quant_resi.parameters():
            p.normal_(0, 0.05)
    return q.eval().requires_grad_(False)


def phis(q):
    return [q.quant_resi.qresi_ls[i] for i in range(4)]


def ref_phi(q, k, h):
    conv = phis(q)[k]
    return 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)


def ref_quantize(q, f):
    """-> (idx per scale [B, pn²], f_hat after each scale, φ(up(E[idx])) per scale)."""
    E = q.embedding.weight
    B, C, H, W = f.shape
    rest, fhat = f.clone(), torch.zeros_like(f)
    idxs, fhats, priors = [], [], []
    for si, pn in enumerate(PN):
        z = rest if pn == H else F.interpolate(rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, C)
        d = (z * z).sum(1, keepdim=True) + (E * E).sum(1)
        d = torch.addmm(d, z, E.T, beta=1, alpha=-2)
        idx = d.argmin(1)
        h = E[idx].view(B, pn, pn, C).permute(0, 3, 1, 2)
        if pn != H:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = ref_phi(q, PHI_OF_SCALE[si], h)
        fhat, rest = fhat + h, rest - h
        idxs.append(idx.view(B, pn * pn))
        fhats.append(fhat)
        priors.append(h)
    return idxs, fhats, priors


def ref_teacher_forcing(q, idxs):
    E = q.embedding.weight
    B = idxs[0].shape[0]
    fhat = torch.zeros(B, 32, 16, 16, device=E.device)
    out = []
    for si in range(9):
        pn = PN[si]
        h = E[idxs[si]].view(B, pn, pn, 32).permute(0, 3, 1, 2)
        fhat = fhat + ref_phi(q, PHI_OF_SCALE[si], F.interpolate(h, size=(16, 16),
                                                                   mode="bicubic"))
        nxt = PN[si + 1]
        out.append(F.interpolate(fhat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
    return torch.cat(out, 1)


def test_phi_table():
    assert [phi_index(si / 9, 4) for si in range(10)] == PHI_OF_SCALE


PATHS = ["reference", "auto", "triton"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B", [1, 4])
def test_quantize_matches_eager_reference(path, B):
    if path == "triton" and not triton_usable():
        pytest.skip("Triton unusable here")
    if path == "triton" and not ON_GPU:   # the interpreter: B = 4 took 94 s, B = 1 30 s on a
        if B == 1:                          # 2-core CPU; one batch of 2 covers the path there
            pytest.skip("Triton interpreter: the B = 2 case covers this path")
        B = 2
    q = make(path)
    f = torch.randn(B, 32, 16, 16, device=DEVICE)
    idxs, fhats, priors = ref_quantize(q, f)
    got = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    assert [t.shape for t in got] == [(B, pn * pn) for pn in PN]
    for si, (a, b) in enumerate(zip(got, idxs)):
        assert torch.equal(a, b), f"scale {si}: {(a != b).sum().item()} indices differ"
    for a, b in zip(q.f_to_idxBl_or_fhat(f, to_fhat=True), fhats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    out = q.quantize(f)
    assert out.priors.shape == (B, 10, 32, 16, 16)
    torch.testing.assert_close(out.priors, torch.stack(priors, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.priors.sum(1), out.f_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.scale_priors(out.indices), out.priors, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [1, 4])
def test_teacher_forcing_consistent(B):
    q = make()
    f = torch.randn(B, 32, 16, 16, device=DEVICE)
    idxs = q.f_to_idxBl_or_fhat(f, to_fhat=False)
    x = q.idxBl_to_var_input(idxs)
    assert x.shape == (B, 679, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, ref_teacher_forcing(q, idxs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.teacher_forcing_input(idxs), x)
    # each scale's input is the area-downsampled f_hat of the scales before it
    fhats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
    start = 0
    for si in range(9):
        nxt = PN[si + 1]
        want = F.interpolate(fhats[si], size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
        torch.testing.assert_close(x[:, start:start + nxt * nxt], want, rtol=1e-5, atol=1e-5)
        start += nxt * nxt


def test_autoregressive_steps_rebuild_fhat():
    q = make()
    f = torch.randn(2, 32, 16, 16, device=DEVICE)
    out = q.quantize(f)
    E = q.embedding.weight
    fhat = torch.zeros_like(f)
    priors = []
    for si, pn in enumerate(PN):
        h = E[out.indices[si]].view(2, pn, pn, 32).permute(0, 3, 1, 2)
        fhat, nxt, h_up = q.get_next_autoregressive_input_h(si, 10, fhat, h)
        priors.append(h_up)
        if si < 9:
            assert nxt.shape == (2, 32, PN[si + 1], PN[si + 1])
    torch.testing.assert_close(fhat, out.f_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(priors, 1), out.priors, rtol=1e-5, atol=1e-5)
    ms_h = [E[i].view(2, pn, pn, 32).permute(0, 3, 1, 2) for i, pn in zip(out.indices, PN)]
    torch.testing.assert_close(q.embed_to_fhat(ms_h, last_one=True), out.f_hat, rtol=1e-5,
                               atol=1e-5)


def test_var_state_dict_loads_strictly():
    q = MultiScaleQuantizer()
    assert {k: tuple(v.shape) for k, v in q.state_dict().items()} == VAR_KEYS
    sd = {k: torch.randn(s) for k, s in VAR_KEYS.items()}
    q.load_state_dict(sd, strict=True)
    assert torch.equal(q.embedding.weight, sd["embedding.weight"])
    # VAR keeps its own hit statistics when the scale count differs
    q.load_state_dict(dict(sd, ema_vocab_hit_SV=torch.ones(7, 4096)), strict=True)


def test_training_forward_straight_through_and_loss():
    q = make().train().requires_grad_(True)
    f = torch.randn(2, 32, 16, 16, device=DEVICE, requires_grad=True)
    f_hat, usages, loss = q(f, ret_usages=True)
    _, fhats, _ = ref_quantize(q, f.detach())
    torch.testing.assert_close(f_hat, fhats[-1], rtol=1e-5, atol=1e-5)
    want = sum(0.25 * F.mse_loss(fh, f.detach()) + F.mse_loss(fh, f.detach())
               for fh in fhats) / 10
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert len(usages) == 10
    f_hat.sum().backward(retain_graph=True)
    torch.testing.assert_close(f.grad, torch.ones_like(f))       # straight-through
    loss.backward()
    assert q.embedding.weight.grad is not None and q.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in q.quant_resi.parameters())


def test_bad_inputs():
    q = make()
    with pytest.raises(ValueError, match="latent size"):
        q.f_to_idxBl_or_fhat(torch.randn(1, 32, 15, 15, device=DEVICE), False)
    with pytest.raises(ValueError, match="channels"):
        q.quantize(torch.randn(1, 16, 16, 16, device=DEVICE))
    with pytest.raises(TypeError, match="float"):
        q.quantize(torch.ones(1, 32, 16, 16, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="at least two scales"):
        MultiScaleQuantizer(v_patch_nums=(16,))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_loop_matches_eager():
    q = make()
    f = torch.randn(4, 32, 16, 16, device=DEVICE)
    a = q.quantize(f)
    q.use_cuda_graph = False
    b = q.quantize(f)
    for x, y in zip(a.indices, b.indices):
        assert torch.equal(x, y)
    torch.testing.assert_close(a.f_hat, b.f_hat)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU loop's C++ variants")
@pytest.mark.parametrize("cpu_isa", ["avx512", "avx2", "baseline"])
def test_cpu_loop_on_every_isa_variant(cpu_isa, monkeypatch):
    """The CPU loop (C++ lookup, and the fused φ step where the variant is avx2/avx512) on each
    inner-kernel variant this CPU runs, against the eager reference."""
    from varformer.ops import _ext
    ok, why = _ext.cpu_status()
    if not ok or _ext.cpu_isa_table().get(cpu_isa, "not compiled"):
        pytest.skip(f"{cpu_isa} unusable here: {why or _ext.cpu_isa_table().get(cpu_isa)}")
    monkeypatch.setenv("VARFORMER_CPU_ISA", cpu_isa)
    q = make()
    f = torch.randn(3, 32, 16, 16)
    idxs, fhats, priors = ref_quantize(q, f)
    out = q.quantize(f)
    for si, (a, b) in enumerate(zip(out.indices, idxs)):
        assert torch.equal(a, b), f"scale {si}: {(a != b).sum().item()} indices differ"
    torch.testing.assert_close(out.priors, torch.stack(priors, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.f_hat, fhats[-1], rtol=1e-5, atol=1e-5)
    for a, b in zip(q.f_to_idxBl_or_fhat(f, to_fhat=True), fhats):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")
def test_phi_gets_gradients_with_a_frozen_codebook():
    """A frozen codebook with trainable φ: the search is the fused one, φ stays differentiable,
    and no gradient is asked of the search (torch deprecates backward through an op without one)."""
    q = make()
    q.quant_resi.requires_grad_(True)
    f = torch.randn(2, 32, 16, 16, device=DEVICE)
    out = q.quantize(f)
    _, _, priors = ref_quantize(q, f)
    torch.testing.assert_close(out.priors, torch.stack(priors, 1), rtol=1e-5, atol=1e-5)
    out.priors.square().sum().backward()
    grads = [p.grad for p in q.quant_resi.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    want = torch.autograd.grad(torch.stack(priors, 1).square().sum(),
                               list(q.quant_resi.parameters()))
    for g, w in zip(grads, want):      # sums over 10 scales of B·256 fp32 products
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5 * w.abs().max().item())
