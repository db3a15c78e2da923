"""pytest-benchmark entry: `pytest benchmarks --benchmark-only` (not part of the test suite)."""
import pytest
import torch

from varformer.benchmarks.bench_vq import var_eager_quantize
from varformer.ops import MultiScaleQuantizer, vq_lookup, vq_lookup_eager

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_vq_lookup(benchmark, impl):
    z, E = torch.randn(16 * 256, 32, device=DEV), torch.randn(4096, 32, device=DEV)
    fn = vq_lookup if impl == "fused" else vq_lookup_eager
    benchmark(lambda: (fn(z, E), _sync()))


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_vq_quantize(benchmark, impl):
    q = MultiScaleQuantizer().to(DEV).eval().requires_grad_(False)
    f = torch.randn(16, 32, 16, 16, device=DEV)
    if impl == "fused":
        benchmark(lambda: (q.f_to_idxBl_or_fhat(f, to_fhat=False), _sync()))
    else:
        benchmark(lambda: (var_eager_quantize(q, f), _sync()))
