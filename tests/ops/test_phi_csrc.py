"""C++ φ step of the quantizer's CPU loop (torch.ops.varformer_ext.phi_update) against a
float64 reference, on every inner-kernel ISA variant this CPU runs.

h [B, H, W, C] (channels last), weight [C, C, 3, 3], bias [C]; f_hat, f_rest updated in place:
p = keep * h + mix * (conv3x3(h, padding 1) + bias), f_hat += p, f_rest -= p; returns p."""
import pytest
import torch
import torch.nn.functional as F

from tests.ops.test_vq_csrc import built, isa  # noqa: F401  (fixtures; `built` is autouse)


def phi_update(*args):
    return torch.ops.varformer_ext.phi_update(*args)


def reference(h, w, b, keep, mix):
    hn = h.double().permute(0, 3, 1, 2)
    conv = F.conv2d(hn, w.double(), b.double(), padding=1)
    return (keep * hn + mix * conv).permute(0, 2, 3, 1)


def inputs(B, H, W, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, H, W, C, generator=g)
    w = torch.randn(C, C, 3, 3, generator=g) / (3 * C ** 0.5)
    b = torch.randn(C, generator=g)
    return h, w, b, torch.randn(B, H, W, C, generator=g), torch.randn(B, H, W, C, generator=g)


@pytest.mark.parametrize("B,H,W,C", [(1, 1, 1, 8), (2, 5, 7, 8), (3, 16, 16, 32), (1, 13, 3, 40),
                                     (2, 9, 13, 24), (1, 4, 17, 64), (1, 2, 3, 20)])
def test_matches_float64_reference(B, H, W, C, isa):  # noqa: F811
    h, w, b, fh, fr = inputs(B, H, W, C)
    fh0, fr0 = fh.double(), fr.double()
    mix = 0.3 if C == 8 else 0.5
    p = phi_update(h, w, b, 1 - mix, mix, fh, fr)
    want = reference(h, w, b, 1 - mix, mix)
    tol = 2e-6 * (1 + want.abs().max().item())
    assert p.shape == h.shape and p.dtype == torch.float32
    assert (p.double() - want).abs().max().item() <= tol
    assert (fh.double() - (fh0 + want)).abs().max().item() <= 2 * tol
    assert (fr.double() - (fr0 - want)).abs().max().item() <= 2 * tol


def test_thread_count_does_not_change_results(isa):  # noqa: F811
    h, w, b, fh, fr = inputs(3, 11, 16, 32, seed=1)
    a = phi_update(h, w, b, 0.5, 0.5, fh.clone(), fr.clone())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = phi_update(h, w, b, 0.5, 0.5, fh.clone(), fr.clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, one)


@pytest.mark.parametrize("case,match", [
    ("h3d", "4-D"), ("wshape", r"weight must be \[C, C, 3, 3\]"), ("bshape", "bias must be"),
    ("fshape", "f_hat and f_rest must be"), ("f64", "float32"), ("noncontig", "contiguous"),
    ("alias", "distinct"), ("c6", "multiple of 4"),
])
def test_bad_inputs_raise(case, match):
    C = 6 if case == "c6" else 8
    h, w, b, fh, fr = inputs(1, 4, 5, C)
    if case == "h3d":
        h = h[0]
    elif case == "wshape":
        w = w[:, :, :2]
    elif case == "bshape":
        b = b[:3]
    elif case == "fshape":
        fh = fh[:, :3]
    elif case == "f64":
        w = w.double()
    elif case == "noncontig":
        h = h.transpose(1, 2).contiguous().transpose(1, 2)
        fh = fh.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "alias":
        fr = fh
    with pytest.raises(RuntimeError, match=match):
        phi_update(h, w, b, 0.5, 0.5, fh, fr)
