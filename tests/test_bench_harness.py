"""The benchmark harness: CPU peak model, background load, tables, summary, plots, and a smoke
run of `varformer bench` end to end."""
import argparse
import csv
import io
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from varformer import cli
from varformer.benchmarks import harness

# ------------------------------------------------------------------------------ fake cpuinfo


def _cpuinfo(n, model, flags, mhz="2000.000", vendor="GenuineIntel", bogomips="4000.00",
             cores_per_pkg=None, siblings_per_core=1, family=None, model_number=None):
    """/proc/cpuinfo text of ``n`` logical CPUs; ``siblings_per_core`` logical CPUs share a
    core id. ``mhz=None`` leaves out the 'cpu MHz' line; ``family`` / ``model_number`` add the
    'cpu family' / 'model' lines."""
    blocks = []
    for i in range(n):
        lines = [f"processor\t: {i}", f"vendor_id\t: {vendor}"]
        if family is not None:
            lines.append(f"cpu family\t: {family}")
        if model_number is not None:
            lines.append(f"model\t\t: {model_number}")
        lines.append(f"model name\t: {model}")
        if mhz is not None:
            lines.append(f"cpu MHz\t\t: {mhz}")
        lines += ["physical id\t: 0", f"core id\t\t: {i // siblings_per_core}",
                  f"flags\t\t: {flags}", f"bogomips\t: {bogomips}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


AVX512 = "fpu sse sse2 sse4_1 sse4_2 avx fma avx2 avx512f avx512bw avx512vl avx512_bf16"
AVX2 = "fpu sse sse2 sse4_1 sse4_2 avx fma avx2"


@pytest.fixture
def no_sysfs(tmp_path):
    return str(tmp_path / "nosys")      # no cpufreq: the clock comes from cpuinfo text


def test_peak_avx512_two_cores(no_sysfs):
    info = harness.cpu_peak_model(_cpuinfo(2, "Intel(R) Xeon(R) Processor", AVX512), None, None,
                                  sys_root=no_sysfs)
    assert info["simd"] == "avx512" and info["lanes"] == 16 and info["cores"] == 2
    assert info["peak_gflops_fp32"] == pytest.approx(2 * 2 * 16 * 2 * 2.0)
    assert info["ghz_source"] == "cpuinfo 'cpu MHz'"
    assert info["isa"][:3] == ["avx512f", "avx512bw", "avx512vl"] and "avx2" in info["isa"]
    assert "2 cores x 2 FMA units x 16 lanes x 2 FLOP x 2.00 GHz" in info["peak_formula"]


def test_peak_avx2_smt_threads_and_affinity(no_sysfs):
    """4 logical CPUs on 2 cores (SMT): peak counts cores, capped by threads and affinity."""
    text = _cpuinfo(4, "AMD EPYC 7B13", AVX2, mhz="3050.000", vendor="AuthenticAMD",
                    siblings_per_core=2)
    full = harness.cpu_peak_model(text, None, None, sys_root=no_sysfs)
    assert (full["simd"], full["lanes"], full["logical_cpus"], full["cores"]) == \
        ("avx2+fma", 8, 4, 2)
    assert full["peak_gflops_fp32"] == pytest.approx(2 * 2 * 8 * 2 * 3.05)
    one = harness.cpu_peak_model(text, None, 1, sys_root=no_sysfs)
    assert one["cores_used"] == 1 and one["peak_gflops_fp32"] == pytest.approx(
        full["peak_gflops_fp32"] / 2)
    # four threads on two cores add nothing; CPUs 0 and 1 are one core
    assert harness.cpu_peak_model(text, None, 4, sys_root=no_sysfs)["cores_used"] == 2
    assert harness.cpu_peak_model(text, [0, 1], None, sys_root=no_sysfs)["cores"] == 1


def test_peak_clock_fallbacks_and_old_isas(no_sysfs, tmp_path):
    # no 'cpu MHz': the model name's clock, then bogomips / 2
    named = harness.cpu_peak_model(_cpuinfo(1, "Intel(R) Core(TM) i7 CPU @ 3.40GHz", AVX2,
                                            mhz=None), sys_root=no_sysfs)
    assert (named["ghz"], named["ghz_source"]) == (3.4, "model name")
    bogo = harness.cpu_peak_model(_cpuinfo(1, "Some CPU", AVX2, mhz=None, bogomips="5000.00"),
                                  sys_root=no_sysfs)
    assert (bogo["ghz"], bogo["ghz_source"]) == (2.5, "bogomips / 2")
    # cpufreq's maximum wins over cpuinfo when present
    (tmp_path / "sys" / "cpu0" / "cpufreq").mkdir(parents=True)
    (tmp_path / "sys" / "cpu0" / "cpufreq" / "cpuinfo_max_freq").write_text("3700000\n")
    turbo = harness.cpu_peak_model(_cpuinfo(1, "X", AVX2), sys_root=str(tmp_path / "sys"))
    assert (turbo["ghz"], turbo["ghz_source"]) == (3.7, "cpufreq max")
    # AVX without FMA: multiply and add are separate instructions
    avx = harness.cpu_peak_model(_cpuinfo(1, "X", "sse sse2 avx"), sys_root=no_sysfs)
    assert avx["simd"] == "avx (no fma)" and avx["peak_gflops_fp32"] == pytest.approx(2 * 8 * 2.0)
    sse = harness.cpu_peak_model(_cpuinfo(1, "X", "sse sse2"), sys_root=no_sysfs)
    assert sse["lanes"] == 4
    # AMD Zen 4 runs AVX-512 on a 256-bit datapath; Zen 5 (vp2intersect) natively
    zen4 = harness.cpu_peak_model(_cpuinfo(1, "AMD EPYC 9654", AVX512, vendor="AuthenticAMD"),
                                  sys_root=no_sysfs)
    zen5 = harness.cpu_peak_model(_cpuinfo(1, "AMD EPYC 9755", AVX512 + " avx512_vp2intersect",
                                           vendor="AuthenticAMD"), sys_root=no_sysfs)
    assert (zen4["lanes"], zen5["lanes"]) == (8, 16)


def test_zen1_avx2_runs_on_a_128_bit_datapath(no_sysfs):
    """AMD family 0x17 below model 0x30 (Zen, Zen+) issues 256-bit FMAs as two halves: 4 lanes;
    Zen 2 (model 0x31) and Intel keep 8."""
    naples = _cpuinfo(2, "AMD EPYC", AVX2, mhz="1996.250", vendor="AuthenticAMD", family=23,
                      model_number=1)
    parsed = harness.parse_cpuinfo(naples)
    assert (parsed["family"], parsed["model_number"], parsed["model"]) == (23, 1, "AMD EPYC")
    info = harness.cpu_peak_model(naples, sys_root=no_sysfs)
    assert (info["simd"], info["lanes"]) == ("avx2+fma (2x128-bit datapath)", 4)
    assert (info["family"], info["model_number"]) == (23, 1)
    assert info["peak_gflops_fp32"] == pytest.approx(2 * 2 * 4 * 2 * 1.99625)
    assert "2 cores x 2 FMA units x 4 lanes x 2 FLOP x 2.00 GHz" in info["peak_formula"]
    zen_plus = harness.cpu_peak_model(_cpuinfo(1, "AMD Ryzen 7 2700X", AVX2,
                                               vendor="AuthenticAMD", family=23,
                                               model_number=8), sys_root=no_sysfs)
    rome = harness.cpu_peak_model(_cpuinfo(1, "AMD EPYC 7742", AVX2, vendor="AuthenticAMD",
                                           family=23, model_number=49), sys_root=no_sysfs)
    assert (zen_plus["lanes"], rome["lanes"], rome["simd"]) == (4, 8, "avx2+fma")
    # the same numbers from another vendor, or no numbers at all, change nothing
    intel = harness.cpu_peak_model(_cpuinfo(1, "X", AVX2, family=23, model_number=1),
                                   sys_root=no_sysfs)
    bare = harness.parse_cpuinfo(_cpuinfo(1, "AMD EPYC", AVX2, vendor="AuthenticAMD"))
    assert intel["lanes"] == 8 and (bare["family"], bare["model_number"]) == (None, None)
    assert harness.simd_fp32_lanes(AVX2.split(), "AuthenticAMD") == (8, "avx2+fma")
    assert harness.simd_fp32_lanes(AVX2.split(), "HygonGenuine", 24, 0)[0] == 4


def test_cpu_info_of_this_machine():
    info = harness.cpu_info(bandwidth=False)
    assert info["threads"] == torch.get_num_threads()
    assert info["peak_gflops_fp32"] > 0 and info["model"] and len(info["loadavg"]) == 3
    assert harness.cpu_info(threads=1)["cores_used"] == 1
    assert harness.memory_bandwidth_gbs(mib=8) > 0
    peaks = harness.device_peaks("cpu")
    ceiling = info["peak_gflops_measured"] or info["peak_gflops_fp32"]
    assert peaks.flops[torch.float32] == pytest.approx(ceiling * 1e9)
    assert peaks.bandwidth > 0


def _generous_peak_gflops(threads):
    """An upper bound no CPU reaches: 32 fp32 lanes x 2 FMA pipes x 2 FLOP x 6 GHz per CPU."""
    return min(threads, harness._affinity_cpus()) * 32 * 2 * 2 * 6.0


def test_measured_fma_peak():
    """The C++ FMA loop: positive, below a generous bound, cached per thread count; the
    header's cpu_peak line states it and the estimate; the CSV metadata carries both."""
    if harness._fma_peak_op() is None:
        pytest.skip("C++ extension unavailable")
    n = harness._affinity_cpus()
    for threads in sorted({1, n}):
        g = harness.measured_fma_peak_gflops(threads)
        assert 0 < g <= 1.2 * _generous_peak_gflops(threads)
        assert harness.measured_fma_peak_gflops(threads) == g        # cached
    # more threads than CPUs measure (and cache) as many as there are CPUs
    assert harness.measured_fma_peak_gflops(n + 3) == harness.measured_fma_peak_gflops(n)
    info = harness.cpu_info(threads=1)
    assert info["peak_gflops_measured"] == harness.measured_fma_peak_gflops(1)
    assert info["peak_measured_how"].startswith("FMA loop, ") and "1 thread" in \
        info["peak_measured_how"]
    assert harness.cpu_info(measure=False)["peak_gflops_measured"] is None
    meta = harness.metadata("cpu", "varformer bench")
    g = harness.measured_fma_peak_gflops(torch.get_num_threads())
    assert meta["cpu_peak"].startswith(f"measured {g:.0f} GFLOP/s fp32 (FMA loop, ")
    assert "; est. " in meta["cpu_peak"] and " lanes x " in meta["cpu_peak"]
    assert float(meta["cpu_peak_gflops_measured"]) == pytest.approx(g, abs=0.05)
    assert float(meta["cpu_peak_gflops_est"]) > 0
    lines = harness.metadata_lines(meta)      # the numbers are for the CSV rows only
    assert not any(ln.startswith("- cpu_peak_gflops") for ln in lines)
    assert any(ln.startswith("- cpu_peak: measured ") for ln in lines)


def test_fma_peak_keeps_the_best_of_its_tries(monkeypatch):
    """A neighbour's burst during one measurement does not set the peak: the best of
    ``FMA_PEAK_TRIES`` measurements is kept."""
    got = iter([50.0, 210.0, 120.0])
    seen = []

    def op(threads, seconds, isa):
        seen.append((threads, seconds, isa))
        return next(got)
    monkeypatch.setattr(harness, "_FMA_PEAK", {})
    monkeypatch.setattr(harness, "_fma_peak_op", lambda: op)
    monkeypatch.setattr(harness, "_fma_peak_isa", lambda: "avx2")
    monkeypatch.setattr(harness, "FMA_PEAK_TRIES", 3)
    assert harness.measured_fma_peak_gflops(1) == 210.0
    assert len(seen) == 3 and seen[0][1] == harness.FMA_PEAK_SECONDS


def test_fma_peak_op_variants():
    """Every variant this CPU runs measures a positive rate; bad arguments are errors."""
    if harness._fma_peak_op() is None:
        pytest.skip("C++ extension unavailable")
    op = torch.ops.varformer_ext.fma_peak_gflops
    widest = torch.ops.varformer_ext.fma_peak_isa()
    assert widest in ("avx512", "avx2", "scalar")
    order = ("avx512", "avx2", "scalar")
    for isa in order[order.index(widest):]:
        assert 0 < op(1, 0.05, isa) <= 1.2 * _generous_peak_gflops(1)
    if widest != "avx512":
        with pytest.raises(RuntimeError, match="cannot run the avx512 variant"):
            op(1, 0.05, "avx512")
    for args in ((0, 0.05), (1, 0.0), (1, 0.05, "sse9")):
        with pytest.raises(RuntimeError):
            op(*args)


def test_narrowed_isa_is_stated_and_sets_the_roofline(monkeypatch):
    """Under VARFORMER_CPU_ISA (and ATen/MKL/oneDNN limits) the header names the variables,
    and the measured and estimated peaks are those of the narrower variant."""
    if harness._fma_peak_op() is None:
        pytest.skip("C++ extension unavailable")
    for k in harness.ISA_LIMIT_VARS:
        monkeypatch.delenv(k, raising=False)
    wide = harness.cpu_info(threads=1)
    assert wide["isa_limits"] == "" and "narrowed" not in harness.metadata("cpu", "x")["isa"]
    if wide["lanes"] <= 1:
        pytest.skip("no vector variant to narrow from")
    monkeypatch.setenv("VARFORMER_CPU_ISA", "baseline")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    narrow = harness.cpu_info(threads=1)
    assert narrow["isa_limits"] == "VARFORMER_CPU_ISA=baseline ATEN_CPU_CAPABILITY=default"
    assert narrow["lanes"] == 1 and "x 1 (scalar) lanes x" in narrow["peak_formula"]
    assert narrow["peak_gflops_fp32"] == pytest.approx(wide["peak_gflops_fp32"] / wide["lanes"])
    assert narrow["peak_measured_how"].startswith("FMA loop, scalar, ")
    assert narrow["peak_gflops_measured"] < wide["peak_gflops_measured"]
    meta = harness.metadata("cpu", "x")
    assert meta["isa"].endswith("CPU, run narrowed by VARFORMER_CPU_ISA=baseline "
                                "ATEN_CPU_CAPABILITY=default")
    assert "narrowed to scalar" in meta["device"]
    args = argparse.Namespace(op="vq", dtype=None, threads=None, load=0, out=None, quick=True,
                              rounds=None)
    assert cli._bench_command(args, "cpu", False) == ("VARFORMER_CPU_ISA=baseline "
                                                      "ATEN_CPU_CAPABILITY=default varformer "
                                                      "bench --op vq --device cpu --quick")


def test_inductor_cache_is_kept_apart_under_aten_cpu_capability(monkeypatch):
    """Under ATEN_CPU_CAPABILITY (and no TORCHINDUCTOR_CACHE_DIR) compiled graphs get a cache of
    their own; a cache folder the user chose, or no capability, is left alone."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert harness.isolate_inductor_cache() == "" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    path = harness.isolate_inductor_cache()
    assert path.endswith("_aten_avx2") and os.environ["TORCHINDUCTOR_CACHE_DIR"] == path
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "mine")
    assert harness.isolate_inductor_cache() == "" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "mine"


def test_peak_falls_back_to_the_estimate_without_the_op(monkeypatch):
    monkeypatch.setattr(harness, "_fma_peak_op", lambda: None)
    monkeypatch.setattr(harness, "_FMA_PEAK", {})
    assert harness.measured_fma_peak_gflops(1) is None
    info = harness.cpu_info(bandwidth=False)
    assert info["peak_gflops_measured"] is None and info["peak_measured_how"] == ""
    peaks = harness.cpu_peaks()
    assert peaks.flops[torch.float32] == pytest.approx(info["peak_gflops_fp32"] * 1e9)
    meta = harness.metadata("cpu", "varformer bench")
    assert meta["cpu_peak"].startswith("est. ") and "measured" not in meta["cpu_peak"]
    assert meta["cpu_peak_gflops_measured"] == "-"


# ------------------------------------------------------------------------------ background load


def _alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _threads(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("Threads:")).split()[1])


def _cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_background_load_starts_busy_processes_and_stops_them():
    with harness.BackgroundLoad(2, threads=2) as load:
        pids = load.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        end = time.monotonic() + 10
        while time.monotonic() < end and not all(_threads(p) == 2 for p in pids):
            time.sleep(0.05)
        assert [_threads(p) for p in pids] == [2, 2]
        t0 = [_cpu_ticks(p) for p in pids]
        time.sleep(0.5)
        assert all(_cpu_ticks(p) > t for p, t in zip(pids, t0))     # they do burn CPU
        assert load.describe() == "--load 2 (2 processes x 2 busy threads)"
    assert _wait_gone(pids) == []
    assert harness.BackgroundLoad(0).describe() == "none"
    with pytest.raises(ValueError, match="non-negative int"):
        harness.BackgroundLoad(-1)


def test_background_load_stops_on_exception():
    with pytest.raises(RuntimeError):
        with harness.BackgroundLoad(1, threads=1) as load:
            pids = load.pids
            raise RuntimeError("boom")
    assert _wait_gone(pids) == []


_PARENT = """
import sys, time
from varformer.benchmarks.harness import BackgroundLoad
load = BackgroundLoad(2, 1).start()
print(" ".join(map(str, load.pids)), flush=True)
time.sleep(60)
"""


def _sigint_default():
    """In the child before exec: SIGINT back to its default. A runner started in the background
    passes SIGINT on as ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_background_load_leaves_no_orphans(sig):
    """Ctrl-C, SIGTERM or SIGKILL of the benchmark process: its busy processes die too."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, preexec_fn=_sigint_default)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        assert _wait_gone(pids) == []
    finally:
        if parent.poll() is None:
            parent.kill()


# ------------------------------------------------------------------------------ tables, plots


def _row(op, shape, mode, prov, ms, base_ms, baseline=False, flops=1e9):
    r = harness.Row(op, shape, mode, prov, "float32", ms, ms, ms, 1.0, flops / ms / 1e9,
                    float("nan"), float("nan"), base_ms / ms, baseline=baseline,
                    flop_peak=flops / (ms * 1e-3) / 1e11)
    return r


def _rows():
    out = []
    for shape, base, fused in (("s1", 10.0, 5.0), ("s2", 10.0, 1.25)):
        for mode in ("fwd", "fwd+bwd"):
            out.append(_row("op_a", shape, mode, "eager", base, base, baseline=True))
            out.append(_row("op_a", shape, mode, "fused", fused, base))
    out.append(_row("op_b", "t1", "fwd", "loop", 3.0, 3.0, baseline=True))
    out.append(_row("op_b", "t1", "fwd", "fast", 1.0, 3.0))
    return out


def test_summary_is_the_geometric_mean_per_mode():
    lines = harness.summary(_rows())
    assert len(lines) == 2
    # fused: 2x and 8x -> geometric mean 4x, in both modes
    assert lines[0] == ("summary op_a — geometric-mean speed-up vs eager over 2 shapes: "
                        "fwd: fused 4.00×; fwd+bwd: fused 4.00×")
    assert lines[1].endswith("over 1 shape: fwd: fast 3.00×")


def test_markdown_drops_empty_columns_and_uses_gflops_on_cpu():
    text = harness.markdown(_rows(), "cpu")
    head = text.splitlines()[0]
    assert "GFLOP/s" in head and "% FLOP peak" in head
    assert "GB/s" not in head and "roofline" not in head and "vs eager fp32" not in head
    assert "| op_a | s2 | fwd | fused | float32 | 1.250 (1.250–1.250) | 8.00× |" in text
    assert "TFLOP/s" in harness.markdown(_rows(), "cuda").splitlines()[0]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    assert harness.plot(_rows(), str(path), "cpu", "CPU test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert not harness.plot([r for r in _rows() if r.baseline], str(tmp_path / "q.png"), "cpu")


def test_log_numbers_lines_and_draws_bar_only_when_asked():
    s = io.StringIO()
    log = harness.Log(3, stream=s)
    log.header("## op")
    for i in range(3):
        log.measurement(f"m{i}")
    log.close()
    lines = s.getvalue().splitlines()
    assert lines[0] == "## op" and "shape" in lines[1] and "provider" in lines[1]
    assert lines[2:] == ["[1/3] m0", "[2/3] m1", "[3/3] m2"]
    s = io.StringIO()
    log = harness.Log(2, stream=s, enabled=True)
    log.measurement("x")
    log.close()
    assert "[1/2] x" in s.getvalue() and "1/2" in s.getvalue().split("[1/2] x", 1)[1]


def test_run_case_measures_and_compares(monkeypatch):
    """A synthetic case: the slow provider is the baseline, speed-ups follow the times."""
    def sleeper(sec):
        return lambda mode: ((lambda: time.sleep(sec)), None)
    case = harness.Case("toy", "n=1", lambda m: 2e6, lambda m, dt: 4e6,
                        [harness.Provider("slow", torch.float32, sleeper(0.02), baseline=True),
                         harness.Provider("fast", torch.float32, sleeper(0.002)),
                         harness.Provider("broken", torch.float32,
                                          lambda mode: (_ for _ in ()).throw(ValueError("no"))),
                         harness.Provider("torch.compile of slow", torch.float32, sleeper(0.01))],
                        modes=("fwd",))
    assert case.providers[-1].compiled and not case.providers[0].compiled
    monkeypatch.delenv("VARFORMER_BENCH_SMOKE", raising=False)
    assert case.n_measurements() == 4
    monkeypatch.setenv("VARFORMER_BENCH_SMOKE", "1")     # smoke: no compiled providers
    assert case.n_measurements() == 3
    lines = []
    rows = harness.run_case(case, "cpu", quick=True, log=lines.append)
    assert len(rows) == len(lines) == 3
    slow, fast, broken = rows
    assert slow.ms >= 20 and fast.ms < slow.ms and fast.speedup > 2 and slow.speedup == 1
    assert math.isnan(broken.ms) and broken.note == "ValueError: no"
    assert fast.tflops == pytest.approx(2e6 / (fast.ms * 1e-3) / 1e12)
    assert fast.flop_peak > 0 and fast.roofline > 0


def _drifting_case(clock):
    """Two providers on a fake clock whose machine slows down over time (a call costs
    ``cost * (1 + t)``): the baseline is 10x the other at any one moment."""
    def make(cost):
        def fn():
            clock[0] += cost * (1 + clock[0])
        return lambda mode: (fn, None)
    return harness.Case("toy", "drift", lambda m: 1e6, lambda m, dt: 1e6,
                        [harness.Provider("slow", torch.float32, make(0.02), baseline=True),
                         harness.Provider("fast", torch.float32, make(0.002))], modes=("fwd",))


@pytest.mark.parametrize("rounds", [1, 3, 5])
def test_interleaved_rounds_pair_each_ratio_in_time(monkeypatch, rounds):
    """On a machine that slows down during the run, timing one provider after the other
    credits the baseline with the faster machine (a ratio near 6 instead of 10); interleaved
    rounds pair each ratio in time and come within 15% of it, with every provider timed in
    every round and at least 3 calls in all."""
    import types
    monkeypatch.delenv("VARFORMER_BENCH_SMOKE", raising=False)
    harness.cpu_peaks()         # measured (and cached) on the real clock
    clock = [0.0]
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []
    real = harness._cpu_times
    monkeypatch.setattr(harness, "_cpu_times",
                        lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    lines = []
    slow, fast = harness.run_case(_drifting_case(clock), "cpu", quick=True, rounds=rounds,
                                  log=lines.append)
    assert len(lines) == 2 and slow.speedup == 1 and slow.ms > 10 * fast.ms * 0.5
    if rounds == 1:
        assert fast.speedup < 7
    else:
        assert 8.5 < fast.speedup < 11.5
        assert len(calls) == 2 * rounds                     # each provider once per round
        assert calls[0] is not calls[2] or rounds == 1      # the order rotates


def _tailed_case(clock, n):
    """On a fake clock: the baseline's calls take 1 ms, but every fifth 100 ms (a descheduled
    thread); the other provider's always 3 ms. Medians say 0.33x, throughput says ~7x. n[0]
    counts the baseline's calls, n[1] the other's."""

    def tailed():
        n[0] += 1
        clock[0] += 0.1 if n[0] % 5 == 0 else 0.001

    def steady():
        n[1] += 1
        clock[0] += 0.003
    return harness.Case("toy", "tail", lambda m: 1e6, lambda m, dt: 1e6,
                        [harness.Provider("tailed", torch.float32, lambda mode: (tailed, None),
                                          baseline=True),
                         harness.Provider("steady", torch.float32, lambda mode: (steady, None))],
                        modes=("fwd",))


@pytest.mark.parametrize("rounds", [1, 3])
def test_mean_statistic_compares_throughput_with_every_call_of_the_budget(monkeypatch, rounds):
    """stat="mean" (bench --load): ratios of mean times, calls until the budget is spent (more
    than the median's cap of 50); the median statistic on the same case says the opposite."""
    import types
    monkeypatch.delenv("VARFORMER_BENCH_SMOKE", raising=False)
    harness.cpu_peaks()
    clock, n = [0.0], [0, 0]
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    tailed, steady = harness.run_case(_tailed_case(clock, n), "cpu", quick=True, rounds=rounds,
                                      log=lambda s: None)
    assert steady.speedup == pytest.approx(1 / 3, rel=0.05) and n[1] < 60   # capped
    n[:] = [0, 0]
    tailed, steady = harness.run_case(_tailed_case(clock, n), "cpu", quick=True, rounds=rounds,
                                      log=lambda s: None, stat="mean")
    assert tailed.mean_ms == pytest.approx(20.8, rel=0.1) and tailed.ms == pytest.approx(1.0)
    assert steady.mean_ms == pytest.approx(3.0) and steady.speedup == pytest.approx(6.9, rel=0.15)
    assert n[1] >= 300                 # the whole 1 s budget of 3 ms calls, past the cap
    table = harness.markdown([tailed, steady], "cpu")
    assert "| mean ms |" in table.splitlines()[0].replace("(p20–p80) |", "|")
    with pytest.raises(ValueError, match="stat must be 'median' or 'mean'"):
        harness.run_case(_tailed_case(clock, n), "cpu", stat="p50")


def test_interleaved_rounds_keep_a_failing_provider_a_result(monkeypatch):
    """A provider that raises while being timed in round 2 is a row with its error, the
    others are unaffected."""
    monkeypatch.delenv("VARFORMER_BENCH_SMOKE", raising=False)
    n = [0]

    def flaky(mode):
        def fn():
            n[0] += 1
            if n[0] > 3:
                raise RuntimeError("went away")
        return fn, None
    case = harness.Case("toy", "n=1", lambda m: 1e6, lambda m, dt: 1e6,
                        [harness.Provider("base", torch.float32,
                                          lambda mode: ((lambda: time.sleep(0.001)), None),
                                          baseline=True),
                         harness.Provider("flaky", torch.float32, flaky)], modes=("fwd",))
    base, bad = harness.run_case(case, "cpu", quick=True, rounds=3, log=lambda s: None)
    assert base.ms > 0 and base.speedup == 1
    assert math.isnan(bad.ms) and math.isnan(bad.speedup) and bad.note == "RuntimeError: went away"


def test_timing_line_names_the_method():
    assert "interleaved in 3 rounds" in harness.timing_line("cpu", 3, True)
    assert "one implementation after the other" in harness.timing_line("cpu", 1, False)
    assert "do_bench" in harness.timing_line("cuda", 3, False)
    assert "SMOKE" in harness.timing_line("cpu", 3, True, smoke=True)
    assert "ratio of medians" in harness.timing_line("cpu", 3, True)
    assert "ratio of means" in harness.timing_line("cpu", 3, True, stat="mean")
    assert "no cap" in harness.timing_line("cpu", 1, True, stat="mean")


# ------------------------------------------------------------------------------ the CLI


def test_bench_rejects_bad_arguments(capsys):
    assert cli.main(["bench", "--device", "cpu", "--load", "-1"]) == 2
    assert "--load must be 0 or more" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--dtype", "fp8"]) == 2
    assert "--dtype expects" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err


def _busy_children_of(pid):
    """Live busy processes started by ``pid`` (their command line names it as parent)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"hashlib.sha256(buf)" in b" ".join(argv) and str(pid).encode() in argv and \
                _alive(int(d)):
            out.append(int(d))
    return out


def test_bench_smoke_run_end_to_end(tmp_path):
    """`VARFORMER_BENCH_SMOKE=1 varformer bench --quick` runs every op once, prints the
    metadata, one table and summary per op, numbered lines on stderr, writes CSV/markdown/PNG,
    and leaves no busy process behind."""
    env = dict(os.environ, VARFORMER_BENCH_SMOKE="1")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "varformer", "bench", "--quick", "--device",
                             "cpu", "--threads", "1", "--load", "1", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    for key in ("date", "device", "cpu", "isa", "threads", "load", "loadavg", "cpu_peak",
                "torch", "triton", "command"):
        assert f"\n- {key}: " in stdout
    assert "\n- threads: 1\n" in stdout
    assert "\n- load: --load 1 (1 processes x 1 busy threads)\n" in stdout
    assert f"- torch: {torch.__version__}" in stdout
    limits = harness.isa_limits()                # the suite may run under ISA narrowing
    assert f"- command: `{limits + ' ' if limits else ''}VARFORMER_BENCH_SMOKE=1 varformer " \
           "bench --device cpu --threads 1 --load 1 --out" in stdout
    assert "machine load during the run: load average" in stdout
    for op in cli.OPS:
        assert f"\n## {op}\n" in stdout
        assert f"\n## {op}: " in "\n" + stderr   # stderr section header
    for op in ("mediator_attention", "window_attention", "vq_lookup", "vq_quantize", "model"):
        assert f"\nsummary {op} — geometric-mean speed-up vs " in stdout
        assert f"| {op} |" in stdout
    table_rows = [ln for ln in stdout.splitlines() if ln.startswith("| ")
                  and not ln.startswith("| op ")]
    numbered = [ln for ln in stderr.splitlines() if ln.startswith("[")]
    assert len(numbered) == len(table_rows) > 10
    assert numbered[0].startswith(f"[ 1/{len(numbered)}] ")
    assert numbered[-1].startswith(f"[{len(numbered)}/{len(numbered)}] ")
    assert "\x1b[K" not in stderr                # no bar when stderr is not a terminal
    for op in cli.OPS:
        assert (out / f"{op}_cpu.png").stat().st_size > 10_000
        rows = list(csv.DictReader(open(out / f"{op}_cpu.csv")))
        assert rows and all(r["threads"] == "1" and r["cpu"] and r["isa"] for r in rows)
        assert all(float(r["ms"]) > 0 for r in rows)
    md = (out / "bench_cpu.md").read_text()
    if harness._fma_peak_op() is not None:      # the extension measures the FMA peak
        assert "- cpu_peak: measured " in md and "; est. " in md
        assert all(r["cpu_peak_gflops_measured"] != "-" for r in rows)
    else:
        assert "- cpu_peak: est." in md
    assert all(float(r["cpu_peak_gflops_est"]) > 0 for r in rows)
    assert "- load: --load 1" in md and "summary model" in md
    assert _busy_children_of(proc.pid) == []


def test_bench_ctrl_c_stops_cleanly_and_kills_the_load():
    """Ctrl-C in the middle of a run: one line, exit code 130, no traceback, no busy process."""
    env = dict(os.environ, VARFORMER_BENCH_SMOKE="1")
    proc = subprocess.Popen([sys.executable, "-m", "varformer", "bench", "--device", "cpu",
                             "--op", "model", "--threads", "1", "--load", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)
    try:
        for line in proc.stdout:                 # the header comes once the load is running
            if line.startswith("- command:"):
                break
        busy = _busy_children_of(proc.pid)
        assert len(busy) == 1
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "varformer bench: interrupted during model after" in stderr
    assert "Traceback" not in stderr
    assert _wait_gone(busy) == []
