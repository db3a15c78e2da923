"""Benchmark harness shared by every op (installed as ``varformer.benchmarks.harness``).

* time: CUDA — ``triton.testing.do_bench`` (CUDA events, median and p20/p80, gradients reset
  between runs); CPU — wall-clock median, p20/p80 and mean over repeated calls, by default in
  interleaved rounds (``run_case(rounds=)``), speed-ups the median of per-round ratios of
  medians, or on a loaded machine (``stat="mean"``) of means over each round's whole budget.
* peak memory: CUDA — ``max_memory_allocated`` above what was allocated before the call; CPU —
  the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  above the resident size before the call, the least of three calls (one call when quick).
* achieved FLOP/s and GB/s from per-op counts, the fraction of the FLOP peak, and the fraction
  of the roofline: the ideal time max(FLOPs / peak FLOP/s, bytes / peak bandwidth) over the
  measured time. Peaks: a table of measured GPUs; on CPU the FMA peak measured by a C++ loop of
  independent FMA chains (``measured_fma_peak_gflops``; where the extension lacks it, the
  estimate from ``/proc/cpuinfo``, ``cpu_info``) and a measured copy bandwidth, both measured
  before any background load starts.
* machine state: ``cpu_info`` (model, ISA, threads, load average), ``BackgroundLoad`` (busy
  processes for reproducing a loaded machine), ``metadata`` (what every table states).
* results: CSV rows, a markdown table, a one-line summary per op, one plot per bench module
  (matplotlib, optional).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch


# ------------------------------------------------------------------------------ machine peaks
@dataclasses.dataclass
class Peaks:
    """Per-device ceilings: bytes/s and FLOP/s per compute dtype."""
    name: str
    bandwidth: float
    flops: dict

    def ideal_seconds(self, flops: float, nbytes: float, dtype: torch.dtype) -> float:
        return max(flops / self.flops[dtype], nbytes / self.bandwidth)


# Measured on this project's lent machines where noted in benchmarks/results; datasheet otherwise.
_GPU_PEAKS = {
    # device-to-device copy ~3.0 TB/s, bf16 GEMM ~798 TFLOP/s measured on an H100 80GB HBM3;
    # TF32 ~half of bf16 (datasheet ratio), fp32 FMA 67 TFLOP/s (datasheet)
    "H100": Peaks("H100", 3.0e12, {torch.bfloat16: 798e12, torch.float16: 798e12,
                                   torch.float32: 67e12}),
    # H200: ~4.3 TB/s copy, ~790 TFLOP/s bf16 measured
    "H200": Peaks("H200", 4.3e12, {torch.bfloat16: 790e12, torch.float16: 790e12,
                                   torch.float32: 67e12}),
}


# ------------------------------------------------------------------------------ CPU model
# ISA extensions worth stating next to a CPU number, in the order they are listed.
_ISA_ORDER = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_bf16", "amx_tile", "avx_vnni", "avx2", "fma", "avx", "sse4_2", "asimd", "sve")
FMA_UNITS_ASSUMED = 2     # FMA pipes per core: two on recent x86 server/desktop cores


def _int_field(val) -> int | None:
    try:
        return int(str(val).strip())
    except ValueError:
        return None


def parse_cpuinfo(text: str) -> dict:
    """Facts from ``/proc/cpuinfo`` text: ``model`` (the model name), ``vendor``, ``flags``
    (set), ``family`` and ``model_number`` (the 'cpu family' and 'model' numbers, None where
    absent), and one dict per processor (``processor``, ``physical id``, ``core id``,
    ``cpu MHz``, ``bogomips``)."""
    procs, cur = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if cur:
                procs.append(cur)
                cur = {}
            continue
        key, _, val = line.partition(":")
        cur[key.strip().lower()] = val.strip()
    first = procs[0] if procs else {}
    flags = set((first.get("flags") or first.get("features") or "").split())
    model = first.get("model name") or first.get("cpu model") or first.get("hardware") or ""
    return {"model": model, "vendor": first.get("vendor_id", ""), "flags": flags,
            "family": _int_field(first.get("cpu family", "")),
            "model_number": _int_field(first.get("model", "")), "processors": procs}


def _zen1(vendor: str, family: int | None, model: int | None) -> bool:
    """AMD Zen / Zen+ (family 0x17, model < 0x30) and Hygon's Zen-based Dhyana (family 0x18):
    a 128-bit FP datapath, 256-bit AVX ops issue as two halves."""
    if family is None or model is None:
        return False
    return ((vendor == "AuthenticAMD" and family == 0x17 and model < 0x30)
            or (vendor == "HygonGenuine" and family == 0x18))


def simd_fp32_lanes(flags, vendor: str = "", family: int | None = None,
                    model: int | None = None) -> tuple[int, str]:
    """(fp32 lanes per FMA instruction, ISA name): avx512f → 16, avx2 + fma → 8, avx → 8
    (no FMA), sse → 4, NEON (asimd) → 4. AMD's first AVX-512 cores (Zen 4: no
    ``avx512_vp2intersect``) execute 512-bit FMAs as two 256-bit halves: counted as 8 lanes.
    AMD Zen / Zen+ (``family`` 0x17 with ``model`` < 0x30, the 'cpu family' and 'model' numbers
    of /proc/cpuinfo) execute 256-bit AVX ops as two 128-bit halves: counted as 4 lanes (Zen 2,
    model 0x31 and up, has a 256-bit datapath)."""
    flags = set(flags)
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and "avx512_vp2intersect" not in flags:
            return 8, "avx512 (2x256-bit datapath)"
        return 16, "avx512"
    if "avx2" in flags and "fma" in flags:
        if _zen1(vendor, family, model):
            return 4, "avx2+fma (2x128-bit datapath)"
        return 8, "avx2+fma"
    if "avx" in flags:
        return 8, "avx (no fma)"
    if "asimd" in flags:
        return 4, "neon"
    return 4, "sse"


def _ghz(parsed: dict, procs: list, sys_root: str = "/sys/devices/system/cpu") -> tuple[float, str]:
    """Estimated core clock: cpufreq's maximum, else the largest ``cpu MHz``, else the clock in
    the model name (``@ 2.60GHz``), else bogomips / 2. Returns (GHz, where it came from)."""
    try:
        with open(os.path.join(sys_root, "cpu0", "cpufreq", "cpuinfo_max_freq")) as f:
            return int(f.read().strip()) / 1e6, "cpufreq max"
    except (OSError, ValueError):
        pass
    mhz = [float(p["cpu mhz"]) for p in procs if p.get("cpu mhz", "").replace(".", "", 1).isdigit()]
    if mhz and max(mhz) > 0:
        return max(mhz) / 1e3, "cpuinfo 'cpu MHz'"
    m = re.search(r"@\s*([\d.]+)\s*GHz", parsed["model"])
    if m:
        return float(m.group(1)), "model name"
    bogo = [float(p["bogomips"]) for p in procs if p.get("bogomips")]
    if bogo:
        return max(bogo) / 2e3, "bogomips / 2"
    return float("nan"), "unknown"


def cpu_peak_model(text: str, cpus=None, threads: int | None = None,
                   fma_units: int = FMA_UNITS_ASSUMED, sys_root: str = "/sys/devices/system/cpu",
                   narrow: str = "") -> dict:
    """FP32 FMA peak estimated from ``/proc/cpuinfo`` text: cores × FMA units × SIMD lanes ×
    2 FLOP × GHz, counting the physical cores among ``cpus`` (logical CPU ids; default all) that
    ``threads`` threads can occupy (default: all of them). Returns ``model``, ``vendor``,
    ``family``, ``model_number``, ``isa`` (list), ``simd``, ``lanes``, ``fma_units``,
    ``logical_cpus``, ``cores``, ``cores_used``, ``ghz``, ``ghz_source``, ``peak_gflops_fp32``
    and ``peak_formula``. ``narrow`` (avx512 | avx2 | scalar) caps the lanes at that variant's,
    for runs narrowed by ``VARFORMER_CPU_ISA``."""
    parsed = parse_cpuinfo(text)
    procs = parsed["processors"]
    if cpus is not None:
        keep = {int(c) for c in cpus}
        procs = [p for p in procs if p.get("processor", "").isdigit()
                 and int(p["processor"]) in keep] or procs
    # a core is a (package, core id) pair; without those fields every logical CPU counts
    cores = {(p.get("physical id", "0"), p.get("core id", p.get("processor", str(i))))
             for i, p in enumerate(procs)}
    n_logical, n_cores = max(1, len(procs)), max(1, len(cores))
    used = n_cores if threads is None else max(1, min(int(threads), n_cores))
    lanes, simd = simd_fp32_lanes(parsed["flags"], parsed["vendor"], parsed["family"],
                                  parsed["model_number"])
    fma = "fma" in parsed["flags"] or simd in ("avx512", "avx512 (2x256-bit datapath)", "neon")
    ghz, source = _ghz(parsed, procs, sys_root)
    lane_text = str(lanes)
    if narrow and _LANES[narrow] < lanes:
        lanes = _LANES[narrow]
        lane_text = f"{lanes} ({narrow})"
    per_cycle = fma_units * lanes * (2 if fma else 1)
    peak = used * per_cycle * ghz
    formula = (f"{used} cores x {fma_units} FMA units x {lane_text} lanes x "
               f"{2 if fma else 1} FLOP x {ghz:.2f} GHz ({source})")
    return {"model": parsed["model"] or platform.processor() or platform.machine(),
            "vendor": parsed["vendor"], "family": parsed["family"],
            "model_number": parsed["model_number"],
            "isa": [f for f in _ISA_ORDER if f in parsed["flags"]], "simd": simd,
            "lanes": lanes, "fma_units": fma_units, "logical_cpus": n_logical, "cores": n_cores,
            "cores_used": used, "ghz": ghz, "ghz_source": source, "peak_gflops_fp32": peak,
            "peak_formula": formula}


_BANDWIDTH: dict = {}


def memory_bandwidth_gbs(mib: int = 128) -> float:
    """Copy bandwidth of this process (GB/s, read + write bytes) at torch's thread count: best
    of five copies of a ``mib``-MiB buffer; measured once per process and thread count."""
    key = (torch.get_num_threads(), mib)
    if key not in _BANDWIDTH:
        n = mib * 2**20 // 4
        src, dst = torch.ones(n), torch.empty(n)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        del src, dst
        _BANDWIDTH[key] = 2 * n * 4 / best / 1e9
    return _BANDWIDTH[key]


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_FMA_PEAK: dict = {}    # (threads, variant) -> (GFLOP/s or None, variant or why not measured)
FMA_PEAK_SECONDS = 0.3  # one measurement's length (best of 5 repeats inside the C++ loop)
FMA_PEAK_TRIES = 3      # measurements 0.1 s apart, the best kept (a shared host's bursts)

# variables that make this process run narrower code than the CPU could (our kernels, ATen's
# vectorised ops, MKL, oneDNN): tables name them, and the roofline follows VARFORMER_CPU_ISA
ISA_LIMIT_VARS = ("VARFORMER_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                  "ONEDNN_MAX_CPU_ISA")
_LANES = {"avx512": 16, "avx2": 8, "scalar": 1}


def isa_limits() -> str:
    """The ISA-narrowing variables set in this process, "VAR=value ...", or "" for none."""
    return " ".join(f"{k}={os.environ[k]}" for k in ISA_LIMIT_VARS if os.environ.get(k))


def isolate_inductor_cache() -> str:
    """Where ``ATEN_CPU_CAPABILITY`` is set and ``TORCHINDUCTOR_CACHE_DIR`` is not, points the
    latter at a folder of its own for that capability and returns it ("" otherwise). torch 2.13's
    on-disk compile cache does not tell capabilities apart: a graph compiled at the default and
    reused under ``ATEN_CPU_CAPABILITY=avx2`` returned NaN and 1e35 values, and a default run
    after an avx2 one aborted with a heap corruption. Call before anything is compiled."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if not cap or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return ""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        base = default_cache_dir()
    except Exception:   # another torch layout
        base = os.path.join(tempfile.gettempdir(), "torchinductor")
    path = base + "_aten_" + re.sub(r"[^A-Za-z0-9_.-]", "_", cap)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def _fma_isa_request() -> str:
    """The FMA loop's variant: VARFORMER_CPU_ISA's (baseline = scalar) where it narrows the
    kernels, so that the peak is that of the code measured; else "" (the widest)."""
    v = os.environ.get("VARFORMER_CPU_ISA", "").strip().lower()
    return {"avx512": "avx512", "avx2": "avx2", "baseline": "scalar"}.get(v, "")


def _fma_peak_op():
    """The extension's ``fma_peak_gflops`` op, or None where the extension is unavailable or
    lacks it (builds the extension on first use)."""
    try:
        from varformer.ops import _ext
        if not _ext.cpu_status()[0]:
            return None
        return torch.ops.varformer_ext.fma_peak_gflops
    except Exception:
        return None


def _fma_peak_isa() -> str:
    try:
        return str(torch.ops.varformer_ext.fma_peak_isa())
    except Exception:
        return "?"


def _fma_threads(threads: int | None) -> int:
    threads = torch.get_num_threads() if threads is None else int(threads)
    return max(1, min(threads, _affinity_cpus()))


def measured_fma_peak_gflops(threads: int | None = None) -> float | None:
    """FP32 FMA peak measured on this machine (GFLOP/s): the C++ extension's loop of 12
    independent FMA chains per thread (AVX-512, AVX2+FMA or scalar, the widest the CPU runs) on
    ``threads`` threads (default torch's count; at most the CPUs this process may use), best of
    5 repeats in each of ``FMA_PEAK_TRIES`` measurements of ``FMA_PEAK_SECONDS``; the variant
    ``VARFORMER_CPU_ISA`` names where it is set. Measured once per thread count and variant
    and cached, so call it before starting a ``BackgroundLoad``. None where the extension
    lacks the op."""
    key = (_fma_threads(threads), _fma_isa_request())
    if key not in _FMA_PEAK:
        op = _fma_peak_op()
        if op is None:
            _FMA_PEAK[key] = (None, "")
        else:
            try:
                best = 0.0
                for i in range(FMA_PEAK_TRIES):   # a neighbour's burst must not set the peak
                    if i:
                        time.sleep(0.1)
                    best = max(best, float(op(key[0], FMA_PEAK_SECONDS, key[1])))
                _FMA_PEAK[key] = (best, key[1] or _fma_peak_isa())
            except Exception as exc:   # e.g. an older build of the op
                _FMA_PEAK[key] = (None, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return _FMA_PEAK[key][0]


def cpu_info(threads: int | None = None, bandwidth: bool = False, measure: bool = True) -> dict:
    """This machine's CPU: ``model``, ``isa`` (list of extension flags), ``simd``, ``threads``
    (torch's thread count unless given), ``cores``, ``loadavg`` (1/5/15 min), the estimated
    ``peak_gflops_fp32`` for those threads (see ``cpu_peak_model``; ``peak_formula`` says how),
    the measured ``peak_gflops_measured`` (``measured_fma_peak_gflops``; None where the
    extension lacks it or ``measure=False``) with ``peak_measured_how`` (the loop's variant and
    thread count) and, with ``bandwidth=True``, the measured copy ``bandwidth_gbs``."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    narrow = _fma_isa_request()
    info = cpu_peak_model(text, cpus, threads, narrow=narrow)   # the code that runs
    info["isa_limits"] = isa_limits()
    info["threads"] = threads
    info["loadavg"] = loadavg()
    info["peak_gflops_measured"] = measured_fma_peak_gflops(threads) if measure else None
    info["peak_measured_how"] = ""
    if info["peak_gflops_measured"] is not None:
        n = _fma_threads(threads)
        info["peak_measured_how"] = (f"FMA loop, {_FMA_PEAK[(n, narrow)][1]}, {n} thread"
                                     f"{'s' if n != 1 else ''}")
    if bandwidth:
        info["bandwidth_gbs"] = memory_bandwidth_gbs()
    return info


def cpu_peaks(threads: int | None = None) -> Peaks:
    """Roofline ceilings of this CPU: the measured FMA peak, else the estimate (fp64 at half
    rate; bf16/fp16 counted at the fp32 rate, as the CPU paths compute in fp32), and the
    measured copy bandwidth. Both measurements are cached per thread count: call this before a
    ``BackgroundLoad`` starts so that the ceilings are the quiet machine's."""
    info = cpu_info(threads, bandwidth=True)
    measured = info["peak_gflops_measured"]
    p = (measured if measured is not None else info["peak_gflops_fp32"]) * 1e9
    return Peaks(f"{info['model']} ({info['simd']})", info["bandwidth_gbs"] * 1e9,
                 {torch.float32: p, torch.float64: p / 2, torch.bfloat16: p, torch.float16: p})


def device_peaks(device: str) -> Peaks | None:
    """Ceilings for the roofline column: the CPU model below on CPU, the table above on CUDA
    (None for an unknown GPU)."""
    if device != "cuda":
        return cpu_peaks()
    name = torch.cuda.get_device_name()
    for key, peaks in _GPU_PEAKS.items():
        if key in name:
            return peaks
    return None


def describe_device(device: str) -> str:
    """One line naming the device the numbers are for."""
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs)"
    info = cpu_info(measure=False)
    narrow = _fma_isa_request()
    narrowed = f", narrowed to {narrow}" if narrow else ""
    return f"CPU {info['model']} ({info['simd']}{narrowed}), {info['threads']} threads"


# ------------------------------------------------------------------------------ run settings
def smoke() -> bool:
    """``VARFORMER_BENCH_SMOKE=1``: one tiny case per op, one repetition (end-to-end tests)."""
    return os.environ.get("VARFORMER_BENCH_SMOKE", "").strip() not in ("", "0")


# ------------------------------------------------------------------------------ measurement
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"{field}:\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS so that the next call's peak shows in VmHWM."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def peak_memory_mb(fn: Callable[[], object], device: str, calls: int = 3) -> float:
    """Peak memory of one call above what was live before it (MB); on CPU the least over
    ``calls`` calls."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    peaks = []
    for _ in range(max(1, calls)):   # resident-set peaks vary with the allocator's state
        _malloc_trim()
        if not _reset_hwm():
            return float("nan")
        base = _rss_kb("VmRSS")
        fn()
        peaks.append(max(0, _rss_kb("VmHWM") - base) / 1024)
        gc.collect()
    return min(peaks)


def _cpu_times(fn, grad_to_none, budget_s: float, min_calls: int, max_calls: int | None = 50):
    """Wall-clock milliseconds of repeated calls of ``fn``: at least ``min_calls``, then as
    many as fit in ``budget_s`` seconds, at most ``max_calls`` (None: no cap); gradients reset
    between."""
    max_calls = max_calls if max_calls is not None else 1 << 62
    times, t_end = [], time.perf_counter() + budget_s
    while len(times) < min_calls or (time.perf_counter() < t_end and len(times) < max_calls):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _stats(times) -> tuple:
    """(median, p20, p80) of a list of times."""
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def time_ms(fn: Callable[[], object], device: str, grad_to_none=None, quick=False,
            reps: int | None = None, warmup: bool = True, max_calls: int | None = 50):
    """(median, p20, p80, mean) milliseconds of ``fn`` (mean: CPU only, NaN on CUDA). CPU:
    after one warm-up call (unless ``warmup=False``), at least three calls and as many as fit
    in 1 s (quick) / 5 s, at most ``max_calls`` (None: no cap); ``reps`` fixes the number of
    calls instead."""
    if device == "cuda":
        from triton.testing import do_bench
        if reps is not None:
            return (*do_bench(fn, warmup=1, rep=1, grad_to_none=grad_to_none,
                              quantiles=[0.5, 0.2, 0.8]), float("nan"))
        med, p20, p80 = do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                 grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80, float("nan")
    if warmup:
        fn()
    if reps is not None:
        ts = _cpu_times(fn, grad_to_none, 0.0, reps, reps)
    else:
        ts = _cpu_times(fn, grad_to_none, 1.0 if quick else 5.0, 3, max_calls)
    return (*_stats(ts), statistics.fmean(ts))


# ------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Provider:
    """One implementation of an op for one shape.

    ``make(mode)`` builds inputs and returns (callable, tensors-with-grad); mode is "fwd" or
    "fwd+bwd". ``baseline`` marks the implementation speed-ups are measured against.
    ``compiled`` marks a ``torch.compile`` provider (default: "compile" in its name), whose
    compile time would dominate a smoke run: ``VARFORMER_BENCH_SMOKE=1`` leaves those out."""
    name: str
    dtype: torch.dtype
    make: Callable[[str], tuple]
    baseline: bool = False
    compiled: bool | None = None

    def __post_init__(self):
        if self.compiled is None:
            self.compiled = "compile" in self.name.lower()


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    flops: Callable[[str], float]       # mode -> FLOPs of one call
    nbytes: Callable[[str, torch.dtype], float]  # (mode, dtype) -> minimal bytes of one call
    providers: list
    modes: tuple = ("fwd", "fwd+bwd")

    def n_measurements(self, modes=None) -> int:
        """How many (mode, provider) measurements ``run_case`` makes."""
        return len(modes or self.modes) * len(self.run_providers())

    def run_providers(self) -> list:
        """The providers ``run_case`` measures: all, or without compiled ones in smoke runs."""
        return [p for p in self.providers if not (smoke() and p.compiled and not p.baseline)]


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    mode: str
    provider: str
    dtype: str
    ms: float
    p20: float
    p80: float
    peak_mb: float
    tflops: float
    gbps: float
    roofline: float
    speedup: float
    vs_fp32: float = float("nan")
    note: str = ""
    baseline: bool = False
    flop_peak: float = float("nan")     # achieved FLOP/s over the device's peak FLOP/s
    mean_ms: float = float("nan")       # CPU: mean time per call (the throughput's inverse)


class Log:
    """Numbered lines for a benchmark run on ``stream`` (stderr by default), with a progress bar
    over the ``total`` measurements below them (``varformer._progress.Progress``: drawn only
    when the stream is a TTY)."""

    def __init__(self, total: int, stream=None, desc: str = "bench", enabled=None,
                 widths: tuple = (34, 24)):
        from varformer._progress import Progress
        self.stream = sys.stderr if stream is None else stream
        self.total, self.i = total, 0
        self.widths = widths          # of the shape and provider columns, as in run_case
        self.progress = Progress(total, desc, self.stream, enabled=enabled, min_interval=0.0)

    @property
    def columns(self) -> str:
        """The column names, aligned with ``run_case``'s lines."""
        ws, wp = self.widths
        return (f"{'#':>{2 * len(str(self.total)) + 3}} {'shape':<{ws}} {'mode':<8} "
                f"{'provider':<{wp}} {'dtype':<8} {'median':>12}  {'peak mem':>12}  note")

    def write(self, text: str) -> None:
        if self.progress.enabled:
            text = "\r\x1b[K" + text      # over the bar; the next update draws it again
        self.stream.write(text + "\n")
        self.stream.flush()

    def header(self, text: str) -> None:
        """An unnumbered heading line followed by the column names."""
        self.write(text)
        self.write(self.columns)

    def measurement(self, text: str) -> None:
        """One numbered line per measurement; advances the bar."""
        self.i += 1
        width = len(str(self.total))
        self.write(f"[{self.i:>{width}}/{self.total}] {text}")
        self.progress.update()

    def close(self) -> None:
        self.progress.close()


def line_widths(cases) -> tuple:
    """(shape, provider) column widths that fit every line of ``cases``."""
    cases = list(cases)
    return (max([34] + [len(c.shape) for c in cases]),
            max([24] + [len(p.name) for c in cases for p in c.providers]))


def _prepare(prov: "Provider", mode: str, device: str, calls: int):
    """(fn, grads, peak MB, note) of one provider: built, warmed up (one-time allocations,
    thread pools, compilation stay out of the timing) and its peak memory measured; an
    exception (an OOM, an unsupported baseline) is a result: (None, None, nan, its line)."""
    try:
        fn, grads = prov.make(mode)
        fn()
        # peak memory: least of ``calls`` calls; the calls also warm the timing
        return fn, grads, peak_memory_mb(fn, device, calls=calls), ""
    except Exception as exc:
        return None, None, float("nan"), _error_note(exc)
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _error_note(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def run_case(case: Case, device: str, modes=None, quick=False,
             log: Callable[[str], None] = print, widths: tuple = (34, 24),
             rounds: int = 1, stat: str = "median") -> list[Row]:
    """Measure every provider of ``case`` in every mode; ``log`` gets one line per measurement
    (shape and provider padded to ``widths``). Speed-ups are against the baseline provider of
    the same dtype (and of fp32).

    ``rounds`` > 1 (CPU): the providers of a mode are built together and timed in that many
    interleaved rounds, in an order rotated each round, each round with its share of the time
    budget and calls (at least ceil(3 / rounds) calls). Times are over all rounds; a speed-up
    is the median over rounds of the baseline's round median over the provider's, so that a
    machine whose speed drifts (a shared host) shifts both sides of each ratio alike.

    ``stat="mean"`` (CPU; ``varformer bench --load``): every round uses its whole time budget
    (no cap on the calls) and ratios are of mean times per call, i.e. of throughput. On an
    oversubscribed machine a call's time has a long tail (a descheduled thread holds up a
    whole parallel region for a time slice) that a median of a few dozen calls does not see."""
    if stat not in ("median", "mean"):
        raise ValueError(f"run_case: stat must be 'median' or 'mean', got {stat!r}")
    by_mean = stat == "mean" and device != "cuda"
    center = statistics.fmean if by_mean else statistics.median
    peaks = device_peaks(device)
    modes = modes or case.modes
    tiny = smoke()
    interleave = device != "cuda" and rounds > 1 and not tiny
    calls = 1 if tiny or quick else 3
    rows = []
    for mode in modes:
        provs = case.run_providers()
        results = {}        # provider index -> (ms, p20, p80, peak, note, seconds, round meds)
        if interleave:
            prepared, took = [], [0.0] * len(provs)
            for i, prov in enumerate(provs):
                t0 = time.perf_counter()
                prepared.append(list(_prepare(prov, mode, device, calls)))
                took[i] += time.perf_counter() - t0
            samples = [[] for _ in provs]
            meds = [[] for _ in provs]
            budget = (1.0 if quick else 5.0) / rounds
            for r in range(rounds):
                for k in range(len(provs)):
                    i = (k + r) % len(provs)
                    fn, grads, _, note = prepared[i]
                    if fn is None:
                        continue
                    t0 = time.perf_counter()
                    try:
                        ts = _cpu_times(fn, grads, budget, -(-3 // rounds),
                                        None if by_mean else max(1, 50 // rounds))
                    except Exception as exc:
                        prepared[i][0], prepared[i][3] = None, _error_note(exc)
                        samples[i], meds[i] = [], []
                        continue
                    finally:
                        took[i] += time.perf_counter() - t0
                    samples[i] += ts
                    meds[i].append(center(ts))
            for i in range(len(provs)):
                fn, grads, peak, note = prepared[i]
                ms, p20, p80 = _stats(samples[i]) if samples[i] else (float("nan"),) * 3
                mean = statistics.fmean(samples[i]) if samples[i] else float("nan")
                if not samples[i]:
                    peak = float("nan")
                results[i] = (ms, p20, p80, peak, note, took[i], meds[i], mean)
            del prepared
            gc.collect()
        mode_rows = []
        for i, prov in enumerate(provs):
            if interleave:
                ms, p20, p80, peak, note, took, _, mean = results[i]
            else:
                t_start = time.perf_counter()
                fn, grads, peak, note = _prepare(prov, mode, device, calls)
                ms = p20 = p80 = mean = float("nan")
                if fn is not None:
                    try:
                        ms, p20, p80, mean = time_ms(fn, device, grads, quick,
                                                     reps=1 if tiny else None, warmup=False,
                                                     max_calls=None if by_mean else 50)
                    except Exception as exc:
                        note, peak = _error_note(exc), float("nan")
                del fn, grads
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                took = time.perf_counter() - t_start
            fl, nb = case.flops(mode), case.nbytes(mode, prov.dtype)
            ok = ms == ms and ms > 0
            tfl = fl / (ms * 1e-3) / 1e12 if ok else float("nan")
            gbs = nb / (ms * 1e-3) / 1e9 if ok else float("nan")
            known = peaks is not None and prov.dtype in peaks.flops
            roof = peaks.ideal_seconds(fl, nb, prov.dtype) / (ms * 1e-3) if known and ok \
                else float("nan")
            fpk = tfl * 1e12 / peaks.flops[prov.dtype] if known else float("nan")
            row = Row(case.op, case.shape, mode, prov.name, str(prov.dtype).replace("torch.", ""),
                      ms, p20, p80, peak, tfl, gbs, roof, float("nan"), note=note,
                      baseline=prov.baseline, flop_peak=fpk, mean_ms=mean)
            mode_rows.append(row)
            log(f"{case.shape:<{widths[0]}} {mode:<8} {prov.name:<{widths[1]}} {row.dtype:<8} "
                f"{_f(ms, '9.3f'):>9} ms  {_f(peak, '9.1f'):>9} MB  ({took:.1f} s) {note}")
        base = {r.dtype: i for i, r in enumerate(mode_rows) if r.baseline}
        for i, r in enumerate(mode_rows):
            for attr, dt in (("speedup", r.dtype), ("vs_fp32", "float32")):
                b = base.get(dt)
                val = float("nan")
                if b is not None and r.ms == r.ms and mode_rows[b].ms == mode_rows[b].ms:
                    if interleave:
                        pairs = [x / y for x, y in zip(results[b][6], results[i][6]) if y > 0]
                        val = statistics.median(pairs) if pairs else float("nan")
                    elif by_mean:
                        val = mode_rows[b].mean_ms / r.mean_ms if r.mean_ms > 0 else float("nan")
                    else:
                        val = mode_rows[b].ms / r.ms
                setattr(r, attr, val)
        rows += mode_rows
    return rows


# ------------------------------------------------------------------------------ background load
_BUSY_CHILD = r"""
import ctypes, hashlib, os, signal, sys, threading
parent, n = int(sys.argv[1]), int(sys.argv[2])
try:                       # Linux: SIGKILL this process when the parent dies, however it dies
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() != parent:
    os._exit(0)
buf = os.urandom(1 << 20)
def spin():                # hashing a 1 MiB buffer releases the GIL: one busy core per thread
    while True:
        hashlib.sha256(buf).digest()
for _ in range(n - 1):
    threading.Thread(target=spin, daemon=True).start()
while True:                # this thread spins too and exits if the parent has gone
    for _ in range(64):
        hashlib.sha256(buf).digest()
    if os.getppid() != parent:
        os._exit(0)
"""


class BackgroundLoad:
    """``n`` background processes, each keeping ``threads`` threads busy (SHA-256 of a 1 MiB
    buffer in a loop, which holds a core per thread), for reproducing a busy machine.

    Use as a context manager; the processes are killed on exit, on exceptions and Ctrl-C, at
    interpreter exit (atexit), on SIGTERM to this process (while it is active in the main
    thread), and by the kernel if this process is killed outright (``PR_SET_PDEATHSIG``); each
    child also exits by itself when its parent is gone."""

    def __init__(self, n: int, threads: int | None = None):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"BackgroundLoad: n must be a non-negative int, got {n!r}")
        self.n = n
        self.threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
        self.procs: list = []
        self._old_term = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def describe(self) -> str:
        if not self.n:
            return "none"
        return f"--load {self.n} ({self.n} processes x {self.threads} busy threads)"

    def start(self) -> "BackgroundLoad":
        import atexit
        import signal
        import subprocess
        import threading
        atexit.register(self.stop)
        if self.n and threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise SystemExit(128 + signum)
            self._old_term = signal.signal(signal.SIGTERM, on_term)
        for _ in range(self.n):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", _BUSY_CHILD, str(os.getpid()), str(self.threads)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self

    def stop(self) -> None:
        import signal
        procs, self.procs = self.procs, []
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except Exception:
                pass
        if self._old_term is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_term)
            except ValueError:      # not in the main thread any more
                pass
            self._old_term = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def _proc_stat():
    """(busy, total) CPU seconds summed over all CPUs from ``/proc/stat``; None if unreadable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)      # idle + iowait
    total = sum(vals[:8])                                     # guest time is counted in user
    return (total - idle) / tick, total / tick


class LoadMeter:
    """How busy the machine was while we ran: the load average at the start and the end, and
    the CPU time other processes (``--load`` ones included) used, from ``/proc/stat`` minus
    this process's own CPU time, as a number of CPUs kept busy on average."""

    def __init__(self):
        self.start_loadavg = loadavg()
        self._stat = _proc_stat()
        self._own = _own_cpu_seconds()

    def other_cpus(self) -> float:
        """Average number of CPUs other processes kept busy since the start."""
        end = _proc_stat()
        if not self._stat or not end or end[1] <= self._stat[1]:
            return float("nan")
        ncpu = os.cpu_count() or 1
        wall_cpu = end[1] - self._stat[1]                 # CPU-seconds available in all
        other = (end[0] - self._stat[0]) - (_own_cpu_seconds() - self._own)
        return max(0.0, other) / wall_cpu * ncpu

    def describe(self) -> str:
        la0, la1 = self.start_loadavg, loadavg()
        return (f"load average (1 min) {la0[0]:.2f} at start, {la1[0]:.2f} at end; other "
                f"processes kept {_f(self.other_cpus(), '.2f')} of {os.cpu_count()} CPUs busy "
                f"on average during the run")


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------ output
_COLS = [f.name for f in dataclasses.fields(Row)]


def write_csv(rows: list[Row], path: str, meta: dict) -> None:
    """Append ``rows`` to ``path`` (header on creation), each row followed by ``meta``."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(_COLS + list(meta))
        for r in rows:
            w.writerow([getattr(r, c) for c in _COLS] + list(meta.values()))


def _f(x: float, fmt: str) -> str:
    return "-" if x != x else format(x, fmt)


def _pct(x: float) -> str:
    """A fraction as a percentage with two significant digits (``0.0031%``, ``7.7%``, ``85%``)."""
    return "-" if x != x else f"{100 * x:.2g}%"


def markdown(rows: list[Row], device: str | None = None) -> str:
    """Markdown table of ``rows``. FLOP/s are GFLOP/s on CPU, TFLOP/s on CUDA; columns with no
    value in any row (e.g. FLOP/s of the model) are left out, as is "vs eager fp32" where every
    row is fp32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    giga = device != "cuda"
    cols = [("op", lambda r: r.op), ("shape", lambda r: r.shape), ("mode", lambda r: r.mode),
            ("provider", lambda r: r.provider), ("dtype", lambda r: r.dtype),
            ("median ms (p20–p80)",
             lambda r: f"{_f(r.ms, '.3f')} ({_f(r.p20, '.3f')}–{_f(r.p80, '.3f')})"),
            ("mean ms", lambda r: _f(r.mean_ms, ".3f")),
            ("vs eager same dtype", lambda r: "-" if r.speedup != r.speedup
             else f"{r.speedup:.2f}×"),
            ("vs eager fp32", lambda r: "-" if r.vs_fp32 != r.vs_fp32 else f"{r.vs_fp32:.2f}×"),
            ("peak MB", lambda r: _f(r.peak_mb, ".1f")),
            ("GFLOP/s" if giga else "TFLOP/s",
             lambda r: _f(r.tflops * 1e3, ".3g") if giga else _f(r.tflops, ".2f")),
            ("% FLOP peak", lambda r: _pct(r.flop_peak)),
            ("GB/s", lambda r: _f(r.gbps, ".3g") if giga else _f(r.gbps, ".0f")),
            ("roofline", lambda r: _pct(r.roofline)),
            ("note", lambda r: r.note)]
    cells = [[fn(r) for _, fn in cols] for r in rows]
    keep = []
    for j, (name, _) in enumerate(cols):
        vals = [c[j] for c in cells]
        if j >= 6 and all(v in ("-", "") for v in vals):
            continue
        if name == "vs eager fp32" and all(r.dtype == "float32" for r in rows):
            continue
        keep.append(j)
    out = ["| " + " | ".join(cols[j][0] for j in keep) + " |",
           "|" + "---|" * len(keep)]
    out += ["| " + " | ".join(c[j] for j in keep) + " |" for c in cells]
    return "\n".join(out)


def _geomean(xs) -> float:
    xs = [x for x in xs if x == x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(rows: list[Row]) -> list[str]:
    """One line per op: the geometric-mean speed-up of each provider over its baseline (same
    dtype) per mode, over the shapes measured."""
    lines = []
    for op in dict.fromkeys(r.op for r in rows):
        op_rows = [r for r in rows if r.op == op]
        base = next((r.provider for r in op_rows if r.baseline), "the baseline")
        parts = []
        for mode in dict.fromkeys(r.mode for r in op_rows):
            provs = []
            for key in dict.fromkeys((r.provider, r.dtype) for r in op_rows
                                     if r.mode == mode and not r.baseline):
                sel = [r for r in op_rows if r.mode == mode and (r.provider, r.dtype) == key]
                g = _geomean(r.speedup for r in sel)
                dt = "" if all(r.dtype == "float32" for r in op_rows) else f" {key[1]}"
                provs.append(f"{key[0]}{dt} {_f(g, '.2f')}×")
            parts.append(f"{mode}: " + ", ".join(provs))
        n = len({r.shape for r in op_rows})
        lines.append(f"summary {op} — geometric-mean speed-up vs {base} over {n} shape"
                     f"{'s' if n != 1 else ''}: " + "; ".join(parts))
    return lines


def plot(rows: list[Row], path: str, device: str | None = None,
         device_name: str | None = None, stat: str = "median") -> bool:
    """Bar chart of the speed-ups over the baseline (one panel per op, grouped by shape and
    mode), values on the bars, a line at 1×; ``stat`` names the time they are ratios of. False
    if matplotlib is missing or nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except Exception:
        return False
    bases = {}
    for r in rows:
        if r.baseline:
            bases.setdefault(r.op, r.provider)
    rows = [r for r in rows if not r.baseline]
    ops = list(dict.fromkeys(r.op for r in rows))
    if not ops:
        return False
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = device_name or describe_device(device)
    heights, layout = [], []
    for op in ops:
        op_rows = [r for r in rows if r.op == op]
        keys = list(dict.fromkeys((r.shape, r.mode) for r in op_rows))
        provs = list(dict.fromkeys((r.provider, r.dtype) for r in op_rows))
        layout.append((op, op_rows, keys, provs))
        heights.append(max(2.0, 0.25 * len(keys) * len(provs) + 1.4))
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (op, op_rows, keys, provs) in zip(axes[:, 0], layout):
        dtypes = sorted({r.dtype for r in op_rows})
        bar_h = 0.8 / len(provs)
        vals = [r.speedup for r in op_rows if r.speedup == r.speedup and r.speedup > 0]
        lo, hi = (min(vals), max(vals)) if vals else (1.0, 1.0)
        log_axis = hi / max(lo, 1e-9) > 20
        for i, (prov, dt) in enumerate(provs):
            ys, xs = [], []
            for j, k in enumerate(keys):
                m = [r for r in op_rows if (r.shape, r.mode) == k and (r.provider, r.dtype)
                     == (prov, dt)]
                if m and m[0].speedup == m[0].speedup:
                    ys.append(j + i * bar_h)
                    xs.append(m[0].speedup)
            label = prov if len(dtypes) == 1 else f"{prov} ({dt})"
            bars = ax.barh(ys, xs, bar_h, label=label)
            ax.bar_label(bars, labels=[f"{x:.2f}×" for x in xs], padding=2, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=1, linestyle="--",
                   label=f"1× = {bases.get(op, 'the baseline')}")
        ax.set_yticks([j + 0.4 - bar_h / 2 for j in range(len(keys))])
        ax.set_yticklabels([f"{s}  [{m}]" for s, m in keys], fontsize=7)
        ax.invert_yaxis()
        if log_axis:
            ax.set_xscale("log")
            ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200)
                     if lo / 2 <= t <= hi * 2] or [1]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlim(min(lo, 1) / 1.5, max(hi, 1) * 2.5)
        else:
            ax.set_xlim(0, max(hi, 1) * 1.25)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        base = bases.get(op, "the baseline")
        ax.set_xlabel(f"speed-up = {stat} time of {base} / {stat} time (same dtype); "
                      f"> 1× is faster" + (", log scale" if log_axis else ""), fontsize=8)
        ax.set_title(f"{op}: speed-up over {base}, {stat} time\n{device_name}, "
                     f"{', '.join(dtypes)}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def cpu_peak_line(info: dict) -> str:
    """The CPU FMA peak as tables state it: measured (``cpu_info``'s ``peak_gflops_measured``)
    and estimated, or the estimate alone where nothing was measured."""
    est = f"est. {info['peak_gflops_fp32']:.0f} GFLOP/s fp32 ({info['peak_formula']})"
    if info.get("peak_gflops_measured") is None:
        return est
    return (f"measured {info['peak_gflops_measured']:.0f} GFLOP/s fp32 "
            f"({info['peak_measured_how']}); {est}")


# metadata keys for the CSV rows only (the header's cpu_peak line states them already)
_CSV_ONLY = ("cpu_peak_gflops_measured", "cpu_peak_gflops_est")


def metadata(device: str, command: str, load: "BackgroundLoad | None" = None) -> dict:
    """What every table states: date, device, CPU model, ISA, threads, background load and the
    load average, the CPU's FMA peak (measured and estimated, as a line and, for the CSV rows,
    as two numbers: ``cpu_peak_gflops_measured`` is "-" where nothing was measured),
    torch/triton versions, command."""
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "absent"
    info = cpu_info()
    la = info["loadavg"]
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": describe_device(device), "cpu": info["model"],
            "isa": info["simd"] + (f" CPU, run narrowed by {info['isa_limits']}"
                                   if info["isa_limits"] else ""),
            "isa_flags": " ".join(info["isa"]), "threads": info["threads"],
            "load": load.describe() if load is not None else "none",
            "loadavg": f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}",
            "cpu_peak": cpu_peak_line(info),
            "cpu_peak_gflops_measured": "-" if info["peak_gflops_measured"] is None
                                        else f"{info['peak_gflops_measured']:.1f}",
            "cpu_peak_gflops_est": f"{info['peak_gflops_fp32']:.1f}",
            "torch": torch.__version__, "triton": tv, "command": command}


def timing_line(device: str, rounds: int, quick: bool, smoke: bool = False,
                stat: str = "median") -> str:
    """How ``run_case`` timed this run (``stat`` as passed to it), for the table header."""
    if smoke:
        return "one call per implementation (VARFORMER_BENCH_SMOKE=1: not for numbers)"
    if device == "cuda":
        return "triton do_bench (CUDA events), median and p20/p80"
    budget = "1 s" if quick else "5 s"
    if stat == "mean":
        calls = f"{budget} of calls each in all, at least 3, no cap"
        what, why = "means", ("; means, not medians, because on a loaded machine a call's time "
                              "has a long tail that the median leaves out")
    else:
        calls, what, why = f"{budget} of calls each in all, at least 3, at most 50", "medians", ""
    if rounds <= 1:
        return (f"wall clock, one implementation after the other, {calls}; speed-up = ratio "
                f"of {what}{why}")
    return (f"wall clock, implementations of a shape interleaved in {rounds} rounds (rotated "
            f"order, {calls}); speed-up = median over rounds of the per-round ratio of "
            f"{what}{why}")


def metadata_lines(meta: dict) -> list[str]:
    """``meta`` as markdown list lines (without the CSV-only numbers)."""
    return [f"- {k}: {v}" if k != "command" else f"- command: `{v}`" for k, v in meta.items()
            if k not in _CSV_ONLY]
