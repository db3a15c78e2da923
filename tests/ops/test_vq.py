"""vq_lookup / vq_area_lookup on every path against float64 brute force.

Argmin-type results are checked by distance (the returned code is within a tolerance of the
true minimum) and by index only where the answer is unambiguous (well-separated codebooks,
exact ties)."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEVICE, triton_usable
from varformer.ops import _ext, vq_area_lookup, vq_lookup, vq_lookup_eager

# "csrc@<isa>": the C++ CPU op on that inner-kernel variant ("csrc" alone: the widest one)
PATHS = ["reference", "csrc", "triton"] + ([] if DEVICE == "cuda" else ["csrc@avx2",
                                                                        "csrc@baseline"])
# relative tolerance on distances, scaled by |z|² + max|e|² (fp32 arithmetic on every path
# for fp32/fp16/bf16 inputs)
DIST_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


@pytest.fixture(autouse=True)
def _cpu_isa(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    path = callspec.params.get("path") if callspec else None
    if isinstance(path, str) and "@" in path:
        monkeypatch.setenv("VARFORMER_CPU_ISA", path.split("@", 1)[1])


def _usable(path):
    """Skips where the path cannot run here; returns the backend name to pass."""
    if path == "triton" and not triton_usable():
        pytest.skip("Triton unusable here")
    if path.startswith("csrc"):
        ok, why = _ext.cuda_status() if DEVICE == "cuda" else _ext.cpu_status()
        if not ok:
            pytest.skip(f"C++ extension unavailable: {why}")
    if "@" in path:
        why = _ext.cpu_isa_table().get(path.split("@", 1)[1], "not compiled")
        if why:
            pytest.skip(f"{path}: {why}")
        return "csrc"
    return path


def brute(z, E):
    """float64 distances [N, V] of the inputs' values."""
    z, E = z.double(), E.double()
    return (z.square().sum(1, keepdim=True) + E.square().sum(1)) - 2 * z @ E.T


def check_near_min(z, E, idx, dist=None, dtype=torch.float32):
    d = brute(z, E)
    scale = z.double().square().sum(1) + E.double().square().sum(1).max()
    tol = DIST_TOL[dtype] * scale + 1e-30
    chosen = d.gather(1, idx.long()[:, None]).squeeze(1)
    gap = chosen - d.min(1).values
    assert (gap <= tol).all(), f"worst gap {(gap / scale).max().item():.3e} (relative)"
    if dist is not None:      # the reported distance is that of the returned code
        assert ((dist.double() - chosen).abs() <= tol).all()


SIZES = [(1, 1, 8), (1, 7, 32), (2, 4096, 32), (7, 7, 64), (37, 300, 8), (130, 4096, 64),
         (300, 16384, 32)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,V,C", SIZES)
def test_lookup_near_minimum_fp32(path, N, V, C):
    path = _usable(path)
    if path == "triton" and N * V > 2_000_000:
        pytest.skip("too slow for the Triton interpreter")
    z = torch.randn(N, C, device=DEVICE)
    E = torch.randn(V, C, device=DEVICE)
    idx, codes, dist = vq_lookup(z, E, return_codes=True, return_distance=True, backend=path)
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert dist.dtype == torch.float32 and codes.shape == (N, C)
    check_near_min(z, E, idx, dist)
    assert torch.equal(codes, E[idx])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_lookup_dtypes(path, dtype):
    path = _usable(path)
    if path == "triton" and dtype == torch.float64:
        with pytest.raises(TypeError, match="float64"):
            vq_lookup(torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype),
                      backend=path)
        return
    if path == "csrc" and DEVICE == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA C++ path takes fp32 distances only")
    z = torch.randn(91, 32, device=DEVICE).to(dtype)
    E = torch.randn(500, 32, device=DEVICE).to(dtype)
    idx, codes, dist = vq_lookup(z, E, return_codes=True, return_distance=True, backend=path)
    assert dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert codes.dtype == dtype and torch.equal(codes, E[idx])
    check_near_min(z, E, idx, dist, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_large_n(path):
    path = _usable(path)
    N = 100_000 if path != "triton" else 3000
    z = torch.randn(N, 32, device=DEVICE)
    E = torch.randn(4096, 32, device=DEVICE)
    idx = vq_lookup(z, E, backend=path)
    sub = torch.randperm(N, device=DEVICE)[:2000]
    check_near_min(z[sub], E, idx[sub])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("V", [7, 4096])
def test_well_separated_exact(path, V):
    path = _usable(path)
    C = 8
    g = torch.Generator().manual_seed(1)
    E = torch.unique(torch.randint(-40, 40, (2 * V, C), generator=g), dim=0).float() * 4
    E = E[torch.randperm(len(E), generator=g)[:V]]
    keep = torch.cdist(E.double(), E.double()).add_(torch.eye(len(E), dtype=torch.float64) * 1e9)
    assert keep.min() >= 4
    target = torch.randint(0, len(E), (257,), generator=g)
    z = E[target] + (torch.rand(257, C, generator=g) - 0.5) * 0.5
    idx = vq_lookup(z.to(DEVICE), E.to(DEVICE), backend=path)
    assert torch.equal(idx.cpu(), target)
    assert torch.equal(idx.cpu(), vq_lookup_eager(z, E))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("splits", [None, 4])
def test_exact_ties_lowest_index(path, splits):
    path = _usable(path)
    V, C = 4096, 32
    E = torch.randn(V, C)
    for j in (300, 4095, 37):          # copies later than (and across tiles from) row 5
        E[j] = E[5]
    E[2000] = E[1999]
    z = torch.cat([E[[5, 300, 4095, 37]], E[[2000, 1999]], torch.randn(50, C)])
    z, E = z.to(DEVICE), E.to(DEVICE)
    if path == "triton" and splits:
        from varformer.ops.vq import _lookup_triton
        idx = _lookup_triton(z, E, None, False, "ieee", splits=splits)[0]
    else:
        idx = vq_lookup(z, E, backend=path)
    assert idx[:4].tolist() == [5, 5, 5, 5]
    assert idx[4:6].tolist() == [1999, 1999]
    assert not set(idx[6:].tolist()) & {300, 4095, 37, 2000}
    check_near_min(z, E, idx)


@pytest.mark.parametrize("path", ["triton"])
@pytest.mark.parametrize("N,V,C,splits", [(1, 4096, 32, 8), (5, 300, 64, 3), (40, 999, 8, 7),
                                          (17, 7, 32, 5)])
def test_triton_split_codebook(path, N, V, C, splits):
    path = _usable(path)
    from varformer.ops.vq import _lookup_triton
    z, E = torch.randn(N, C, device=DEVICE), torch.randn(V, C, device=DEVICE)
    idx, dist, codes = _lookup_triton(z, E, None, True, "ieee", splits=splits)
    check_near_min(z, E, idx, dist)
    assert torch.equal(codes, E[idx])


@pytest.mark.parametrize("path", ["triton"])
@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_triton_precisions_run(path, precision):
    path = _usable(path)
    z, E = torch.randn(70, 32, device=DEVICE), torch.randn(300, 32, device=DEVICE)
    idx = vq_lookup(z, E, backend=path, precision=precision)
    d = brute(z, E)
    gap = d.gather(1, idx[:, None]).squeeze(1) - d.min(1).values
    # TF32 rounds inputs to 10 mantissa bits: near ties may flip, but only near ties
    assert (gap <= 1e-2 * (z.double().square().sum(1) + 1)).all()


@pytest.mark.parametrize("path", PATHS)
def test_strided_inputs_and_cached_sqnorm(path):
    path = _usable(path)
    z = torch.randn(64, 70, device=DEVICE)[:, 3:35]            # row stride 70
    E = torch.randn(32, 900, device=DEVICE).T[:500]              # column-major codebook
    sq = E.square().sum(1)
    idx = vq_lookup(z, E, sq, backend=path)
    check_near_min(z, E, idx)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,C,SH,SW,size", [(1, 32, 16, 16, (1, 1)), (2, 32, 16, 16, (3, 3)),
                                            (3, 32, 16, 16, (13, 13)), (2, 32, 16, 16, (16, 16)),
                                            (2, 8, 12, 20, (5, 7)), (1, 64, 9, 9, (4, 2))])
def test_area_lookup(path, B, C, SH, SW, size):
    path = _usable(path)
    f = torch.randn(B, C, SH, SW, device=DEVICE)
    E = torch.randn(700, C, device=DEVICE)
    idx, codes = vq_area_lookup(f, size, E, backend=path)
    z = F.interpolate(f, size=size, mode="area") if size != (SH, SW) else f
    z = z.permute(0, 2, 3, 1).reshape(-1, C)
    assert idx.shape == (B, size[0] * size[1]) and codes.shape == (B, C, *size)
    check_near_min(z, E, idx.reshape(-1))
    assert torch.equal(codes, E[idx.reshape(-1)].view(B, *size, C).permute(0, 3, 1, 2))


def test_auto_path_agrees_with_reference():
    z, E = torch.randn(333, 32, device=DEVICE), torch.randn(4096, 32, device=DEVICE)
    idx = vq_lookup(z, E)
    check_near_min(z, E, idx)
    assert (idx == vq_lookup(z, E, backend="reference")).float().mean() > 0.99


def test_empty_tokens():
    idx, codes = vq_lookup(torch.randn(0, 8), torch.randn(5, 8), return_codes=True)
    assert idx.shape == (0,) and codes.shape == (0, 8)


def test_opcheck_and_compile():
    z, E = torch.randn(40, 32, device=DEVICE), torch.randn(100, 32, device=DEVICE)
    torch.library.opcheck(torch.ops.varformer.vq_lookup.default,
                          (z, E, None, True, "reference", "ieee"))
    f = torch.randn(2, 32, 16, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.varformer.vq_area_lookup.default,
                          (f, 3, 3, E, None, "reference", "ieee"))
    fn = torch.compile(lambda a, b: vq_lookup(a, b, return_codes=True), fullgraph=True,
                       dynamic=True)
    for n in (40, 57):
        zz = torch.randn(n, 32, device=DEVICE)
        i, c = fn(zz, E)
        i2, c2 = vq_lookup(zz, E, return_codes=True)
        assert torch.equal(i, i2) and torch.equal(c, c2)


def test_bad_inputs():
    z, E = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="codebook has 6 channels but z has 8"):
        vq_lookup(z, torch.randn(5, 6))
    with pytest.raises(ValueError, match="codebook is empty"):
        vq_lookup(z, torch.randn(0, 8))
    with pytest.raises(TypeError, match="z must be"):
        vq_lookup(torch.ones(4, 8, dtype=torch.int64), E)
    with pytest.raises(ValueError, match="z must have 2 dims"):
        vq_lookup(torch.randn(8), E)
    with pytest.raises(ValueError, match="codebook_sqnorm must be"):
        vq_lookup(z, E, torch.randn(4))
    with pytest.raises(ValueError, match="codebook is on meta"):
        vq_lookup(z, E.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        vq_lookup(z, E, backend="cuda")
    with pytest.raises(ValueError, match="precision must be one of"):
        vq_lookup(z, E, precision="bf16")
    with pytest.raises(ValueError, match="area pooling only shrinks"):
        vq_area_lookup(torch.randn(1, 8, 4, 4), (5, 5), E)
    with pytest.raises(ValueError, match="f must have 4 dims"):
        vq_area_lookup(torch.randn(8, 4, 4), (2, 2), E)


# ------------------------------------------------------------------------------------------
# MultiScaleQuantizer's CPU C++ schedule and its thread policy
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ph,pw,H,W", [(1, 1, 16, 16), (5, 7, 12, 20), (13, 13, 16, 16),
                                       (3, 2, 9, 5)])
def test_scale_maps_equal_interpolate(ph, pw, H, W):
    from varformer.ops import MultiScaleQuantizer
    q = MultiScaleQuantizer(vocab_size=8, Cvae=6, v_patch_nums=((ph, pw), (H, W)))
    P, M = q._scale_maps(ph, pw, H, W)
    assert P.dtype == M.dtype == torch.float32    # the loop's dtype: compared in fp32 too
    x = torch.randn(3, 6, H, W)
    area = torch.matmul(P, x.view(3, 6, H * W).transpose(1, 2))                # [3, ph·pw, 6]
    ref = F.interpolate(x, size=(ph, pw), mode="area").permute(0, 2, 3, 1).reshape(3, -1, 6)
    torch.testing.assert_close(area, ref, rtol=1e-5, atol=1e-5)
    t = torch.randn(3, ph * pw, 6)                                              # tokens
    up = torch.matmul(t.transpose(1, 2), M).view(3, 6, H, W)
    ref = F.interpolate(t.view(3, ph, pw, 6).permute(0, 3, 1, 2), size=(H, W), mode="bicubic")
    torch.testing.assert_close(up, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", [p for p in PATHS if p.startswith("csrc")])
@pytest.mark.parametrize("B,patches", [(1, None), (3, ((1, 1), (2, 3), (5, 4), (7, 9)))])
def test_quantizer_cpu_schedule_matches_generic_loop(path, B, patches):
    if DEVICE != "cpu":
        pytest.skip("the CPU schedule runs on CPU tensors")
    path = _usable(path)
    from varformer.ops import MultiScaleQuantizer
    kw = {} if patches is None else {"v_patch_nums": patches}
    q = MultiScaleQuantizer(backend=path, **kw).eval().requires_grad_(False)
    H, W = (16, 16) if patches is None else patches[-1]
    with torch.no_grad():
        q.embedding.weight.normal_()
        f = torch.randn(B, 32, H, W)
        assert q._cpu_csrc(f)
        got = q.quantize(f)
        q._cpu_csrc = lambda f: False          # the generic loop (vq_area_lookup, interpolate)
        ref = q.quantize(f)
    agree = torch.cat([(a == b).flatten() for a, b in zip(got.indices, ref.indices)])
    assert agree.float().mean() >= 0.995       # near-ties may flip on rounding, nothing else
    if agree.all():
        torch.testing.assert_close(got.f_hat, ref.f_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.priors, ref.priors, rtol=1e-5, atol=1e-5)


def test_load_aware_threads_bounds(monkeypatch):
    monkeypatch.delenv("VARFORMER_LOAD_AWARE", raising=False)
    assert _ext.load_aware_threads(1) == 1
    assert 1 <= _ext.load_aware_threads(8) <= 8
    monkeypatch.setenv("VARFORMER_LOAD_AWARE", "0")
    assert _ext.load_aware_threads(8) == 8
    monkeypatch.delenv("VARFORMER_LOAD_AWARE")
    for samples, want in (([1, 8], 8), ([1, 1, 3], 3), ([1, 1, 1, 8], 1), ([8], 8)):
        seq = iter(samples)            # fewer threads only when the load persists over samples
        monkeypatch.setattr(_ext, "_free_threads", lambda w: next(seq))
        assert _ext.load_aware_threads(8) == want, samples
    monkeypatch.setattr(_ext, "_free_threads", lambda w: 1)      # a busy machine
    import varformer.ops as vops
    with vops.fixed_threads():                 # reproducible runs: the count stays put
        with vops.fixed_threads():
            assert _ext.load_aware_threads(8) == 8
        assert _ext.load_aware_threads(8) == 8
    assert _ext.load_aware_threads(8) == 1


def test_load_aware_sections_restore_the_thread_count(monkeypatch):
    """load_aware: the block on the free CPUs' threads; load_aware_backward: the backward from
    the marked outputs, decided when it reaches them, restored when it ends."""
    import varformer.ops as vops                         # the public names of the helpers
    threads = torch.get_num_threads()
    monkeypatch.setattr(_ext, "load_aware_threads", lambda want=None: 1)   # a busy machine
    try:
        torch.set_num_threads(2)
        with vops.load_aware():
            inside = torch.get_num_threads()
        assert (inside, torch.get_num_threads()) == (1, 2)
        x = torch.randn(8, requires_grad=True)
        seen = []
        x.register_hook(lambda g: seen.append(torch.get_num_threads()))
        y = x * 3
        vops.load_aware_backward(y, "not a tensor", torch.zeros(1))
        assert torch.get_num_threads() == 2            # the forward is left alone
        y.sum().backward()
        assert seen == [1] and torch.get_num_threads() == 2
        torch.testing.assert_close(x.grad, torch.full((8,), 3.0))
        monkeypatch.setattr(_ext, "load_aware_threads", lambda want=None: want)   # quiet
        x.grad, seen[:] = None, []
        y = x * 3
        vops.load_aware_backward(y)
        y.sum().backward()
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_quantizer_cpu_loop_restores_thread_count(monkeypatch):
    from varformer.ops import MultiScaleQuantizer
    q = MultiScaleQuantizer().eval().requires_grad_(False)
    threads = torch.get_num_threads()
    monkeypatch.setattr(_ext, "load_aware_threads", lambda want=None: 1)   # a busy machine
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            busy = q.f_to_idxBl_or_fhat(torch.randn(2, 32, 16, 16), to_fhat=False)
        assert torch.get_num_threads() == 2
        monkeypatch.undo()
        with torch.no_grad():
            quiet = q.f_to_idxBl_or_fhat(torch.randn(2, 32, 16, 16), to_fhat=False)
    finally:
        torch.set_num_threads(threads)
    assert [t.shape for t in busy] == [t.shape for t in quiet]
