"""Integer screening of the float32 C++ VQ lookup (csrc/vq_screen_kernel.h) on every variant that
has it (avx512, avx2): with VARFORMER_VQ_SCREEN unset the lookup screens codes in 16-bit
integers and rescores the kept ones in float32; it must give bit for bit what the float32 scan
alone gives (VARFORMER_VQ_SCREEN=0), index, distance and code, on inputs built to defeat a
screen with a wrong margin: near ties below the integer resolution, duplicates, outliers that
coarsen the scale, tiny and zero tokens, large norms, odd and wide channel counts. Each variant
screens with vpdpwssd where the CPU has VNNI, and the avx2 variant also with vpmaddwd + vpaddd
(VARFORMER_VQ_VNNI=0); the avx512 variant does not screen without VNNI."""
import pytest
import torch

from varformer.ops import _ext

from .test_vq_csrc import check_near_min


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = _ext.cpu_status()
    if not ok:
        pytest.skip(f"C++ extension unavailable: {why}")


@pytest.fixture(params=["avx512", "avx512+vnni", "avx2", "avx2+vnni"])
def isa(request, monkeypatch):
    """A variant, screening with vpmaddwd + vpaddd (VARFORMER_VQ_VNNI=0; avx2 only) or, where
    the CPU has AVX-512 VNNI / AVX-VNNI, with vpdpwssd."""
    name, _, vnni = request.param.partition("+")
    why = _ext.cpu_isa_table().get(name, "not compiled")
    if why:
        pytest.skip(f"{name} variant unusable here: {why}")
    monkeypatch.setenv("VARFORMER_CPU_ISA", name)
    monkeypatch.setenv("VARFORMER_VQ_VNNI", "1" if vnni else "0")
    how = torch.ops.varformer_ext.vq_cpu_screen(name)
    if how.startswith("none"):
        pytest.skip(how)
    if vnni and "vpdpwssd" not in how:
        pytest.skip(f"this CPU has no VNNI for the {name} variant")
    return request.param


def both(z, E, sq, monkeypatch):
    monkeypatch.setenv("VARFORMER_VQ_SCREEN", "all")   # any size (by default from 512 tokens)
    screened = _ext.lookup(z, E, sq, True)
    monkeypatch.setenv("VARFORMER_VQ_SCREEN", "0")
    plain = _ext.lookup(z, E, sq, True)
    monkeypatch.delenv("VARFORMER_VQ_SCREEN")
    return screened, plain


def assert_same(screened, plain):
    for a, b in zip(screened, plain):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def cases(gen):
    r = lambda *s: torch.randn(*s, generator=gen)
    E = r(512, 32)
    pick = torch.randint(0, 512, (700,), generator=gen)
    out = r(4096, 32)
    out[0] = 1e4                                   # one outlier token sets a coarse block scale
    bad = r(300, 32)
    bad[5], bad[7, 3], bad[9] = float("nan"), float("inf"), 1e30
    near = E.repeat(2, 1)
    near[512:] += 1e-6 * r(512, 32)                # pairs far closer than the int16 resolution
    return {
        "gauss 4096x4096x32": (r(4096, 32), r(4096, 32)),
        "odd sizes 1000x513x20": (r(1000, 20), r(513, 20)),
        "N=77 C=31": (r(77, 31), r(4096, 31)),
        "C=1": (r(129, 1), r(4096, 1)),
        "C=7": (r(5000, 7), r(97, 7)),
        "C=320": (r(300, 320), r(1024, 320)),
        "V=1": (r(64, 32), r(1, 32)),
        "duplicate codes": (r(500, 32), torch.cat([E, E, E])),
        "tokens on codes": (E[pick] + 1e-4 * r(700, 32), E),
        "near-tie code pairs": (E[pick] + 1e-3 * r(700, 32), near),
        "tiny tokens": (1e-20 * r(300, 32), E),
        "zero tokens": (torch.zeros(300, 32), E),
        "zero codebook": (r(300, 32), torch.zeros(100, 32)),
        "large codebook": (r(300, 32), 1e6 * r(100, 32)),
        "outlier token": (out, r(4096, 32)),
        "non-finite tokens": (bad, E),
    }


@pytest.mark.parametrize("given_sq", [False, True])
def test_screened_equals_float32_scan(isa, given_sq, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    for name, (z, E) in cases(gen).items():
        sq = E.pow(2).sum(1) if given_sq else torch.empty(0)
        screened, plain = both(z, E, sq, monkeypatch)
        assert_same(screened, plain)
        rows = torch.isfinite(z).all(1) & (z.abs().amax(1) < 1e10)
        check_near_min(z, E, E.pow(2).sum(1), screened[0], screened[1], rows=rows)


def test_screened_under_split_codes_and_threads(isa, monkeypatch):
    """Few tokens and many codes: the codes are split across work items, each screened alone."""
    gen = torch.Generator().manual_seed(3)
    z, E = torch.randn(70, 32, generator=gen), torch.randn(16384, 32, generator=gen)
    sq = E.pow(2).sum(1)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert_same(*both(z, E, sq, monkeypatch))
    finally:
        torch.set_num_threads(threads)


def test_sqnorm_not_the_codebook_norm(isa, monkeypatch):
    """sqnorm is the caller's: any finite values, here negative and far from |e|^2."""
    gen = torch.Generator().manual_seed(5)
    z, E = torch.randn(400, 32, generator=gen), torch.randn(2048, 32, generator=gen)
    for sq in (-50 * torch.rand(2048, generator=gen), 1e7 * torch.rand(2048, generator=gen),
               torch.zeros(2048)):
        assert_same(*both(z, E, sq, monkeypatch))


def test_default_screens_large_calls_only(isa, monkeypatch):
    """Unset = 1: calls of 512 tokens and more screen; all give the float32 scan's bits."""
    gen = torch.Generator().manual_seed(11)
    E = torch.randn(4096, 32, generator=gen)
    sq = E.pow(2).sum(1)
    for N in (511, 512, 4097):
        z = torch.randn(N, 32, generator=gen)
        monkeypatch.setenv("VARFORMER_VQ_SCREEN", "1")
        one = _ext.lookup(z, E, sq, True)
        monkeypatch.setenv("VARFORMER_VQ_SCREEN", "0")
        assert_same(one, _ext.lookup(z, E, sq, True))


def test_bad_setting_is_an_error(isa, monkeypatch):
    monkeypatch.setenv("VARFORMER_VQ_SCREEN", "yes")
    with pytest.raises(RuntimeError, match="VARFORMER_VQ_SCREEN must be 0, 1 or all, got 'yes'"):
        _ext.lookup(torch.randn(600, 32), torch.randn(64, 32), torch.empty(0), False)


def test_codebook_cache_sees_changed_values(isa, monkeypatch):
    """The integer codebook is reused while codebook and sqnorm hold the same values; changes in
    place (even through .data, which autograd's version counter does not see) are seen."""
    gen = torch.Generator().manual_seed(2)
    z, E = torch.randn(600, 32, generator=gen), torch.randn(1024, 32, generator=gen)
    sq = E.pow(2).sum(1)

    def check():
        assert_same(*both(z, E, sq, monkeypatch))

    check()
    check()                                       # the cached codebook
    E.data.mul_(-1)                               # same norms, every index changes
    check()
    E.data[::3] *= 2
    check()
    sq.data[::2] += 1.0                           # sqnorm alone changes
    check()


def test_backends_say_the_screening(isa):
    from varformer.ops import backends
    reason = backends()["csrc-cpu"]["reason"]
    assert "screening" in reason
    want = "vpdpwssd" if isa.endswith("+vnni") else "vpmaddwd"
    assert want in reason and want in _ext.cpu_screening()


def test_bad_vnni_setting_is_an_error(isa, monkeypatch):
    monkeypatch.setenv("VARFORMER_VQ_VNNI", "on")
    with pytest.raises(RuntimeError, match="VARFORMER_VQ_VNNI must be 0 or 1, got 'on'"):
        _ext.lookup(torch.randn(600, 32), torch.randn(64, 32), torch.empty(0), False)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/cpuinfo"), reason="Linux only")
@pytest.mark.parametrize("name", ["avx512", "avx2"])
def test_vnni_offered_where_the_cpu_has_it(name, monkeypatch):
    """vpdpwssd is offered exactly where /proc/cpuinfo lists the variant's VNNI extension; the
    avx512 variant screens only with it, the avx2 variant with vpmaddwd otherwise."""
    why = _ext.cpu_isa_table().get(name, "not compiled")
    if why:
        pytest.skip(f"{name} variant unusable here: {why}")
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    has = {"avx512": "avx512_vnni", "avx2": "avx_vnni"}[name] in flags
    monkeypatch.setenv("VARFORMER_VQ_VNNI", "1")
    how = torch.ops.varformer_ext.vq_cpu_screen(name)
    assert ("vpdpwssd" in how) == has, how
    monkeypatch.setenv("VARFORMER_VQ_VNNI", "0")
    how = torch.ops.varformer_ext.vq_cpu_screen(name)
    assert how.startswith("none") if name == "avx512" else how.startswith("vpmaddwd"), how


def test_concurrent_callers_with_different_codebooks(isa, monkeypatch):
    """Four Python threads, each its own codebook, calling at once: the shared codebook cache is
    replaced under them and every result must still be its own codebook's."""
    import threading
    gen = torch.Generator().manual_seed(9)
    jobs = [(torch.randn(700, 32, generator=gen), torch.randn(1024, 32, generator=gen))
            for _ in range(4)]
    monkeypatch.setenv("VARFORMER_VQ_SCREEN", "0")
    want = [_ext.lookup(z, E, torch.empty(0), True) for z, E in jobs]
    monkeypatch.setenv("VARFORMER_VQ_SCREEN", "all")
    got, errors = [[None] * 6 for _ in jobs], []

    def work(i):
        try:
            z, E = jobs[i]
            for r in range(6):
                got[i][r] = _ext.lookup(z, E, torch.empty(0), True)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, runs in enumerate(got):
        for res in runs:
            assert_same(res, want[i])
