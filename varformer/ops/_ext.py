"""Loader of varformer's C++/CUDA extension (``torch.ops.varformer_ext``), built on first use.

The op::

    vq_lookup(Tensor z, Tensor codebook, Tensor sqnorm, bool with_codes, int cuda_stream)
        -> (Tensor idx, Tensor dist, Tensor codes)

z [N, C], codebook [V, C], sqnorm [V] -> idx int64 [N], dist [N], codes [N, C] (or [0, C]).

    vq_cpu_isa(str request) -> str          the CPU inner-kernel variant a call runs
    vq_cpu_isa_table() -> str[]             "name|target|why not usable" per variant
    vq_cpu_screen(str request) -> str       the screening instructions a float32 call runs now
    fma_peak_gflops(int threads, float seconds, str isa="") -> float
                                            measured FP32 FMA peak (GFLOP/s) on that many threads

One shared library is built per process with ``torch.utils.cpp_extension.load`` (lean headers,
no pybind11, ``is_python_module=False``): from ``CPU_SOURCES`` on CPU-only machines, plus
``vq_lookup_cuda.cu`` where torch has CUDA and a device. The CPU lookup's inner kernel is compiled
once per ISA (avx512f+avx512bw, avx2+fma, portable; the avx512 and avx2 variants' integer
screening once more with avx512_vnni / avx_vnni) with target pragmas and picked at run time
from the CPU, or from ``VARFORMER_CPU_ISA`` = avx512 | avx2 | baseline (for tests and
benchmarks; ``VARFORMER_VQ_VNNI=0`` leaves VNNI out), so the flags are portable and a build cached on one machine is right on another. The library name
carries a hash of the sources, headers, their folder, flags, torch's version (and the host CPU
if a flag set used ``-march=native``), so a stale or foreign cached build is never loaded and
two checkouts do not rebuild one build folder in turn. The cache is
torch's (``TORCH_EXTENSIONS_DIR`` if set).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

NAMESPACE = "varformer_ext"
OP = f"{NAMESPACE}::vq_lookup"
# One entry per C++ source (the first holds the op schema).
CPU_SOURCES = (
    "vq_lookup.cpp",                    # VQ lookup: schema, checks, threads, ISA choice
    "vq_lookup_avx512.cpp",             # VQ lookup inner kernel, avx512f + avx512bw
    "vq_lookup_avx512vnni.cpp",         # its integer screening with avx512_vnni
    "vq_lookup_avx2.cpp",               # VQ lookup inner kernel, avx2 + fma
    "vq_lookup_avx2vnni.cpp",           # its integer screening with avx_vnni
    "vq_lookup_baseline.cpp",           # VQ lookup inner kernel, portable 16-byte vectors
    "window_attention.cpp",             # Swin window attention fwd/bwd (own schema fragment)
    "attention_cpu.cpp",                # softmax(q kᵀ s) v fwd/bwd (mediator attention stages)
    "fma_peak.cpp",                     # measured FP32 FMA peak (benchmark harness's ceiling)
)
CUDA_SOURCES = ("vq_lookup_cuda.cu",)
HEADERS = (                             # included by the sources; part of the build name's hash
    "cpu_isa.h",
    "cpu_math.h",
    "cpu_threads.h",
    "phi_conv_kernel.h",
    "vq_lookup_checks.h",
    "vq_lookup_isa.h",
    "vq_lookup_kernel.h",
    "vq_screen_kernel.h",
    "vq_screen_ymm.h",
)
# Tried in order until one builds: OpenMP (at::parallel_for's inline region then runs in the
# OpenMP runtime torch loaded), serial. Portable flags only: the ISA-specific kernels carry their
# own target pragmas and are chosen at run time, so a cached build is right on any x86-64 CPU.
# -fno-trapping-math: no kernel relies on floating-point traps, and without it GCC keeps the
# selects of the clamped exp/log (window attention's softmax) as branches and leaves those loops
# scalar (3-4x slower per window; NaN and infinity semantics are unchanged).
# -fno-tree-loop-distribute-patterns: the per-token row copies of the window kernel (20-320
# elements) stay inline vector loops instead of becoming a memmove call each.
CPU_FLAG_SETS = ((["-O3", "-fno-trapping-math", "-fno-tree-loop-distribute-patterns", "-fopenmp"],
                  ["-fopenmp"]),
                 (["-O3", "-fno-trapping-math", "-fno-tree-loop-distribute-patterns"], []))
CUDA_FLAGS = ["-O3", "-DNDEBUG"]

_lock = threading.Lock()
_state: dict | None = None


def csrc_dir() -> Path:
    """Directory with the C++/CUDA sources: the installed ``varformer.csrc`` package data if
    present, else ``<repo>/csrc`` next to the ``varformer`` package."""
    try:
        from importlib.resources import files
        path = Path(str(files("varformer.csrc")))
        if (path / CPU_SOURCES[0]).is_file():
            return path
    except Exception:  # not installed as a package (source checkout, editable install)
        pass
    return Path(__file__).resolve().parents[2] / "csrc"


def _cpu_id() -> str:
    """Host CPU model and ISA flags (what ``-march=native`` depends on)."""
    keys = ("model name", "flags", "features", "cpu part", "cpu implementer")
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
        lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip().lower() in keys]
        if lines:
            return "\n".join(lines)
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{platform.platform()}"


def _cxx() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        if shutil.which(name):
            return name
    return None


def _torch_cuda_reason() -> str:
    """Why torch cannot run CUDA code here ('' if it can)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "torch has CUDA support but no CUDA device is available"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return "CUDA toolkit not found (no nvcc; set CUDA_HOME)"
    return ""


def _build_name(sources: list[Path], cflags: list[str], cuda: bool) -> str:
    """varformer_ext_<hash of the sources' contents and folder, flags, torch version>. The
    folder counts because the build files name the sources' paths: two checkouts sharing one
    build folder would rebuild it in turn (and under each other's running processes)."""
    h = hashlib.sha256()
    h.update(str(Path(sources[0]).resolve().parent).encode() + b"\0")
    for src in list(sources) + [sources[0].parent / name for name in HEADERS]:
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(repr((cflags, CUDA_FLAGS if cuda else None, torch.__version__)).encode())
    if "-march=native" in cflags:
        h.update(_cpu_id().encode())
    return f"{NAMESPACE}_{h.hexdigest()[:12]}"


def _error_excerpt(exc: BaseException, lines: int = 12) -> str:
    text = str(exc).strip().splitlines()
    errors = [ln for ln in text if "error" in ln.lower()]
    return "\n".join((errors or text)[:lines])


def _has_kernel(key: str, op: str = OP) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except Exception:
        return False


def _load(sources: list[Path], cflags: list[str], ldflags: list[str], cuda: bool) -> None:
    from torch.utils import cpp_extension
    os.environ.setdefault("MAX_JOBS", "2")
    cpp_extension.load(name=_build_name(sources, cflags, cuda), sources=[str(s) for s in sources],
                       extra_cflags=cflags, extra_ldflags=ldflags,
                       extra_cuda_cflags=CUDA_FLAGS if cuda else None,
                       with_cuda=cuda, is_python_module=False, verbose=False)


def _built_with(cflags: list[str], errors: list[str]) -> dict:
    return {"cpu_flags": " ".join(cflags), "cpu_fallback": "\n".join(errors)}


def _build() -> dict:
    """Build and load the library once; returns {'cpu': (ok, why), 'cuda': (ok, why)} and, once
    built, 'cpu_flags' (the flag set that built) and 'cpu_fallback' (why earlier sets failed)."""
    if _has_kernel("CPU"):  # loaded already (by an earlier build or another loader)
        cuda_ok = _has_kernel("CUDA")
        return {"cpu": (True, ""), "cuda": (cuda_ok, "" if cuda_ok else
                                            "loaded library has no CUDA kernel"),
                "cpu_flags": "(loaded before this loader ran)", "cpu_fallback": ""}
    cuda_why = _torch_cuda_reason()
    if _cxx() is None:
        why = "no C++ compiler found (c++, g++ or clang++ on PATH, or CXX)"
        return {"cpu": (False, why), "cuda": (False, cuda_why or why)}
    root = csrc_dir()
    cpu_src = [root / s for s in CPU_SOURCES]
    missing = [str(s) for s in cpu_src + [root / s for s in CUDA_SOURCES] if not s.is_file()]
    if any(not s.is_file() for s in cpu_src):
        why = f"C++ sources not found: {', '.join(missing)}"
        return {"cpu": (False, why), "cuda": (False, why)}

    errors = []
    with_cuda = not cuda_why and not missing
    if not cuda_why and missing:
        cuda_why = f"CUDA sources not found: {', '.join(missing)}"
    for cflags, ldflags in CPU_FLAG_SETS:
        if with_cuda:
            try:
                _load(cpu_src + [root / s for s in CUDA_SOURCES], cflags, ldflags, cuda=True)
                return {"cpu": (True, ""), "cuda": (True, ""), **_built_with(cflags, errors)}
            except Exception as exc:
                errors.append(f"[{' '.join(cflags)} + CUDA] {_error_excerpt(exc)}")
                if _has_kernel("CPU"):  # loaded, so the failure came after the build
                    break
        try:
            _load(cpu_src, cflags, ldflags, cuda=False)
            if with_cuda:
                cuda_why = "CUDA build failed: " + errors[-1]
            return {"cpu": (True, ""), "cuda": (False, cuda_why), **_built_with(cflags, errors)}
        except Exception as exc:
            errors.append(f"[{' '.join(cflags)}] {_error_excerpt(exc)}")
            if _has_kernel("CPU"):
                break
    why = "C++ extension build failed:\n" + "\n".join(errors)
    if _has_kernel("CPU"):
        return {"cpu": (True, ""), "cuda": (_has_kernel("CUDA"), why)}
    return {"cpu": (False, why), "cuda": (False, cuda_why or why)}


def _status() -> dict:
    global _state
    with _lock:
        if _state is None:
            _state = _build()
        return _state


def op_kernel_status(op: str, what: str, on_ok=None) -> tuple[bool, str]:
    """(usable, reason if not) of one C++ CPU op (``op``, e.g. "varformer_ext::attention_fwd")
    of the library; builds it on first call. ``on_ok()`` runs when usable (fake registration)."""
    ok, why = cpu_status()
    if ok and not _has_kernel("CPU", op):
        return False, f"the loaded C++ library has no {what} kernel"
    if ok and on_ok is not None:
        on_ok()
    return ok, why


def cpu_status() -> tuple[bool, str]:
    """(usable, reason if not) for the C++ CPU kernel; builds the library on first call."""
    return _status()["cpu"]


def cuda_status() -> tuple[bool, str]:
    """(usable, reason if not) for the CUDA kernel; builds the library on first call."""
    why = _torch_cuda_reason()
    if why and not _has_kernel("CUDA"):
        return False, why
    return _status()["cuda"]


CPU_ISAS = ("avx512", "avx2", "baseline")   # inner-kernel variants, widest first


def cpu_isa(request: str = "") -> str:
    """The inner-kernel variant a CPU lookup runs: for ``request`` "auto" the widest this CPU
    supports, for a variant's name that variant (an error where the CPU lacks it), for ""
    what ``VARFORMER_CPU_ISA`` says (read at every call; unset = auto)."""
    ok, why = cpu_status()
    if not ok:
        raise RuntimeError(f"varformer_ext (CPU) is unavailable: {why}")
    return torch.ops.varformer_ext.vq_cpu_isa(request)


def cpu_isa_table() -> dict:
    """{variant: reason it cannot run here ('' if it can)} for every compiled-in variant."""
    ok, why = cpu_status()
    if not ok:
        return {name: why for name in CPU_ISAS}
    rows = [line.split("|", 2) for line in torch.ops.varformer_ext.vq_cpu_isa_table()]
    return {name: reason for name, _, reason in rows}


def cpu_screening() -> str:
    """How a float32 C++ lookup ranks codes now: 'screening in int16 with <instructions>,
    rescored in float32' (avx2: vpmaddwd, or vpdpwssd where the CPU has AVX-VNNI; avx512:
    vpdpwssd where it has AVX-512 VNNI, else none; VARFORMER_VQ_VNNI=0 leaves VNNI out), else
    why not (VARFORMER_VQ_SCREEN=0, baseline)."""
    if os.environ.get("VARFORMER_VQ_SCREEN", "").strip() == "0":
        return "no integer screening (VARFORMER_VQ_SCREEN=0)"
    try:
        isa = cpu_isa()
        how = torch.ops.varformer_ext.vq_cpu_screen(isa)
    except RuntimeError as exc:
        return f"no integer screening ({str(exc).splitlines()[0]})"
    if how.startswith("none: "):
        return f"no integer screening ({how[6:]})"
    return f"screening in int16 with {how}, rescored in float32"


def openmp_runtimes() -> list[str]:
    """File names of the OpenMP runtimes mapped into this process (Linux; [] elsewhere). More
    than one means two thread pools competing for the cores."""
    names = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                base = os.path.basename(path)
                if base.startswith(("libgomp", "libiomp", "libomp")) and ".so" in base:
                    names.add(os.path.realpath(path))
    except OSError:
        return []
    return sorted(names)


def _ncpu() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_FIXED = [0]     # depth of fixed_threads() blocks (process-wide)


@contextlib.contextmanager
def fixed_threads():
    """Inside, ``load_aware_threads`` returns what it is asked for: torch's thread count, and
    every result of ATen's parallel reductions that depends on it, does not follow the
    machine's load. For bit-reproducible runs (``varformer train`` uses it unless
    ``train.load_aware`` is true). The C++ kernels' own rule stays: their results do not
    depend on the thread count."""
    _FIXED[0] += 1
    try:
        yield
    finally:
        _FIXED[0] -= 1


def load_aware_threads(want: int | None = None) -> int:
    """Threads worth using for a CPU section that wants ``want`` (default: torch's count): at
    most the CPUs left free by other processes' runnable threads (the running count in
    ``/proc/loadavg``, our ``want`` threads assumed among them), at least 1. The C++ kernels
    read the same count per call to choose their pool (csrc/cpu_threads.h): OpenMP when every
    thread is free, their own helper pool (which never waits for a thread that has not started)
    when not. ``VARFORMER_LOAD_AWARE=0`` and ``fixed_threads()`` turn it off; Linux only.

    Why: on an oversubscribed machine every parallel region waits for descheduled team threads
    while the others spin (OpenMP's default wait policy), which costs far more than the work
    it shares; the VQ loop's many short regions then collapse (measured in csrc/README.md)."""
    want = torch.get_num_threads() if want is None else int(want)
    if (want <= 1 or _FIXED[0]
            or os.environ.get("VARFORMER_LOAD_AWARE", "1").strip().startswith("0")):
        return max(1, want)
    use = _free_threads(want)
    for _ in range(2):      # fewer only if it persists: one transient thread (a daemon's, a
        if use == want:     # worker still spinning) must not halve a quiet machine's section
            break
        time.sleep(5e-4)
        use = max(use, _free_threads(want))
    return use


def _free_threads(want: int) -> int:
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return want
    return max(1, min(want, _ncpu() - max(0, running - want)))


@contextlib.contextmanager
def load_aware(want: int | None = None):
    """The block on ``load_aware_threads(want)`` torch threads, torch's count restored after;
    nothing changes on a quiet machine. For CPU sections of many short parallel regions (the VQ
    loop, a whole model forward), which collapse when team threads are descheduled. The C++
    kernels inside keep asking for the count before the cut (``thread_budget``), which they
    run on their own helper pool."""
    before = torch.get_num_threads()
    use = load_aware_threads(before if want is None else want)
    if use == before:
        yield
        return
    torch.set_num_threads(use)
    prev = _set_thread_budget(before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _set_thread_budget(prev)


def _set_thread_budget(n: int) -> int:
    """Sets the threads the C++ CPU kernels may ask for beyond torch's count (0: none) and
    returns the value before; 0 and nothing set where the extension is not loaded (this does
    not build it)."""
    try:
        op = torch.ops.varformer_ext.set_cpu_thread_budget
    except (AttributeError, RuntimeError):
        return 0
    return int(op(int(n)))


def load_aware_backward(*outputs) -> None:
    """Runs the backward that reaches ``outputs`` (tensors, others ignored) on
    ``load_aware_threads()`` torch threads, decided when it reaches the first of them, and
    restores torch's count when that backward ends. CPU backward runs on the thread that
    called ``backward()``, so the count applies to its whole graph. No-op on a quiet machine,
    for tensors without grad and under torch.compile."""
    outs = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not outs or torch.compiler.is_compiling():
        return
    state = {"armed": True}

    def hook(grad):
        if state["armed"]:
            state["armed"] = False
            before = torch.get_num_threads()
            use = load_aware_threads(before)
            if use != before:
                torch.set_num_threads(use)
                prev = _set_thread_budget(before)

                def restore():
                    torch.set_num_threads(before)
                    _set_thread_budget(prev)
                torch.autograd.Variable._execution_engine.queue_callback(restore)
        return grad

    for t in outs:
        t.register_hook(hook)


def cpu_backend_info() -> dict:
    """{"available": bool, "reason": str} for ``backends()``: which inner-kernel variant the
    C++ CPU lookup runs and why, the flags it was built with, and any fallback with its cause."""
    ok, why = cpu_status()
    if not ok:
        return {"available": False, "reason": why}
    state = _status()
    try:
        isa = cpu_isa()
        env = os.environ.get("VARFORMER_CPU_ISA", "").strip()
        chosen = f"{isa} ({'VARFORMER_CPU_ISA=' + env if env else 'widest this CPU runs'})"
    except RuntimeError as exc:
        chosen = f"none: {str(exc).splitlines()[0]}"
    others = "; ".join(f"{n}: {r or 'usable'}" for n, r in cpu_isa_table().items())
    screen = cpu_screening()
    flags = state.get("cpu_flags", "")
    parts = [f"VQ lookup inner kernel {chosen}", f"float32 {screen}", f"variants {others}",
             f"built with {flags}"]
    if _has_kernel("CPU", f"{NAMESPACE}::window_attention_fwd"):
        parts.append("window attention kernel " + torch.ops.varformer_ext.window_attention_isa())
    if _has_kernel("CPU", f"{NAMESPACE}::attention_fwd"):
        parts.append("mediator attention kernel " + torch.ops.varformer_ext.attention_isa())
    if "-fopenmp" not in flags.split() and not flags.startswith("("):
        parts.append("WITHOUT OpenMP: the C++ lookup runs on one thread")
    if state.get("cpu_fallback"):
        parts.append("fell back after: " + " | ".join(state["cpu_fallback"].splitlines()[:4]))
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:
        parts.append("WARNING: several OpenMP runtimes loaded: " + ", ".join(runtimes))
    return {"available": True, "reason": "; ".join(parts)}


def lookup(z: torch.Tensor, codebook: torch.Tensor, sqnorm: torch.Tensor,
           with_codes: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest code per token. z [N, C], codebook [V, C], sqnorm [V] (contiguous, one dtype,
    one device) -> idx int64 [N], dist [N] (the minimum distance), codes [N, C] or [0, C]."""
    if z.is_cuda:
        ok, why = cuda_status()
        if not ok:
            raise RuntimeError(f"varformer_ext.vq_lookup (CUDA) is unavailable: {why}")
        with torch.cuda.device(z.device):
            stream = torch.cuda.current_stream(z.device).cuda_stream
            return torch.ops.varformer_ext.vq_lookup(z, codebook, sqnorm, with_codes, stream)
    ok, why = cpu_status()
    if not ok:
        raise RuntimeError(f"varformer_ext.vq_lookup (CPU) is unavailable: {why}")
    return torch.ops.varformer_ext.vq_lookup(z, codebook, sqnorm, with_codes, 0)


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME, CUDA_PATH, the conventional install prefix, or PATH."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            exe = Path(root) / "bin" / "nvcc"
            if exe.is_file() and os.access(exe, os.X_OK):
                return str(exe)
    return shutil.which("nvcc")


def compile_cuda_sources_check(arch: str | tuple[str, ...] = "sm_90",
                               timeout: float = 900) -> tuple[bool, str]:
    """Compile ``vq_lookup_cuda.cu`` to an object file with nvcc against this torch's headers
    (no GPU or CUDA torch needed). ``arch``: "sm_90" or several, e.g. ("sm_80", "sm_90").
    Returns (success, command and compiler output); ptxas reports register spills as warnings.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        return False, "nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda/bin, PATH)"
    from torch.utils import cpp_extension
    src = csrc_dir() / CUDA_SOURCES[0]
    if not src.is_file():
        return False, f"CUDA source not found: {src}"
    archs = [arch] if isinstance(arch, str) else list(arch)
    gencode = []
    for a in archs:
        num = a.split("_")[-1]
        gencode += ["-gencode", f"arch=compute_{num},code={a}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    # What cpp_extension.load passes to nvcc: its common flags (--expt-relaxed-constexpr, ...)
    # and C++20 (torch's headers use C++20 features; C++17 only warns), plus ours.
    common = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"]))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", "-std=c++20", *common, *CUDA_FLAGS, *gencode,
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", "-Xptxas=-warn-spills",
               *includes, str(src), "-o", str(Path(tmp) / "vq_lookup_cuda.o")]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"nvcc timed out after {timeout} s: {' '.join(cmd)}"
        log = " ".join(cmd) + "\n" + res.stdout + res.stderr
        return res.returncode == 0, log
