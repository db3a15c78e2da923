"""C++ VQ lookup (torch.ops.varformer_ext.vq_lookup) against float64 brute force, on every
inner-kernel ISA variant this CPU runs (avx512, avx2, baseline; chosen with VARFORMER_CPU_ISA),
the variant selection, and the nvcc compile check of its CUDA source.

z [N, C], codebook [V, C], sqnorm [V] (or [0]: computed by the op) -> idx [N] (argmin, lowest
index on ties), dist [N], codes [N, C] = codebook[idx]."""
import pytest
import torch

from varformer.ops import _ext

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = _ext.cpu_status()
    if not ok:
        pytest.skip(f"C++ extension unavailable: {why}")


@pytest.fixture(params=_ext.CPU_ISAS)
def isa(request, monkeypatch):
    """Runs the test on one inner-kernel variant (skipped where this CPU lacks it)."""
    why = _ext.cpu_isa_table().get(request.param, "not compiled")
    if why:
        pytest.skip(f"{request.param} variant unusable here: {why}")
    monkeypatch.setenv("VARFORMER_CPU_ISA", request.param)
    assert _ext.cpu_isa() == request.param
    return request.param


def brute(z, E, sq):
    """float64 distances [N, V] with the op's formula."""
    z, E, sq = z.double(), E.double(), sq.double()
    return (z.pow(2).sum(1, keepdim=True) + sq) - 2 * z @ E.t()


def check_near_min(z, E, sq, idx, dist, rows=None):
    """dist is the distance of idx, and that distance is (nearly) the minimum."""
    if rows is not None:
        z, idx, dist = z[rows], idx[rows], dist[rows]
    d = brute(z, E, sq)
    tol = TOL[z.dtype] * (z.double().pow(2).sum(1) + E.double().pow(2).sum(1).max())
    assert idx.dtype == torch.int64 and dist.dtype == z.dtype
    assert ((idx >= 0) & (idx < E.shape[0])).all()
    d_idx = d.gather(1, idx[:, None]).squeeze(1)
    assert ((dist.double() - d_idx).abs() <= tol).all()
    assert ((d_idx - d.min(1).values).abs() <= tol).all()


def lattice(V, C, dtype, gen):
    """V distinct codes on a scaled integer lattice (spacing 4), shuffled."""
    pts = torch.unique(torch.randint(-8, 8, (3 * V, C), generator=gen), dim=0)
    pts = pts[torch.randperm(pts.shape[0], generator=gen)[:V]]
    assert pts.shape[0] == V
    return (4 * pts).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [8, 32, 64])
@pytest.mark.parametrize("V", [1, 7, 4096])
@pytest.mark.parametrize("N", [1, 2, 7, 300, 4097])
def test_random_inputs_near_bruteforce(N, V, C, dtype, isa):
    _check_random(N, V, C, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,V,C", [(37, 300, 3), (5, 129, 256), (600, 1000, 256), (70, 50, 1)])
def test_odd_and_wide_channels(N, V, C, dtype, isa):
    _check_random(N, V, C, dtype)


def _check_random(N, V, C, dtype):
    z, E = torch.randn(N, C, dtype=dtype), torch.randn(V, C, dtype=dtype)
    sq = E.pow(2).sum(1)
    idx, dist, codes = _ext.lookup(z, E, sq, True)
    check_near_min(z, E, sq, idx, dist)
    assert torch.equal(codes, E[idx])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,V,C", [(1, 4096, 8), (7, 4096, 32), (300, 7, 8), (4097, 4096, 32),
                                   (3000, 1000, 64)])
def test_well_separated_codes_exact_index(N, V, C, dtype, isa):
    gen = torch.Generator().manual_seed(N + V + C)
    E = lattice(V, C, dtype, gen)
    pick = torch.randint(0, V, (N,), generator=gen)
    z = E[pick] + (torch.rand(N, C, generator=gen, dtype=dtype) - 0.5)  # within 0.5 of a code
    idx, dist, codes = _ext.lookup(z, E, E.pow(2).sum(1), True)
    assert torch.equal(idx, pick)
    assert torch.equal(idx, brute(z, E, E.pow(2).sum(1)).argmin(1))
    assert torch.equal(codes, E[pick])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [7, 40, 3000])  # serial / codes split across threads / not split
def test_exact_ties_return_lowest_index(N, dtype, isa):
    V, C = 4096, 32
    E = torch.randn(V, C, dtype=dtype)
    copies = {300: 5, 4095: 5, 4000: 70, 128: 64, 1000: 999}  # later row := earlier row
    for dst, src in copies.items():
        E[dst] = E[src]
    lowest = {5: 5, 300: 5, 4095: 5, 70: 70, 4000: 70, 64: 64, 128: 64, 999: 999, 1000: 999}
    rows = list(lowest)
    pick = torch.tensor(rows * (N // len(rows) + 1))[:N]
    z = E[pick] + 1e-3 * torch.randn(N, C, dtype=dtype)
    idx, dist, codes = _ext.lookup(z, E, E.pow(2).sum(1), True)
    assert idx.tolist() == [lowest[p] for p in pick.tolist()]
    assert torch.equal(codes, E[idx])


def test_identical_codebook_rows_give_index_zero(isa):
    E = torch.randn(1, 16).repeat(4096, 1)
    z = torch.randn(50, 16)
    idx, _, _ = _ext.lookup(z, E, E.pow(2).sum(1), False)
    assert (idx == 0).all()


def test_nan_and_inf_follow_torch_argmin(isa):
    E = torch.randn(600, 8)
    sq = E.pow(2).sum(1)
    z = torch.randn(5, 8)
    z[1, 3] = float("nan")  # every distance NaN -> index 0
    z[2] = 1e30             # |z|^2 overflows: every distance +inf -> index 0
    idx, dist, _ = _ext.lookup(z, E, sq, False)
    assert idx[1:3].tolist() == [0, 0] and dist[1].isnan() and dist[2] == float("inf")
    check_near_min(z[[0, 3, 4]], E, sq, idx[[0, 3, 4]], dist[[0, 3, 4]])

    bad_sq = sq.clone()
    bad_sq[[400, 9]] = float("nan")  # the first NaN distance wins (row 1: all NaN -> 0)
    idx, dist, _ = _ext.lookup(z, E, bad_sq, False)
    eager = ((z.pow(2).sum(1, keepdim=True) + bad_sq) - 2 * z @ E.t()).argmin(1)
    assert idx.tolist() == eager.tolist() == [9, 0, 9, 9, 9]
    assert dist.isnan().all()


def test_with_codes_flag_and_empty_batch(isa):
    z, E = torch.randn(10, 12), torch.randn(33, 12)
    idx, dist, codes = _ext.lookup(z, E, E.pow(2).sum(1), False)
    assert codes.shape == (0, 12) and idx.shape == (10,) and dist.shape == (10,)
    idx, dist, codes = _ext.lookup(z[:0], E, E.pow(2).sum(1), True)
    assert idx.shape == (0,) and dist.shape == (0,) and codes.shape == (0, 12)


def test_thread_count_does_not_change_results(isa):
    z, E = torch.randn(700, 32), torch.randn(4096, 32)
    sq = E.pow(2).sum(1)
    ref = _ext.lookup(z, E, sq, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ext.lookup(z, E, sq, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(ref, one):
        assert torch.equal(a, b)


def test_large_batch_subset(isa):
    N, V, C = 100_000, 4096, 32
    z, E = torch.randn(N, C), torch.randn(V, C)
    sq = E.pow(2).sum(1)
    idx, dist, codes = _ext.lookup(z, E, sq, True)
    rows = torch.randperm(N)[:3000]
    check_near_min(z, E, sq, idx, dist, rows)
    assert torch.equal(codes[rows], E[idx[rows]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,V,C", [(1, 4096, 32), (301, 777, 5), (1030, 4096, 32)])
def test_sqnorm_computed_by_the_op_when_empty(N, V, C, dtype, isa):
    z, E = torch.randn(N, C, dtype=dtype), torch.randn(V, C, dtype=dtype)
    idx, dist, codes = _ext.lookup(z, E, E.new_empty(0), True)
    check_near_min(z, E, E.pow(2).sum(1), idx, dist)
    assert torch.equal(codes, E[idx])


@pytest.mark.parametrize("given", [True, False])
def test_nonfinite_codebook_follows_torch_argmin(given, isa):
    gen = torch.Generator().manual_seed(3)
    E = torch.randn(900, 8, generator=gen)
    E[700, 2] = float("inf")   # NaN (inf - inf) or +inf distances, depending on the token
    E[750, 1] = float("nan")   # NaN distance for every token
    z = torch.randn(37, 8, generator=gen)
    sq = E.pow(2).sum(1)
    idx, dist, codes = _ext.lookup(z, E, sq if given else sq[:0], True)
    eager = ((z.pow(2).sum(1, keepdim=True) + sq) - 2 * z @ E.t()).argmin(1)
    assert torch.equal(idx, eager)
    assert set(idx.tolist()) <= {700, 750} and dist.isnan().all()
    assert torch.equal(codes.isnan(), E[idx].isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_tokens_take_the_exact_scan(dtype, isa):
    big = 1e18 if dtype == torch.float32 else 1e152   # |z|^2 near the type's limit, finite
    E = torch.randn(300, 32, dtype=dtype)
    z = torch.randn(70, 32, dtype=dtype)
    z[5] *= big              # finite |z|^2 above the fast kernel's bound
    z[6] = big * 100         # |z|^2 overflows: every distance +inf -> index 0
    sq = E.pow(2).sum(1)
    idx, dist, _ = _ext.lookup(z, E, sq, False)
    assert idx[6] == 0 and dist[6] == float("inf")
    rows = [r for r in range(70) if r != 6]
    check_near_min(z, E, sq, idx, dist, rows)


def test_isa_selection_and_errors(monkeypatch):
    table = _ext.cpu_isa_table()
    assert set(table) == set(_ext.CPU_ISAS) and table["baseline"] == ""
    widest = next(name for name in _ext.CPU_ISAS if not table[name])
    monkeypatch.delenv("VARFORMER_CPU_ISA", raising=False)
    assert _ext.cpu_isa() == _ext.cpu_isa("auto") == widest
    for name in _ext.CPU_ISAS:
        if table[name]:
            with pytest.raises(RuntimeError, match=f"VARFORMER_CPU_ISA={name}: .*cannot run"):
                _ext.cpu_isa(name)
        else:
            assert _ext.cpu_isa(name) == name
    with pytest.raises(RuntimeError, match="VARFORMER_CPU_ISA must be auto, avx512, avx2 or "
                                           "baseline, got 'sse9'"):
        _ext.cpu_isa("sse9")
    monkeypatch.setenv("VARFORMER_CPU_ISA", "sse9")
    z, E = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="VARFORMER_CPU_ISA must be"):
        _ext.lookup(z, E, E.pow(2).sum(1), False)


def test_backends_name_the_variant(isa):
    from varformer.ops import backends
    info = backends()["csrc-cpu"]
    assert info["available"]
    assert f"inner kernel {isa} (VARFORMER_CPU_ISA={isa})" in info["reason"]
    assert "built with -O3" in info["reason"]
    if "-fopenmp" not in info["reason"]:        # a serial fallback build must say so
        assert "WITHOUT OpenMP" in info["reason"]


@pytest.mark.parametrize("case,match", [
    ("c_mismatch", "z has C=8 channels but codebook has C=9"),
    ("empty_codebook", r"codebook is empty \(V=0\)"),
    ("z_1d", "z must be 2-D"),
    ("codebook_1d", "codebook must be 2-D"),
    ("sqnorm_len", "sqnorm has 5 entries"),
    ("int_z", "z must be float32 or float64"),
    ("dtype_mismatch", "codebook dtype"),
    ("sqnorm_dtype", "sqnorm dtype"),
    ("z_noncontig", "z must be contiguous"),
    ("codebook_noncontig", "codebook must be contiguous"),
])
def test_bad_inputs_raise(case, match):
    z, E = torch.randn(4, 8), torch.randn(6, 8)
    sq = E.pow(2).sum(1)
    if case == "c_mismatch":
        E = torch.randn(6, 9)
        sq = E.pow(2).sum(1)
    elif case == "empty_codebook":
        E, sq = E[:0], sq[:0]
    elif case == "z_1d":
        z = z[0]
    elif case == "codebook_1d":
        E = E[0]
    elif case == "sqnorm_len":
        sq = sq[:5]
    elif case == "int_z":
        z, E, sq = z.int(), E.int(), sq.int()
    elif case == "dtype_mismatch":
        E = E.double()
    elif case == "sqnorm_dtype":
        sq = sq.double()
    elif case == "z_noncontig":
        z = torch.randn(8, 4).t()
    elif case == "codebook_noncontig":
        E = torch.randn(8, 6).t()
    with pytest.raises(RuntimeError, match=match):
        _ext.lookup(z, E, sq, True)


def test_sources_found():
    root = _ext.csrc_dir()
    assert (root / "vq_lookup.cpp").is_file() and (root / "vq_lookup_cuda.cu").is_file()


def test_build_name_is_per_checkout(tmp_path):
    """The same sources in two folders (two checkouts) build under two names, so one does not
    rebuild the other's library; a changed source or flag changes the name too."""
    import shutil
    names = {}
    for where in ("a", "b"):
        shutil.copytree(_ext.csrc_dir(), tmp_path / where)
        src = [tmp_path / where / s for s in _ext.CPU_SOURCES]
        names[where] = _ext._build_name(src, ["-O3"], cuda=False)
        assert names[where] == _ext._build_name(src, ["-O3"], cuda=False)     # stable
    assert names["a"] != names["b"]
    src = [tmp_path / "a" / s for s in _ext.CPU_SOURCES]
    assert _ext._build_name(src, ["-O2"], cuda=False) != names["a"]
    with open(src[0], "a") as f:
        f.write("\n// changed\n")
    assert _ext._build_name(src, ["-O3"], cuda=False) != names["a"]


def test_cuda_source_compiles_for_sm80_and_sm90():
    if _ext.find_nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda/bin, PATH)")
    ok, log = _ext.compile_cuda_sources_check(("sm_80", "sm_90"))
    assert ok, log[-4000:]
    assert "Registers are spilled" not in log, log[-4000:]
