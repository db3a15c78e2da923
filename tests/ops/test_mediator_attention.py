"""mediator_attention: every path against a float64 reference, gradients, registration, errors."""
import pytest
import torch

from tests.conftest import DEVICE, ON_GPU, TOL, one_thread, rel_err, triton_usable
import varformer.ops as vo
from varformer.ops import mediator_attention, mediator_attention_reference

BACKENDS = ["reference", "auto", "triton"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def make(B, H, N, L, Nk, d, dtype, mag=1.0, device=DEVICE, grad=False):
    ts = [torch.randn(B, H, T, d, dtype=torch.float64, device=device) * mag
          for T in (N, L, Nk, Nk)]
    ts[3] = ts[3] / mag  # values at unit scale
    return [t.to(dtype).requires_grad_(grad) for t in ts]


@one_thread()                 # float64 reference: torch on one thread (conftest)
def reference64(q, m, k, v, scale=None):
    return mediator_attention_reference(*(t.detach().double() for t in (q, m, k, v)), scale)


# (B, H, N, L, Nk, d): N, Nk off block multiples; L in {1, 16, 64, 1024}; d in {20,...,320}
SHAPES = [
    (1, 1, 70, 16, 90, 20),
    (2, 3, 33, 1, 45, 32),
    (1, 2, 65, 64, 129, 64),
    (2, 1, 50, 24, 77, 160),
    (1, 1, 20, 8, 40, 320),
    (1, 1, 17, 1024, 70, 20),
    (3, 4, 40, 5, 31, 40),
    (1, 2, 21, 9, 37, 80),
    (8, 8, 9, 3, 11, 16),   # B·H = 64
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_matches_float64_reference(backend, dtype, shape):
    q, m, k, v = make(*shape, dtype)
    out = mediator_attention(q, m, k, v)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert rel_err(out, reference64(q, m, k, v)) < TOL[dtype][0]


@pytest.mark.parametrize("backend", ["reference", "auto"], indirect=True)
def test_float64_paths(backend):
    q, m, k, v = make(2, 2, 37, 9, 51, 20, torch.float64, device="cpu")
    assert rel_err(mediator_attention(q, m, k, v, scale=0.37), reference64(q, m, k, v, 0.37)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 70, 16, 90, 20), (2, 1, 45, 64, 100, 160),
                                   (1, 2, 33, 7, 65, 40), (1, 1, 12, 5, 20, 320),
                                   (2, 1, 19, 6, 40, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_float64_reference(backend, dtype, shape):
    q, m, k, v = make(*shape, dtype, grad=True)
    out = mediator_attention(q, m, k, v)
    g = torch.randn_like(out)
    out.backward(g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, m, k, v)]
    mediator_attention_reference(*ref_in).backward(g.double())
    for name, t, r in zip("qmkv", (q, m, k, v), ref_in):
        assert t.grad is not None and t.grad.dtype == dtype, name
        assert rel_err(t.grad, r.grad) < TOL[dtype][1], name


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_magnitude_is_stable(backend):
    """Scores of several hundred: softmax must subtract the max (no inf/NaN)."""
    q, m, k, v = make(1, 2, 40, 12, 70, 32, torch.float32, mag=6.0, grad=True)
    out = mediator_attention(q, m, k, v)
    ref = reference64(q, m, k, v)
    assert rel_err(out, ref) < 1e-4
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, m, k, v))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_summary_output_and_its_gradient(backend):
    """The registered op also returns S = softmax(m kᵀ s) v; a loss on S back-propagates."""
    q, m, k, v = make(1, 1, 30, 6, 50, 20, torch.float32, grad=True)
    out, summary, lse_s, lse_o = torch.ops.varformer.mediator_attention(q, m, k, v, 0.3)
    (out.square().sum() + (summary * 3).sum()).backward()
    ref_in = [t.detach().double().requires_grad_() for t in (q, m, k, v)]
    qq, mm, kk, vv = ref_in
    s_ref = torch.softmax(mm @ kk.mT * 0.3, -1) @ vv
    o_ref = torch.softmax(qq @ mm.mT * 0.3, -1) @ s_ref
    (o_ref.square().sum() + (s_ref * 3).sum()).backward()
    assert rel_err(summary, s_ref) < 1e-5
    assert rel_err(lse_s, (mm @ kk.mT * 0.3).logsumexp(-1)) < 1e-5
    assert rel_err(lse_o, (qq @ mm.mT * 0.3).logsumexp(-1)) < 1e-5
    for t, r in zip((q, m, k, v), ref_in):
        assert rel_err(t.grad, r.grad) < 1e-4


@pytest.mark.skipif(not triton_usable(), reason="Triton unusable here")
@pytest.mark.parametrize("splits,d", [(1, 32), (2, 32), (5, 32), (5, 160)]
                         + ([(1, 160), (2, 160)] if ON_GPU else []))
def test_triton_split_paths(splits, d):
    """Split-KV forward (combine kernel) and split backward partials, forced. d = 160 (the
    two-piece head tiles) at smaller sizes and one split count under the interpreter (each of
    its cases took 35-60 s on a 2-core CPU)."""
    from varformer.kernels import mediator_attention as kern
    N, L, Nk = (130, 70, 300) if d == 32 or ON_GPU else (70, 40, 150)
    q, m, k, v = make(1, 1, N, L, Nk, d, torch.float32)
    s = d ** -0.5
    out, summ, lse_s, lse_o = kern.mediator_attention_forward(q, m, k, v, s, num_splits=splits)
    assert rel_err(out, reference64(q, m, k, v)) < 2e-5
    g = torch.randn_like(out)
    grads = kern.mediator_attention_backward(g, None, q, m, k, v, out, summ, lse_s, lse_o, s,
                                             num_splits=splits)
    ref_in = [t.detach().double().requires_grad_() for t in (q, m, k, v)]
    mediator_attention_reference(*ref_in).backward(g.double())
    for t, r in zip(grads, ref_in):
        assert rel_err(t, r.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_non_contiguous_inputs(backend):
    """Strides are honoured: transposed and sliced views give the contiguous result."""
    q0, m0, k0, v0 = make(2, 3, 40, 8, 50, 32, torch.float32)
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)      # head-interleaved layout
    m = torch.cat([m0, m0], dim=-1)[..., :32]                 # row stride 64
    k = k0.mT.contiguous().mT                                 # d-major
    out = mediator_attention(q, m, k, v0)
    assert rel_err(out, reference64(q0, m0, k0, v0)) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_batch_and_queries(backend):
    q, m, k, v = make(0, 2, 10, 4, 12, 20, torch.float32)
    assert mediator_attention(q, m, k, v).shape == (0, 2, 10, 20)
    q, m, k, v = make(1, 2, 0, 4, 12, 20, torch.float32, grad=True)
    out = mediator_attention(q, m, k, v)
    assert out.shape == (1, 2, 0, 20)
    out.sum().backward()
    assert m.grad.abs().sum() == 0


# ---------------------------------------------------------------------------- CPU unit path
# The CPU path cuts each stage into units run by worker threads; the shapes above are small
# enough to take its one-call inline branch, so these tests force the units on small shapes.
import importlib  # noqa: E402

_mam = importlib.import_module("varformer.ops.mediator_attention")


@pytest.fixture
def cpu_units(monkeypatch):
    """Worker threads for every call; query blocks of >= 4 rows, key chunks of >= 8 keys; the
    flash path even where the C++ kernel would run (tests/ops/test_attention_csrc.py tests it)."""
    monkeypatch.setitem(_mam.CPU_KERNEL, "value", "flash")
    monkeypatch.setattr(_mam, "CPU_INLINE_FLOPS", 0)
    monkeypatch.setattr(_mam, "CPU_UNIT_ROWS", 4)
    monkeypatch.setattr(_mam, "CPU_UNIT_KEYS", 8)
    monkeypatch.setenv("VARFORMER_BACKEND", "auto")


def _err(a, b, floor):
    """Relative error; `floor` stands in for |b| where b is ~0 analytically (L = 1 gives dq = 0)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in result"
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


# (B, H, N, L, Nk, d): stage 1 in key chunks (L < Nk), stage 2 in query blocks, heads split
# when B*H >= 8 units; N = 1, L = 1, N < L; head dims 20..320
UNIT_SHAPES = [
    (1, 1, 70, 16, 90, 20),
    (1, 1, 1, 5, 61, 40),
    (2, 3, 33, 1, 45, 32),
    (1, 1, 17, 100, 70, 80),
    (1, 2, 45, 9, 130, 160),
    (1, 1, 13, 6, 41, 320),
    (3, 4, 25, 7, 19, 20),    # B*H = 12 >= 8: units are head ranges
]


@pytest.mark.skipif(ON_GPU, reason="CPU path")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", UNIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_units_match_float64_reference(cpu_units, dtype, shape):
    B, H, N, L, Nk, d = shape
    q, m, k, v = make(*shape, dtype, grad=True)
    out, summary, lse_s, lse_o = torch.ops.varformer.mediator_attention(q, m, k, v, d ** -0.5)
    g_out, g_sum = torch.randn_like(out), torch.randn_like(summary)
    (out * g_out).sum().add_((summary * g_sum).sum()).backward()
    ref_in = [t.detach().double().requires_grad_() for t in (q, m, k, v)]
    qq, mm, kk, vv = ref_in
    a1, a2 = mm @ kk.mT * d ** -0.5, qq @ mm.mT * d ** -0.5
    s_ref = torch.softmax(a1, -1) @ vv
    o_ref = torch.softmax(a2, -1) @ s_ref
    (o_ref * g_out.double()).sum().add_((s_ref * g_sum.double()).sum()).backward()
    tol_f, tol_b = TOL[dtype]
    assert out.dtype == summary.dtype == dtype
    assert rel_err(out, o_ref) < tol_f and rel_err(summary, s_ref) < tol_f
    assert rel_err(lse_s, a1.logsumexp(-1)) < tol_f and rel_err(lse_o, a2.logsumexp(-1)) < tol_f
    floor = 1e-3 * g_out.double().norm().item()
    for name, t, r in zip("qmkv", (q, m, k, v), ref_in):
        assert t.grad.dtype == dtype and t.grad.shape == t.shape, name
        assert _err(t.grad, r.grad, floor) < tol_b, name


@pytest.mark.skipif(ON_GPU, reason="CPU path")
def test_cpu_units_cover_every_split(cpu_units):
    """The plans behind UNIT_SHAPES: key chunks, query blocks and head ranges all occur."""
    seen = set()
    for B, H, N, L, Nk, d in UNIT_SHAPES:
        for Tq, Tk in ((L, Nk), (N, L)):
            heads, qr, kr = _mam._cpu_plan(B * H, Tq, Tk, workers=2)
            seen |= {"keys"} if len(kr) > 1 else set()
            seen |= {"queries"} if len(qr) > 1 else set()
            seen |= {"heads"} if any(g1 - g0 > 1 for g0, g1 in heads) else set()
            covered = [(g, a, c) for g in range(B * H) for a in range(Tq) for c in range(Tk)]
            n_units = sum((g1 - g0) * (a1 - a0) * (c1 - c0) for g0, g1 in heads
                          for a0, a1 in qr for c0, c1 in kr)
            assert n_units == len(covered)   # the units tile the problem exactly once
    assert seen == {"keys", "queries", "heads"}


@pytest.mark.skipif(ON_GPU, reason="CPU path")
def test_backward_threads_follow_the_machine_load(cpu_units, monkeypatch):
    """On a busy machine the backward runs on the CPUs left free (one here), the forward keeps
    torch's threads; the gradients are those of float64 autograd either way."""
    from varformer.ops import _ext
    monkeypatch.setattr(_ext, "load_aware_threads", lambda want=None: 1)
    assert _mam._cpu_workers() == max(1, torch.get_num_threads())
    assert _mam._cpu_workers(backward=True) == 1
    seen = []
    real = _mam._run_units
    monkeypatch.setattr(_mam, "_run_units", lambda n, fn, w: (seen.append(w), real(n, fn, w))[1])
    q, m, k, v = make(1, 2, 50, 9, 80, 20, torch.float64, grad=True)
    out = mediator_attention(q, m, k, v)
    g = torch.randn_like(out)
    n_fwd = len(seen)
    (out * g).sum().backward()
    assert seen[n_fwd:] and all(w == 1 for w in seen[n_fwd:])
    ref = [t.detach().clone().requires_grad_() for t in (q, m, k, v)]
    (mediator_attention_reference(*ref) * g).sum().backward()
    for t, r in zip((q, m, k, v), ref):
        assert rel_err(t.grad, r.grad) < 1e-10


@pytest.mark.skipif(ON_GPU, reason="CPU path")
@pytest.mark.parametrize("workers", [1, 3])
def test_cpu_units_deterministic_and_thread_count_kept(cpu_units, monkeypatch, workers):
    monkeypatch.setattr(_mam, "_cpu_workers", lambda backward=False: workers)
    q, m, k, v = make(1, 2, 50, 9, 80, 20, torch.float32, grad=True)
    before = torch.get_num_threads()
    runs = []
    for _ in range(2):
        out = mediator_attention(q, m, k, v)
        out.square().sum().backward()
        runs.append([out.detach().clone()] + [t.grad.clone() for t in (q, m, k, v)])
        for t in (q, m, k, v):
            t.grad = None
    assert torch.get_num_threads() == before
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert rel_err(runs[0][0], reference64(q, m, k, v)) < 2e-5


@pytest.mark.skipif(ON_GPU, reason="CPU path")
def test_cpu_units_keep_callers_denormals_and_modes(cpu_units):
    """Workers flush denormals in their own threads only; inference mode carries over."""
    tiny = torch.tensor([1e-38], dtype=torch.float32)
    q, m, k, v = make(1, 1, 40, 6, 50, 20, torch.float32, mag=8.0)
    with torch.inference_mode():
        out = mediator_attention(q, m, k, v)
    assert out.is_inference() and rel_err(out, reference64(q, m, k, v)) < 2e-5
    assert (tiny / 100).item() != 0.0            # the caller still computes denormals
    assert torch.is_grad_enabled()


@pytest.mark.skipif(ON_GPU, reason="CPU path")
def test_cpu_units_reraise_worker_errors(cpu_units, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("unit failed on purpose")
    monkeypatch.setattr(_mam, "_SDPA", failing)
    q, m, k, v = make(1, 1, 30, 5, 40, 20, torch.float32)
    with pytest.raises(RuntimeError, match="unit failed on purpose"):
        mediator_attention(q, m, k, v)
    assert calls and torch.get_num_threads() >= 1


# ---------------------------------------------------------------------------- registration
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_opcheck(backend):
    q, m, k, v = make(1, 2, 33, 5, 47, 20, torch.float32, grad=True)
    torch.library.opcheck(torch.ops.varformer.mediator_attention.default, (q, m, k, v, 0.2))


def test_fake_and_meta_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, m, k, v = (torch.empty(2, 3, n, 40) for n in (50, 8, 70, 70))
        out, s, l1, l2 = torch.ops.varformer.mediator_attention(q, m, k, v, 0.1)
    assert out.shape == (2, 3, 50, 40) and s.shape == (2, 3, 8, 40)
    assert l1.shape == (2, 3, 8) and l2.shape == (2, 3, 50) and l1.dtype == torch.float32
    q, m, k, v = (torch.empty(2, 3, n, 40, device="meta") for n in (50, 8, 70, 70))
    assert mediator_attention(q, m, k, v).shape == (2, 3, 50, 40)


@pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
def test_torch_compile_fullgraph_dynamic(backend):
    torch._dynamo.reset()

    def f(q, m, k, v):
        return mediator_attention(q * 1.5, m, k, v).sin()

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for shape in [(1, 2, 30, 6, 40, 20), (2, 2, 45, 9, 33, 20)]:
        q, m, k, v = make(*shape, torch.float32, grad=True)
        out = cf(q, m, k, v)
        ref_in = [t.detach().clone().requires_grad_() for t in (q, m, k, v)]
        ref = f(*ref_in)
        assert rel_err(out, ref) < 1e-5
        out.sum().backward()
        ref.sum().backward()
        for t, r in zip((q, m, k, v), ref_in):
            assert rel_err(t.grad, r.grad) < 1e-5


# ---------------------------------------------------------------------------- dispatch
def test_backends_report_and_dispatch(monkeypatch):
    info = vo.backends()
    for name in ("triton-cuda", "triton-cpu", "cpu-fused", "reference"):
        assert set(info[name]) == {"available", "reason"}
        assert info[name]["available"] or info[name]["reason"]
    from varformer.ops import _dispatch
    x = torch.empty(1)
    monkeypatch.setenv("VARFORMER_BACKEND", "reference")
    assert _dispatch.select("op", x) == "reference"
    monkeypatch.setenv("VARFORMER_BACKEND", "auto")
    assert _dispatch.select("op", x) == "cpu"
    monkeypatch.setenv("VARFORMER_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VARFORMER_BACKEND"):
        _dispatch.select("op", x)
    monkeypatch.setenv("VARFORMER_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _dispatch.select("op", x)


@pytest.mark.skipif(not triton_usable(), reason="Triton unusable here")
def test_triton_rejects_float64(monkeypatch):
    monkeypatch.setenv("VARFORMER_BACKEND", "triton")
    q, m, k, v = make(1, 1, 8, 2, 8, 16, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        mediator_attention(q, m, k, v)


def test_import_without_triton(tmp_path):
    """`import varformer.ops` works when triton is missing; Triton reports itself unavailable."""
    import subprocess
    import sys
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, varformer.ops as vo\n"
        "info = vo.backends()\n"
        "assert not info['triton-cpu']['available'] and 'triton' in info['triton-cpu']['reason']\n"
        "q = torch.randn(1, 1, 9, 16); out = vo.mediator_attention(q, q[:, :, :3], q, q)\n"
        "assert torch.allclose(out, vo.mediator_attention_reference(q, q[:, :, :3], q, q), atol=1e-5)\n"
        "print('ok')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "VARFORMER_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ---------------------------------------------------------------------------- bad input
def _good():
    return make(1, 2, 10, 4, 12, 16, torch.float32)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, m, k, v: (q[0], m, k, v), ValueError, r"q must have 4 dims"),
    (lambda q, m, k, v: (q.tolist(), m, k, v), TypeError, r"q must be a torch.Tensor"),
    (lambda q, m, k, v: (q, m.half(), k, v), TypeError, r"m is torch.float16 but q"),
    (lambda q, m, k, v: (q.int(), m, k, v), TypeError, r"q must be float32"),
    (lambda q, m, k, v: (q, m, k, v[:, :, :5]), ValueError, r"key and value lengths"),
    (lambda q, m, k, v: (q, m[..., :8], k, v), ValueError, r"head dims"),
    (lambda q, m, k, v: (q, m[:, :1], k, v), ValueError, r"head counts"),
    (lambda q, m, k, v: (q, m.expand(3, -1, -1, -1), k, v), ValueError, r"batch sizes"),
    (lambda q, m, k, v: (q, m[:, :, :0], k, v), ValueError, r"mediator count L"),
    (lambda q, m, k, v: (q, m, k[:, :, :0], v[:, :, :0]), ValueError, r"key count Nk"),
    (lambda q, m, k, v: (q, m, k, v.to("meta")), ValueError, r"v is on meta"),
])
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    with pytest.raises(exc, match=match):
        mediator_attention(*mutate(*_good()))


@pytest.mark.parametrize("scale, exc", [(float("nan"), ValueError), (0.0, ValueError),
                                        ("0.1", TypeError), (True, TypeError)])
def test_bad_scale(scale, exc):
    with pytest.raises(exc, match="scale"):
        mediator_attention(*_good(), scale=scale)


@pytest.mark.skipif(not triton_usable(), reason="Triton unusable here")
def test_triton_limits(monkeypatch):
    from varformer.kernels.mediator_attention import MAX_HEAD_DIM
    from varformer.ops.mediator_attention import TRITON_MAX_HEAD_DIM
    assert MAX_HEAD_DIM == TRITON_MAX_HEAD_DIM
    monkeypatch.setenv("VARFORMER_BACKEND", "triton")
    q, m, k, v = make(1, 1, 4, 2, 4, 641, torch.float32)
    with pytest.raises(ValueError, match="head dims up to 640"):
        mediator_attention(q, m, k, v)


def test_triton_path_rejects_int32_overflow_and_grid_limits(monkeypatch):
    """Checked before any kernel runs (meta tensors: no memory is allocated)."""
    monkeypatch.setenv("VARFORMER_BACKEND", "triton")
    big = torch.empty(1, 1, 2**27, 32, device="meta")          # 2^32 elements in one slice
    small = torch.empty(1, 1, 8, 32, device="meta")
    with pytest.raises(ValueError, match="int32"):
        mediator_attention(small, small, big, big)
    wide = torch.empty(300, 300, 8, 32, device="meta")
    with pytest.raises(ValueError, match="65535"):
        mediator_attention(wide, wide, wide, wide)
