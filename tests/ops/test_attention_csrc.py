"""The C++ CPU attention kernel (csrc/attention_cpu.cpp) behind the mediator-attention CPU path:
raw ops and the public op against float64 references at odd sizes (several query blocks and
key chunks, both backward partitions, N = 1, L = 1, head dims 1-320), gradients, determinism
across thread counts, every ISA variant, opcheck, fallbacks and bad input."""
import importlib
import textwrap

import pytest
import torch

from tests.conftest import cpu_flags, one_thread, rel_err, run_with_isa
from varformer.ops import mediator_attention, mediator_attention_reference

mam = importlib.import_module("varformer.ops.mediator_attention")
_OK, _WHY = mam.cpu_kernel_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"C++ kernel unavailable: {_WHY}")


@pytest.fixture
def csrc(monkeypatch):
    """Runs the CPU path on the C++ kernel (an error if it would fall back)."""
    monkeypatch.setenv("VARFORMER_BACKEND", "auto")
    monkeypatch.setitem(mam.CPU_KERNEL, "value", "csrc")


def attn64(q, k, v, scale):
    """float64 reference (out, lse), computed by torch on one thread (see conftest.one_thread)."""
    with one_thread():
        a = (q.double() @ k.double().mT) * scale
        return torch.softmax(a, -1) @ v.double(), a.logsumexp(-1)


def make3(G, Tq, Tk, d, dtype, seed=0, mag=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(G, T, d, dtype=torch.float64, generator=g) for T in (Tq, Tk, Tk))
    return (q * mag).to(dtype), (k * mag).to(dtype), v.to(dtype)


# (G, Tq, Tk, d): the kernel's tiles are 144 query rows x 256 keys: Tq and Tk below, at and above
# one and several tiles (odd remainders), more query blocks than key chunks and the reverse
# (the two backward partitions), G = 1 and G > 8 (one partition group per head), d 1..320
RAW_SHAPES = [
    (1, 1, 1, 1),
    (2, 5, 7, 20),
    (1, 145, 300, 40),
    (3, 200, 513, 80),
    (1, 256, 1030, 160),
    (1, 1000, 17, 33),
    (2, 700, 256, 160),
    (1, 300, 200, 320),
    (11, 30, 40, 16),
    (1, 1, 600, 20),
    (1, 500, 1, 20),
    # Tq <= 16 (the transposed few-rows forward): one chunk exactly, key-group partials, G > 8
    (2, 16, 256, 20),
    (1, 16, 1030, 160),
    (9, 13, 700, 33),
    (1, 17, 600, 20),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", RAW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_raw_ops_match_float64(shape, dtype):
    G, Tq, Tk, d = shape
    q, k, v = make3(*shape, dtype)
    scale = d ** -0.5
    out, lse = torch.ops.varformer_ext.attention_fwd(q, k, v, scale)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rl = attn64(*ref_in, scale)
    do = torch.randn(ro.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ro.backward(do)
    grads = torch.ops.varformer_ext.attention_bwd(do.to(dtype), q, k, v, out, lse, scale)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert out.dtype == lse.dtype == dtype
    assert rel_err(out, ro) < tol and rel_err(lse, rl) < tol
    floor = do.norm().item()       # Tk = 1: dq = 0 analytically (fp32: cancellation noise)
    for name, g, r in zip("qkv", grads, ref_in):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert ((g.double() - r.grad).norm() / max(r.grad.norm().item(), floor)).item() < tol, name


def test_large_scores_stay_finite():
    q, k, v = make3(1, 130, 300, 20, torch.float32, mag=30.0)
    out, lse = torch.ops.varformer_ext.attention_fwd(q, k, v, 1.0)
    ro, rl = attn64(q, k, v, 1.0)
    assert torch.isfinite(out).all() and rel_err(out, ro) < 1e-5 and rel_err(lse, rl) < 1e-5


# (B, H, N, L, Nk, d): VarFormer's shape classes scaled down, N = 1, L = 1, N < L, B*H > 8
SHAPES = [
    (1, 1, 390, 40, 390, 160),
    (2, 1, 300, 7, 520, 20),
    (1, 1, 1, 5, 61, 40),
    (2, 3, 33, 1, 45, 32),
    (1, 1, 17, 300, 70, 80),
    (1, 1, 13, 6, 41, 320),
    (3, 4, 25, 7, 19, 20),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_public_op_matches_float64_reference(csrc, shape, dtype):
    B, H, N, L, Nk, d = shape
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(B, H, T, d, dtype=torch.float64, generator=g) for T in (N, L, Nk, Nk)]
    q, m, k, v = (t.to(dtype).requires_grad_() for t in ts)
    out, summary, _, _ = torch.ops.varformer.mediator_attention(q, m, k, v, d ** -0.5)
    g_out, g_sum = torch.randn_like(out), torch.randn_like(summary)
    (out * g_out).sum().add_((summary * g_sum).sum()).backward()
    ref = [t.detach().clone().requires_grad_() for t in ts]
    s_ref = torch.softmax(ref[1] @ ref[2].mT * d ** -0.5, -1) @ ref[3]
    o_ref = torch.softmax(ref[0] @ ref[1].mT * d ** -0.5, -1) @ s_ref
    (o_ref * g_out.double()).sum().add_((s_ref * g_sum.double()).sum()).backward()
    tol = 1e-11 if dtype == torch.float64 else 3e-5
    assert rel_err(out, o_ref) < tol and rel_err(summary, s_ref) < tol
    floor = g_out.double().norm().item()     # L = 1: dq = 0 analytically (fp32: rounding noise)
    for name, t, r in zip("qmkv", (q, m, k, v), ref):
        err = ((t.grad.double() - r.grad).norm() / max(r.grad.norm().item(), floor)).item()
        assert err < tol, name


def test_gradcheck(csrc):
    q, m, k, v = (torch.randn(1, 2, T, 5, dtype=torch.float64, requires_grad=True)
                  for T in (7, 3, 9, 9))
    assert torch.autograd.gradcheck(mediator_attention, (q, m, k, v), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("L", [30, 16])
def test_results_do_not_depend_on_the_thread_count(csrc, L):
    """Partial sums have a fixed order: bitwise-equal outputs and gradients at 1 and 2 threads
    (L = 16: the few-rows forward of stage 1, with key-group partials)."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, T, 40, generator=g) for T in (500, L, 700, 700)]
    n0, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            ts = [t.clone().requires_grad_() for t in base]
            out = mediator_attention(*ts)
            out.square().sum().backward()
            runs.append([out.detach()] + [t.grad for t in ts])
    finally:
        torch.set_num_threads(n0)
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))


def test_matches_flash_path_and_keeps_caller_state(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, T, 20, generator=g) for T in (300, 9, 400, 400)]
    res = {}
    tiny = torch.tensor([1e-38])
    n0 = torch.get_num_threads()
    for mode in ("csrc", "flash"):
        monkeypatch.setitem(mam.CPU_KERNEL, "value", mode)
        ts = [t.clone().requires_grad_() for t in base]
        out = mediator_attention(*ts)
        out.square().sum().backward()
        res[mode] = [out] + [t.grad for t in ts]
    for a, b in zip(res["csrc"], res["flash"]):
        assert rel_err(a, b.double()) < 2e-5
    assert (tiny / 100).item() != 0.0 and torch.get_num_threads() == n0   # FTZ only in workers


def test_auto_mode_choice(monkeypatch):
    """auto: the kernel for float32/float64 where it has a register tile (AVX2, AVX-512); flash
    for half dtypes, the portable variant and a failed build."""
    from varformer.ops import _ext
    monkeypatch.setitem(mam.CPU_KERNEL, "value", "auto")
    for isa in ("avx2", "avx512"):
        monkeypatch.setattr(mam, "_kernel_isa", lambda isa=isa: isa)
        assert mam._use_csrc(torch.float32) and mam._use_csrc(torch.float64)
        assert not mam._use_csrc(torch.float16) and not mam._use_csrc(torch.bfloat16)
    monkeypatch.setattr(mam, "_kernel_isa", lambda: "baseline")
    assert not mam._use_csrc(torch.float32)
    monkeypatch.setattr(mam, "_kernel_isa", lambda: "avx512")
    monkeypatch.setattr(_ext, "cpu_status", lambda: (False, "no compiler (test)"))
    assert not mam._use_csrc(torch.float32)
    monkeypatch.setitem(mam.CPU_KERNEL, "value", "csrc")
    with pytest.raises(RuntimeError, match="no compiler \\(test\\)"):
        mam._use_csrc(torch.float32)
    monkeypatch.setitem(mam.CPU_KERNEL, "value", "fast")
    with pytest.raises(ValueError, match="CPU_KERNEL must be auto, csrc or flash"):
        mam._use_csrc(torch.float32)


def test_opcheck_raw_ops():
    q, k, v = make3(2, 30, 40, 16, torch.float32)
    ext = torch.ops.varformer_ext
    torch.library.opcheck(ext.attention_fwd.default, (q, k, v, 0.3))
    out, lse = ext.attention_fwd(q, k, v, 0.3)
    torch.library.opcheck(ext.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, 0.3))


def test_opcheck_public_op(csrc):
    q, m, k, v = (torch.randn(1, 2, T, 20, requires_grad=True) for T in (33, 5, 47, 47))
    torch.library.opcheck(torch.ops.varformer.mediator_attention.default, (q, m, k, v, 0.2))


def test_raw_op_bad_input_errors():
    ext = torch.ops.varformer_ext
    q, k, v = make3(2, 30, 40, 16, torch.float32)
    cases = [
        ((q[0], k, v, 0.3), "q must be 3-D"),
        ((q, k[0], v, 0.3), "k must be 3-D"),
        ((q.half(), k.half(), v.half(), 0.3), "q must be float32 or float64"),
        ((q, k.double(), v, 0.3), "k dtype Double differs from q's Float"),
        ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 0.3), "q must be contiguous"),
        ((q, k[:, :, :8].contiguous(), v, 0.3), r"k must have shape \[2, 40, 16\]"),
        ((q, k, v[:, :39].contiguous(), 0.3), r"v must have shape \[2, 40, 16\]"),
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0], 0.3), "head dim d and key count Tk"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            ext.attention_fwd(*args)
    out, lse = ext.attention_fwd(q, k, v, 0.3)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ext.attention_bwd(out[:, :4].contiguous(), q, k, v, out, lse, 0.3)
    with pytest.raises(RuntimeError, match="lse dtype Double differs"):
        ext.attention_bwd(out, q, k, v, out, lse.double(), 0.3)


_VARIANT_SCRIPT = textwrap.dedent("""
    import torch
    from varformer.ops import _ext
    assert _ext.cpu_status()[0]
    print("ISA", torch.ops.varformer_ext.attention_isa())
    from tests.conftest import one_thread
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    # several tiles of every register-tile edge: rows not multiples of 6 or 12, columns of
    # 16 / 32 with remainders, both backward partitions
    for (G, Tq, Tk, d) in [(1, 200, 600, 40), (2, 300, 100, 20), (1, 50, 70, 160),
                           (3, 157, 291, 57), (2, 16, 600, 57), (1, 5, 300, 40)]:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(G, T, d, dtype=torch.float64, generator=g, requires_grad=True)
                   for T in (Tq, Tk, Tk))
        with one_thread():                # the float64 reference on one thread
            a = (q @ k.mT) * 0.2
            ref, rl = torch.softmax(a, -1) @ v, a.logsumexp(-1)
            dout = torch.randn(ref.shape, dtype=torch.float64, generator=g)
            rq, rk, rv = torch.autograd.grad(ref, (q, k, v), dout)
        q, k, v, ref, rl = (t.detach() for t in (q, k, v, ref, rl))
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
            o, l = torch.ops.varformer_ext.attention_fwd(q.to(dt), k.to(dt), v.to(dt), 0.2)
            assert max(rel(o, ref), rel(l, rl)) < tol, (G, Tq, Tk, d, dt, rel(o, ref), rel(l, rl))
            grads = torch.ops.varformer_ext.attention_bwd(dout.to(dt), q.to(dt), k.to(dt),
                                                          v.to(dt), o, l, 0.2)
            for x, r in zip(grads, (rq, rk, rv)):
                assert rel(x, r) < 5 * tol, (G, Tq, Tk, d, dt, rel(x, r))
    print("OK")
""")


@pytest.mark.parametrize("variant", ["avx512", "avx2", "baseline"])
def test_every_isa_variant(variant):
    """Each register-tile variant against float64 (forward and backward), in a fresh process
    with VARFORMER_CPU_ISA set; a variant this CPU cannot run is skipped."""
    flags = cpu_flags()
    need = {"avx512": {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"},
            "avx2": {"avx2", "fma"}, "baseline": set()}[variant]
    if not need <= flags:
        pytest.skip(f"this CPU lacks {sorted(need - flags)}")
    out = run_with_isa(_VARIANT_SCRIPT, variant)
    assert f"ISA {variant}" in out and "OK" in out
