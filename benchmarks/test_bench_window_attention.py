"""pytest-benchmark entry: `pytest benchmarks --benchmark-only` (not part of the test suite)."""
import pytest
import torch

from varformer.ops import window_attention, window_attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
B = 8 if DEV == "cuda" else 1
KW = dict(window_size=4, shift_size=2, num_heads=8)      # VarFormer level 1: 128², head dim 20


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_window_attention(benchmark, impl, mode):
    qkv = torch.randn(B, 128, 128, 3 * 160, device=DEV, dtype=DT, requires_grad=mode != "fwd")
    table = torch.randn(49, 8, device=DEV, requires_grad=mode != "fwd")
    fn = window_attention if impl == "fused" else window_attention_reference

    def run():
        if mode == "fwd":
            with torch.no_grad():
                fn(qkv, table.to(DT) if impl == "eager" else table, **KW)
        else:
            fn(qkv, table.to(DT) if impl == "eager" else table, **KW).sum().backward()
        if DEV == "cuda":
            torch.cuda.synchronize()
    benchmark(run)
