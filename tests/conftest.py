"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before varformer.kernels is imported, so it is set here, first."""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VARFORMER_BACKEND", "auto")
# Fixed thread counts: with load-aware threads ATen's reductions (convolutions, norms) round
# differently when other processes keep CPUs busy, and comparisons of two model runs at 1e-5
# then fail on a busy machine. The tests of the load-aware rule set or clear it themselves.
os.environ.setdefault("VARFORMER_LOAD_AWARE", "0")

from varformer.benchmarks import harness as _harness  # noqa: E402

_harness.isolate_inductor_cache()   # a suite run under ATEN_CPU_CAPABILITY compiles apart

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside, for float64 references compared at 1e-12. On a busy 2-vCPU
    guest (2026-12-07) torch 2.13's float64 exp on 2 OpenMP threads returned the first thread's
    half of a tensor up to 3.3e-9 off in 5 of 25 fresh processes, without our extension loaded;
    never on 1 thread, nor with OMP_WAIT_POLICY=passive (benchmarks/results/NOTES.md)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def cpu_flags() -> set:
    """The flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
    except OSError:
        return set()
    return {w for line in first.splitlines() if line.startswith("flags")
            for w in line.partition(":")[2].split()}


def run_with_isa(script: str, variant: str) -> str:
    """Runs `script` in a fresh interpreter with VARFORMER_CPU_ISA=variant (the C++ kernels
    choose their ISA once per process); returns its stdout, asserting that it exited 0."""
    import subprocess
    import sys
    env = dict(os.environ, VARFORMER_CPU_ISA=variant)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def triton_usable() -> bool:
    from varformer.ops import _dispatch
    return _dispatch.triton_status(DEVICE)[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if ON_GPU:
        torch.cuda.empty_cache()


@pytest.fixture
def backend(request, monkeypatch):
    """Parametrize indirectly with 'reference' / 'auto' / 'triton'; sets VARFORMER_BACKEND."""
    name = request.param
    if name == "triton" and not triton_usable():
        pytest.skip("Triton unusable here")
    monkeypatch.setenv("VARFORMER_BACKEND", name)
    return name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# relative-norm tolerances per dtype: forward and gradients (fp32 accumulation everywhere)
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4),
       torch.float16: (4e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}
