"""pytest-benchmark entry: `pytest benchmarks --benchmark-only` (not part of the test suite)."""
import pytest
import torch

from varformer.ops import mediator_attention, mediator_attention_official

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
SHAPE = (1, 1, 4096, 256, 160) if DEV == "cpu" else (8, 1, 16384, 1024, 160)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_mediator_attention_forward(benchmark, impl):
    B, H, N, L, d = SHAPE
    q, k, v = (torch.randn(B * H, N, d, device=DEV, dtype=DT) for _ in range(3))
    m = torch.randn(B * H, L, d, device=DEV, dtype=DT)
    if impl == "fused":
        args = [t.unsqueeze(1) for t in (q, m, k, v)]
        fn = lambda: mediator_attention(*args)  # noqa: E731
    else:
        args = [t.mT.contiguous() for t in (q, m, k, v)]
        fn = lambda: mediator_attention_official(*args, d ** -0.5)  # noqa: E731

    def run():
        with torch.no_grad():
            fn()
        _sync()
    benchmark(run)
