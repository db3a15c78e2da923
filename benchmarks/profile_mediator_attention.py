"""Per-stage CUDA timings of the Triton mediator-attention kernels (for tuning).

Prints, per shape, the time of each stage's forward and backward next to one SDPA call of the
same shape, with achieved TFLOP/s."""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from varformer.kernels import mediator_attention as kern

SHAPES = [(8, 1, 16384, 1024, 160), (8, 1, 4096, 256, 160), (8, 8, 16384, 64, 64),
          (8, 8, 65536, 16, 32), (1, 1, 16384, 1024, 160)]


def bench(fn):
    return do_bench(fn, warmup=10, rep=30)


def main():
    dt = torch.bfloat16
    print(f"{'shape':<30} {'stage':<22} {'ours ms':>9} {'sdpa ms':>9} {'ours TF/s':>10}")
    for B, H, N, L, d in SHAPES:
        q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dt) for _ in range(3))
        m = torch.randn(B, H, L, d, device="cuda", dtype=dt)
        s = d ** -0.5
        tag = f"B{B} H{H} N{N} L{L} d{d}"
        for name, (a, b, c) in (("stage1 (L over N)", (m, k, v)), ("stage2 (N over L)", (q, m, m))):
            fl = 4 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] * d
            t = bench(lambda: kern.attention_forward(a, b, c, s))
            ts = bench(lambda: F.scaled_dot_product_attention(a, b, c, scale=s))
            print(f"{tag:<30} {name + ' fwd':<22} {t:9.3f} {ts:9.3f} {fl / t / 1e9:10.1f}")
            o, lse = kern.attention_forward(a, b, c, s)
            do = torch.randn_like(o)
            t = bench(lambda: kern.attention_backward(do, a, b, c, o, lse, s))
            aa, bb, cc = (x.detach().requires_grad_() for x in (a, b, c))
            oo = F.scaled_dot_product_attention(aa, bb, cc, scale=s)
            ts = bench(lambda: oo.backward(do, retain_graph=True))
            print(f"{tag:<30} {name + ' bwd':<22} {t:9.3f} {ts:9.3f} {2.5 * fl / t / 1e9:10.1f}")


if __name__ == "__main__":
    main()
