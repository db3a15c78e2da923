"""Benchmark harness shared by every op (installed as ``varformer.benchmarks.harness``).

* time: CUDA — ``triton.testing.do_bench`` (CUDA events, median and p20/p80, gradients reset
  between runs); CPU — wall-clock median and p20/p80 over repeated calls.
* peak memory: CUDA — ``max_memory_allocated`` above what was allocated before the call; CPU —
  the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  above the resident size before the call, the least of three calls.
* achieved TFLOP/s and GB/s from per-op counts, and the fraction of the roofline: the ideal time
  max(FLOPs / peak FLOP/s, bytes / peak bandwidth) over the measured time.
* results: CSV rows, a markdown table, one plot per op (matplotlib, optional).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import os
import platform
import re
import statistics
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


def parse_cpuinfo(text: str) -> dict:
    """Facts from ``/proc/cpuinfo`` text: ``model``, ``vendor``, ``flags`` (set), and one dict
    per processor (``processor``, ``physical id``, ``core id``, ``cpu MHz``, ``bogomips``)."""
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
            "processors": procs}


def simd_fp32_lanes(flags, vendor: str = "") -> tuple[int, str]:
    """(fp32 lanes per FMA instruction, ISA name): avx512f → 16, avx2 + fma → 8, avx → 8
    (no FMA), sse → 4, NEON (asimd) → 4. AMD's first AVX-512 cores (Zen 4: no
    ``avx512_vp2intersect``) execute 512-bit FMAs as two 256-bit halves: counted as 8 lanes."""
    flags = set(flags)
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and "avx512_vp2intersect" not in flags:
            return 8, "avx512 (2x256-bit datapath)"
        return 16, "avx512"
    if "avx2" in flags and "fma" in flags:
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
                   fma_units: int = FMA_UNITS_ASSUMED, sys_root: str = "/sys/devices/system/cpu"
                   ) -> dict:
    """FP32 FMA peak estimated from ``/proc/cpuinfo`` text: cores × FMA units × SIMD lanes ×
    2 FLOP × GHz, counting the physical cores among ``cpus`` (logical CPU ids; default all) that
    ``threads`` threads can occupy (default: all of them). Returns ``model``, ``vendor``,
    ``isa`` (list), ``simd``, ``lanes``, ``fma_units``, ``logical_cpus``, ``cores``,
    ``cores_used``, ``ghz``, ``ghz_source``, ``peak_gflops_fp32`` and ``peak_formula``."""
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
    lanes, simd = simd_fp32_lanes(parsed["flags"], parsed["vendor"])
    fma = "fma" in parsed["flags"] or simd in ("avx512", "avx512 (2x256-bit datapath)", "neon")
    ghz, source = _ghz(parsed, procs, sys_root)
    per_cycle = fma_units * lanes * (2 if fma else 1)
    peak = used * per_cycle * ghz
    formula = (f"{used} cores x {fma_units} FMA units x {lanes} lanes x "
               f"{2 if fma else 1} FLOP x {ghz:.2f} GHz ({source})")
    return {"model": parsed["model"] or platform.processor() or platform.machine(),
            "vendor": parsed["vendor"],
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


def cpu_info(threads: int | None = None, bandwidth: bool = False) -> dict:
    """This machine's CPU: ``model``, ``isa`` (list of extension flags), ``simd``, ``threads``
    (torch's thread count unless given), ``cores``, ``loadavg`` (1/5/15 min), the estimated
    ``peak_gflops_fp32`` for those threads (see ``cpu_peak_model``; ``peak_formula`` says how)
    and, with ``bandwidth=True``, the measured copy ``bandwidth_gbs``."""
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
    info = cpu_peak_model(text, cpus, threads)
    info["threads"] = threads
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        info["loadavg"] = (float("nan"),) * 3
    if bandwidth:
        info["bandwidth_gbs"] = memory_bandwidth_gbs()
    return info


def cpu_peaks(threads: int | None = None) -> Peaks:
    """Roofline ceilings of this CPU: estimated FMA peak (fp64 at half rate; bf16/fp16 counted
    at the fp32 rate, as the CPU paths compute in fp32) and the measured copy bandwidth."""
    info = cpu_info(threads, bandwidth=True)
    p = info["peak_gflops_fp32"] * 1e9
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
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs)"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


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


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory of one call above what was live before it (MB)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    peaks = []
    for _ in range(3):       # resident-set peaks vary with the allocator's state: keep the least
        _malloc_trim()
        if not _reset_hwm():
            return float("nan")
        base = _rss_kb("VmRSS")
        fn()
        peaks.append(max(0, _rss_kb("VmHWM") - base) / 1024)
        gc.collect()
    return min(peaks)


def time_ms(fn: Callable[[], object], device: str, grad_to_none=None, quick=False):
    """(median, p20, p80) milliseconds of ``fn``."""
    if device == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                 grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    fn()  # warm-up
    reps, times, t_end = 0, [], time.perf_counter() + (1.0 if quick else 5.0)
    while reps < 3 or (time.perf_counter() < t_end and reps < 50):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        reps += 1
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


# ------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Provider:
    """One implementation of an op for one shape.

    ``make(mode)`` builds inputs and returns (callable, tensors-with-grad); mode is "fwd" or
    "fwd+bwd". ``baseline`` marks the implementation speed-ups are measured against."""
    name: str
    dtype: torch.dtype
    make: Callable[[str], tuple]
    baseline: bool = False


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    flops: Callable[[str], float]       # mode -> FLOPs of one call
    nbytes: Callable[[str, torch.dtype], float]  # (mode, dtype) -> minimal bytes of one call
    providers: list
    modes: tuple = ("fwd", "fwd+bwd")


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


def run_case(case: Case, device: str, modes=None, quick=False,
             log: Callable[[str], None] = print) -> list[Row]:
    peaks = device_peaks(device)
    modes = modes or case.modes
    rows = []
    for mode in modes:
        base_ms = {}
        mode_rows = []
        for prov in case.providers:
            try:
                fn, grads = prov.make(mode)
                fn()  # warm-up: one-time allocations (thread pools, compilation) stay out
                peak = peak_memory_mb(fn, device)
                ms, p20, p80 = time_ms(fn, device, grads, quick)
                note = ""
            except Exception as exc:  # an OOM or unsupported baseline is a result, not a crash
                ms = p20 = p80 = peak = float("nan")
                note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                fn = grads = None
            finally:
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            fl, nb = case.flops(mode), case.nbytes(mode, prov.dtype)
            tfl = fl / (ms * 1e-3) / 1e12 if ms == ms else float("nan")
            gbs = nb / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
            roof = (peaks.ideal_seconds(fl, nb, prov.dtype) / (ms * 1e-3)
                    if peaks and ms == ms else float("nan"))
            row = Row(case.op, case.shape, mode, prov.name, str(prov.dtype).replace("torch.", ""),
                      ms, p20, p80, peak, tfl, gbs, roof, float("nan"), note=note)
            if prov.baseline:
                base_ms[row.dtype] = ms
            mode_rows.append(row)
            log(f"  {case.shape:<34} {mode:<8} {prov.name:<22} {row.dtype:<8} "
                f"{ms:9.3f} ms  {peak:9.1f} MB {note}")
        for r in mode_rows:
            b, b32 = base_ms.get(r.dtype), base_ms.get("float32")
            r.speedup = b / r.ms if b and r.ms == r.ms else float("nan")
            r.vs_fp32 = b32 / r.ms if b32 and r.ms == r.ms else float("nan")
        rows += mode_rows
    return rows


# ------------------------------------------------------------------------------ output
_COLS = [f.name for f in dataclasses.fields(Row)]


def write_csv(rows: list[Row], path: str, meta: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(_COLS + list(meta))
        for r in rows:
            w.writerow([getattr(r, c) for c in _COLS] + list(meta.values()))


def _f(x: float, fmt: str) -> str:
    return "-" if x != x else format(x, fmt)


def markdown(rows: list[Row]) -> str:
    head = ("| op | shape | mode | provider | dtype | median ms (p20–p80) | vs eager same dtype | "
            "vs eager fp32 | peak MB | TFLOP/s | GB/s | roofline |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        spread = f"{_f(r.ms, '.3f')} ({_f(r.p20, '.3f')}–{_f(r.p80, '.3f')})"
        roof = "-" if r.roofline != r.roofline else f"{100 * r.roofline:.0f}%"
        out.append(f"| {r.op} | {r.shape} | {r.mode} | {r.provider} | {r.dtype} | {spread} | "
                   f"{_f(r.speedup, '.2f')}× | {_f(r.vs_fp32, '.2f')}× | {_f(r.peak_mb, '.1f')} | {_f(r.tflops, '.2f')} | "
                   f"{_f(r.gbps, '.0f')} | {roof} |" + (f" {r.note}" if r.note else ""))
    return "\n".join(out)


def plot(rows: list[Row], path: str) -> bool:
    """Bar chart of speed-ups per shape and provider (one figure per op). False if no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    keys = sorted({(r.shape, r.mode) for r in rows})
    provs = sorted({f"{r.provider} {r.dtype}" for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) * max(1, len(provs)) / 3), 4))
    width = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        vals = []
        for k in keys:
            m = [r.speedup for r in rows if (r.shape, r.mode) == k and f"{r.provider} {r.dtype}" == p]
            vals.append(m[0] if m and m[0] == m[0] else 0)
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=p)
    ax.set_xticks([j + 0.4 for j in range(len(keys))])
    ax.set_xticklabels([f"{s}\n{m}" for s, m in keys], fontsize=6)
    ax.set_ylabel("speed-up vs eager (same dtype)")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.set_title(rows[0].op if rows else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def metadata(device: str, command: str) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "absent"
    return {"date": _dt.date.today().isoformat(), "device": describe_device(device),
            "torch": torch.__version__, "triton": tv,
            "command": command}
