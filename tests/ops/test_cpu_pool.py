"""The C++ kernels' block loop (csrc/cpu_threads.h, run_blocks): its own helper pool gives the
same bits as torch's OpenMP pool (VARFORMER_CPU_POOL=0) and as one thread, for every kernel that
uses it (window attention forward/backward, the attention stages of mediator attention, the φ
step), also with several Python threads calling at once and in a forked child."""
import multiprocessing as mp
import threading

import pytest
import torch

from varformer.ops import _ext

_OK, _WHY = _ext.cpu_status()
pytestmark = pytest.mark.skipif(not _OK, reason=f"C++ extension unavailable: {_WHY}")
ops = torch.ops.varformer_ext


def _window(B=2, H=12, W=20, ws=4, shift=2, nh=4, hd=20, seed=0):
    """Window attention forward + backward; by default 2 x 15 windows of 4x4, 4 heads."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3 * nh * hd, generator=g)
    table = torch.randn((2 * ws - 1) ** 2, nh, generator=g)

    def run():
        out, lse = ops.window_attention_fwd(qkv, table, ws, shift, nh, hd ** -0.5)
        gq, gt = ops.window_attention_bwd(torch.ones_like(out), qkv, table, out, lse, ws, shift,
                                          nh, hd ** -0.5)
        return [out, lse, gq, gt]
    return run


def _attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, n, 40, generator=g) for n in (300, 517, 517))
    dout = torch.randn(3, 300, 40, generator=g)

    def run():
        out, lse = ops.attention_fwd(q, k, v, 40 ** -0.5)
        return [out, lse, *ops.attention_bwd(dout, q, k, v, out, lse, 40 ** -0.5)]
    return run


def _phi():
    g = torch.Generator().manual_seed(2)
    h, fh, fr = (torch.randn(4, 16, 16, 32, generator=g) for _ in range(3))
    w, b = torch.randn(32, 32, 3, 3, generator=g) * 0.05, torch.randn(32, generator=g)

    def run():
        f_hat, f_rest = fh.clone(), fr.clone()
        return [ops.phi_update(h, w, b, 0.5, 0.5, f_hat, f_rest), f_hat, f_rest]
    return run


KERNELS = {"window": _window, "attention": _attention, "phi": _phi}


@pytest.fixture
def threads(monkeypatch):
    """Three threads (whatever the machine has) and no load-aware cut."""
    monkeypatch.setenv("VARFORMER_LOAD_AWARE", "0")
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(old)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_pool_openmp_and_one_thread_agree_bitwise(name, threads, monkeypatch):
    run = KERNELS[name]()
    monkeypatch.setenv("VARFORMER_CPU_POOL", "1")
    pooled = [run() for _ in range(3)]
    monkeypatch.setenv("VARFORMER_CPU_POOL", "0")
    omp = run()
    torch.set_num_threads(1)
    one = run()
    for got in pooled:
        _same(got, omp)
    _same(omp, one)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_concurrent_callers(name, threads, monkeypatch):
    """Four Python threads at once: one holds the pool, the others run on OpenMP meanwhile."""
    monkeypatch.setenv("VARFORMER_CPU_POOL", "1")
    run = KERNELS[name]()
    want = run()
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                results.append(run())
        except Exception as exc:          # noqa: BLE001 (reported below)
            errors.append(exc)
    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in ts)
    assert len(results) == 20
    for got in results:
        _same(got, want)


def _small_window():
    """A window call whose ATen tensors are all below ATen's parallel grain (so no OpenMP
    region runs, which would hang in a forked child of a parent that used one) but whose
    16 items (4 windows of 8x8, 4 heads) still ask for three threads."""
    return _window(1, 16, 16, 8, 0, 4, 8, seed=3)


def _threads_now():
    import os
    return len(os.listdir("/proc/self/task"))


def _child(conn):
    before = _threads_now()
    got = _small_window()()
    conn.send(([t.numpy().copy() for t in got], _threads_now() - before))
    conn.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork")
def test_forked_child_gets_a_fresh_pool(threads, monkeypatch):
    """A child forked after the pool started has none of its helpers: it starts its own (two
    more threads after its first call) and computes the same bits."""
    import os
    if "fork" not in mp.get_all_start_methods() or not os.path.isdir("/proc/self/task"):
        pytest.skip("needs fork and /proc")
    monkeypatch.setenv("VARFORMER_CPU_POOL", "1")
    want = _small_window()()              # starts the parent's helpers
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child,))
    p.start()
    try:
        assert parent.poll(120), "the forked child hung"
        got, new_threads = parent.recv()
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    assert new_threads == 2
    _same([torch.from_numpy(a) for a in got], want)


def _budget() -> int:
    prev = _ext._set_thread_budget(0)
    _ext._set_thread_budget(prev)
    return prev


def test_load_aware_section_keeps_the_kernels_thread_budget(monkeypatch):
    """On a busy machine ``load_aware`` cuts torch's count for ATen's ops, but the C++ kernels
    keep asking for the count before the cut (on their helper pool), with the same bits; the
    budget is restored on exit, also after an exception."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = KERNELS["window"]()
        want = run()
        monkeypatch.setattr(_ext, "load_aware_threads", lambda want=None: 1)
        assert _budget() == 0
        with _ext.load_aware():
            assert torch.get_num_threads() == 1 and _budget() == 2
            _same(run(), want)
        assert torch.get_num_threads() == 2 and _budget() == 0
        with pytest.raises(ValueError):
            with _ext.load_aware():
                raise ValueError("inside")
        assert torch.get_num_threads() == 2 and _budget() == 0
        monkeypatch.setattr(_ext, "load_aware_threads", lambda want=None: 2)
        with _ext.load_aware():             # quiet: nothing changes
            assert _budget() == 0
    finally:
        torch.set_num_threads(old)
