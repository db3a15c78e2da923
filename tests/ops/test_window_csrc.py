"""The C++ CPU window-attention kernel (csrc/window_attention.cpp) against a float64 eager Swin
reference: odd sizes, every window size it takes, shift 0 and > 0, head dims 7-320, 1-8 heads,
gradients (gradcheck and reference comparisons), determinism, every ISA variant, opcheck of the
raw ops, non-contiguous input, fallbacks and bad input."""
import importlib
import textwrap

import pytest
import torch

from tests.conftest import TOL, cpu_flags, rel_err, run_with_isa
from tests.ops.test_window_attention import eager_swin
from varformer.ops import window_attention

wa = importlib.import_module("varformer.ops.window_attention")   # the module, not the function
_OK, _WHY = wa.cpu_kernel_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"C++ kernel unavailable: {_WHY}")


@pytest.fixture
def csrc(monkeypatch):
    """Runs the CPU path on the C++ kernel (an error if it would fall back)."""
    monkeypatch.setenv("VARFORMER_BACKEND", "auto")
    monkeypatch.setitem(wa.CPU_KERNEL, "value", "csrc")


def make(B, H, W, ws, shift, nh, hd, dtype=torch.float64, mag=1.0, seed=0):
    """Random qkv [B, H, W, 3·nh·hd] (dtype) and table [(2ws-1)², nh] (float64); shift unused
    (the arguments read as the shape tuples)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3 * nh * hd, dtype=torch.float64, generator=g) * mag
    table = torch.randn((2 * ws - 1) ** 2, nh, dtype=torch.float64, generator=g)
    return qkv.to(dtype), table


# (B, H, W, ws, shift, heads, head_dim): H != W, B = 1 and 3, windows 2/3/4/7/8/16,
# shift 0 and > 0, head dims 7/20/30/32/40/80/160/320, 1..8 heads
SHAPES = [
    (1, 4, 6, 2, 1, 3, 7),
    (3, 8, 12, 4, 2, 2, 20),
    (3, 12, 4, 4, 0, 8, 40),
    (1, 9, 6, 3, 1, 5, 20),
    (1, 14, 21, 7, 3, 3, 32),
    (1, 7, 14, 7, 0, 1, 30),
    (3, 8, 16, 8, 4, 6, 30),
    (1, 16, 8, 8, 3, 4, 80),
    (1, 16, 32, 16, 8, 1, 32),
    (1, 16, 16, 16, 0, 2, 20),
    (1, 8, 4, 4, 2, 1, 160),
    (1, 4, 8, 4, 1, 2, 320),
    (3, 4, 4, 4, 2, 1, 320),
    (1, 8, 8, 4, 3, 7, 20),
]


def _check(shape, dtype, tol_fwd, tol_bwd, mag=1.0):
    B, H, W, ws, shift, nh, hd = shape
    qkv, table = make(B, H, W, ws, shift, nh, hd, dtype, mag=mag)
    q = qkv.clone().requires_grad_()
    t = table.to(dtype).clone().requires_grad_()
    out = window_attention(q, t, window_size=ws, shift_size=shift, num_heads=nh)
    q64, t64 = qkv.double().clone().requires_grad_(), table.clone().requires_grad_()
    ref = eager_swin(q64, t64, ws, shift, nh)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < tol_fwd
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(g.to(dtype))
    ref.backward(g)
    assert q.grad.dtype == dtype and t.grad.dtype == dtype
    assert rel_err(q.grad, q64.grad) < tol_bwd
    assert rel_err(t.grad, t64.grad) < tol_bwd


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_reference(csrc, shape):
    _check(shape, torch.float64, 1e-12, 1e-11)


@pytest.mark.parametrize("shape", SHAPES[:9], ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(csrc, shape):
    _check(shape, torch.float32, *TOL[torch.float32])


def test_large_scores_and_mask_underflow(csrc):
    """Scores of magnitude ~100 (softmax rows dominated by one key, most exps far below the
    -80 cut-off) stay exact in float64 and within float32 tolerance in float32."""
    _check((1, 8, 12, 4, 2, 2, 16), torch.float64, 1e-11, 1e-9, mag=6.0)
    _check((1, 8, 12, 4, 2, 2, 16), torch.float32, 1e-4, 1e-3, mag=6.0)


def test_half_inputs_compute_in_float32(csrc):
    for dt in (torch.float16, torch.bfloat16):
        _check((1, 8, 12, 4, 2, 2, 20), dt, *TOL[dt])


def test_gradcheck(csrc):
    qkv, table = make(1, 4, 8, 4, 2, 2, 3)
    qkv.requires_grad_()
    table.requires_grad_()
    f = lambda x, t: window_attention(x, t, window_size=4, shift_size=2, num_heads=2)  # noqa
    assert torch.autograd.gradcheck(f, (qkv, table), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_matches_chunked_path(monkeypatch):
    qkv, table = make(3, 8, 12, 4, 2, 4, 20, torch.float32)
    res = {}
    for mode in ("csrc", "chunked"):
        monkeypatch.setitem(wa.CPU_KERNEL, "value", mode)
        q, t = qkv.clone().requires_grad_(), table.float().requires_grad_()
        out = window_attention(q, t, window_size=4, shift_size=2, num_heads=4)
        out.square().sum().backward()
        res[mode] = (out, q.grad, t.grad)
    for a, b in zip(res["csrc"], res["chunked"]):
        assert rel_err(a, b.double()) < 1e-5


def test_table_gradient_deterministic_across_threads(csrc):
    qkv, table = make(3, 16, 24, 4, 2, 4, 20, torch.float32)
    n0 = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            q, t = qkv.clone().requires_grad_(), table.float().requires_grad_()
            window_attention(q, t, window_size=4, shift_size=2, num_heads=4).sum().backward()
            grads.append((q.grad, t.grad))
    finally:
        torch.set_num_threads(n0)
    for g in grads[1:]:
        assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1])


def test_non_contiguous_inputs(csrc):
    qkv, table = make(2, 8, 12, 4, 2, 2, 20)
    wide = torch.cat([qkv, qkv[..., :5]], -1)[..., :qkv.shape[-1]]         # strided last dim
    perm = qkv.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)         # H/W strides
    tab_t = table.t().contiguous().t()                                     # transposed table
    ref = eager_swin(qkv, table, 4, 2, 2)
    for x, t in ((wide, table), (perm, table), (qkv, tab_t)):
        assert not (x.is_contiguous() and t.is_contiguous())
        out = window_attention(x, t, window_size=4, shift_size=2, num_heads=2)
        assert rel_err(out, ref) < 1e-12


def test_custom_scale_and_empty_batch(csrc):
    qkv, table = make(1, 8, 4, 4, 1, 2, 20)
    out = window_attention(qkv, table, window_size=4, shift_size=1, num_heads=2, scale=0.37)
    assert rel_err(out, eager_swin(qkv, table, 4, 1, 2, 0.37)) < 1e-12
    empty = torch.zeros(0, 8, 4, 120, dtype=torch.float64)
    assert window_attention(empty, table, window_size=4, shift_size=1,
                            num_heads=2).shape == (0, 8, 4, 40)


def test_opcheck_raw_ops():
    qkv, table = make(1, 8, 4, 4, 2, 2, 8, torch.float32)
    table = table.float()
    ext = torch.ops.varformer_ext
    torch.library.opcheck(ext.window_attention_fwd.default, (qkv, table, 4, 2, 2, 0.3))
    out, lse = ext.window_attention_fwd(qkv, table, 4, 2, 2, 0.3)
    torch.library.opcheck(ext.window_attention_bwd.default,
                          (torch.randn_like(out), qkv, table, out, lse, 4, 2, 2, 0.3))


def test_opcheck_public_op(csrc):
    qkv, table = make(1, 8, 4, 4, 2, 2, 16, torch.float32)
    torch.library.opcheck(torch.ops.varformer.window_attention.default,
                          (qkv.requires_grad_(), table.float().requires_grad_(), 4, 2, 2, 0.25))


def test_window_over_16_falls_back_or_raises(monkeypatch):
    qkv, table = make(1, 17, 17, 17, 0, 1, 4)
    monkeypatch.setitem(wa.CPU_KERNEL, "value", "auto")
    out = window_attention(qkv, table, window_size=17, shift_size=0, num_heads=1)
    assert rel_err(out, eager_swin(qkv, table, 17, 0, 1)) < 1e-12
    monkeypatch.setitem(wa.CPU_KERNEL, "value", "csrc")
    with pytest.raises(ValueError, match="windows of up to 16x16"):
        window_attention(qkv, table, window_size=17, shift_size=0, num_heads=1)


def test_unavailable_kernel_falls_back_or_raises(monkeypatch):
    from varformer.ops import _ext
    monkeypatch.setattr(_ext, "cpu_status", lambda: (False, "no compiler (test)"))
    qkv, table = make(1, 8, 8, 4, 2, 2, 8)
    monkeypatch.setitem(wa.CPU_KERNEL, "value", "auto")
    out = window_attention(qkv, table, window_size=4, shift_size=2, num_heads=2)
    assert rel_err(out, eager_swin(qkv, table, 4, 2, 2)) < 1e-12
    monkeypatch.setitem(wa.CPU_KERNEL, "value", "csrc")
    with pytest.raises(RuntimeError, match="no compiler \\(test\\)"):
        window_attention(qkv, table, window_size=4, shift_size=2, num_heads=2)


def test_raw_op_bad_input_errors():
    ext = torch.ops.varformer_ext
    qkv, table = make(1, 8, 8, 4, 2, 2, 8, torch.float32)
    table = table.float()
    cases = [
        ((qkv[0], table, 4, 2, 2, 0.3), "qkv must be 4-D"),
        ((qkv.half(), table, 4, 2, 2, 0.3), "qkv must be float32 or float64"),
        ((qkv.transpose(1, 2), table, 4, 2, 2, 0.3), "qkv must be contiguous"),
        ((qkv, table, 4, 4, 2, 0.3), r"shift_size must be in \[0, 4\)"),
        ((qkv, table, 3, 1, 2, 0.3), "multiples of window_size=3"),
        ((qkv, table, 32, 1, 2, 0.3), r"window_size must be in \[1, 16\]"),
        ((qkv, table, 4, 2, 3, 0.3), "multiple of num_heads=3"),
        ((qkv, table[:10], 4, 2, 2, 0.3), r"rpb_table must have shape \[49, 2\]"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            ext.window_attention_fwd(*args)
    out, lse = ext.window_attention_fwd(qkv, table, 4, 2, 2, 0.3)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ext.window_attention_bwd(out[:, :4], qkv, table, out, lse, 4, 2, 2, 0.3)
    with pytest.raises(RuntimeError, match="lse dtype"):
        ext.window_attention_bwd(out, qkv, table, out, lse.double(), 4, 2, 2, 0.3)


def test_unknown_cpu_kernel_mode(monkeypatch):
    monkeypatch.setitem(wa.CPU_KERNEL, "value", "fast")
    qkv, table = make(1, 8, 8, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="CPU_KERNEL must be auto, csrc or chunked"):
        window_attention(qkv, table, window_size=4, shift_size=2, num_heads=2)


_VARIANT_SCRIPT = textwrap.dedent("""
    import importlib, torch
    from tests.ops.test_window_attention import eager_swin
    from tests.conftest import rel_err, run_with_isa
    from varformer.ops import window_attention
    wa = importlib.import_module("varformer.ops.window_attention")
    wa.CPU_KERNEL["value"] = "csrc"
    assert wa.cpu_kernel_status()[0]
    print("ISA", torch.ops.varformer_ext.window_attention_isa())
    for (B, H, W, ws, s, nh, hd) in [(3, 8, 12, 4, 2, 2, 20), (1, 14, 21, 7, 3, 3, 30),
                                     (1, 16, 8, 8, 4, 2, 40), (1, 4, 8, 4, 1, 1, 320)]:
        for dt in (torch.float64, torch.float32):
            g = torch.Generator().manual_seed(0)
            qkv = torch.randn(B, H, W, 3 * nh * hd, dtype=torch.float64, generator=g)
            table = torch.randn((2 * ws - 1) ** 2, nh, dtype=torch.float64, generator=g)
            q = qkv.to(dt).clone().requires_grad_()
            t = table.to(dt).clone().requires_grad_()
            out = window_attention(q, t, window_size=ws, shift_size=s, num_heads=nh)
            q64, t64 = qkv.clone().requires_grad_(), table.clone().requires_grad_()
            ref = eager_swin(q64, t64, ws, s, nh)
            out.sum().backward(); ref.sum().backward()
            tol = 1e-11 if dt == torch.float64 else 1e-5
            errs = [rel_err(out, ref), rel_err(q.grad, q64.grad), rel_err(t.grad, t64.grad)]
            assert max(errs) < tol, (B, H, W, ws, s, nh, hd, dt, errs)
    print("OK")
""")


@pytest.mark.parametrize("variant", ["avx512", "avx2", "baseline"])
def test_every_isa_variant(variant):
    flags = cpu_flags()
    if variant == "avx512" and "avx512bw" not in flags:
        pytest.skip("this CPU has no AVX-512")
    if variant == "avx2" and "avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    out = run_with_isa(_VARIANT_SCRIPT, variant)
    assert f"ISA {variant}" in out and "OK" in out
