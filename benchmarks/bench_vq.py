"""Multi-scale VQ: the single nearest-code lookup and VAR's whole 10-scale quantize.

Lookup (z [B·256, 32] against VAR's codebook [4096, 32], fp32): VAR's eager formula
(sum + addmm + argmin, the baseline), ``torch.cdist`` + argmin, the fused op on each of its
paths (C++ with OpenMP on CPU; Triton and CUDA C++ on CUDA) and faiss ``IndexFlatL2`` (CPU, where
faiss-cpu is installed: an optional, benchmark-only dependency).
Quantize (f [B, 32, 16, 16] -> 10 index maps, VAR's ``f_to_idxBl_or_fhat``): VAR's eager loop
against ``MultiScaleQuantizer`` (fused area + lookup + gather per scale; on CUDA also replayed
from a CUDA graph). On CPU also one scale's φ step (VAR's φ against the C++ ``phi_update``).

On CPU the C++ provider's name says which inner-kernel variant ran (``VARFORMER_CPU_ISA``, default
the widest this CPU runs) and that variant's estimated FP32 FMA peak at the benchmark's thread
count (``harness.cpu_info``'s peak scaled to the variant's vector width; the table's "% FLOP
peak" column is against the CPU's widest ISA). Lookup GFLOP/s count 2·N·V·C.

Run: ``varformer bench --op vq [--device cuda] [--quick] [--load N]``; the per-variant kernel
table (one thread, CPU time): ``python -m varformer.benchmarks.bench_vq --kernels``. An AVX2-only machine is
emulated on an AVX-512 one, for the fused kernel and the eager baseline alike, by::

    VARFORMER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    ONEDNN_MAX_CPU_ISA=AVX2 varformer bench --op vq --device cpu --quick
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from varformer.benchmarks.harness import Case, Provider, smoke
from varformer.ops import MultiScaleQuantizer, vq_lookup, vq_lookup_eager

V, C = 4096, 32
PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TOKENS = sum(p * p for p in PN)          # 680 per image


def _faiss():
    try:
        import faiss
        return faiss
    except Exception:
        return None


# FP32 FMA lanes and FLOP per lane per FMA unit and cycle of each C++ inner-kernel variant
_ISA_LANES = {"avx512": (16, 2), "avx2": (8, 2), "baseline": (4, 1)}


def cpu_kernel_label(lookup: bool = False) -> str:
    """'fused C++ (<variant>, peak ~P GFLOP/s)': the C++ CPU lookup's inner-kernel variant and
    its estimated FP32 peak here (the harness's FMA-peak model at that vector width). For the
    lookup (``lookup``) it also says 'int16 screening' where the float32 lookup screens codes in
    integers (csrc/vq_screen_kernel.h): its GFLOP/s then count the float32 distance FLOPs it
    stands for, and can exceed the float32 peak."""
    from varformer.benchmarks import harness
    from varformer.ops import _ext
    try:
        isa = _ext.cpu_isa()
    except RuntimeError as exc:
        return f"fused C++ (unavailable: {str(exc).splitlines()[0][:60]})"
    info = harness.cpu_info()
    lanes, flop = _ISA_LANES[isa]
    lanes = min(lanes, info["lanes"])       # a narrower datapath (Zen 1: 2x128-bit) caps it
    peak = info["cores_used"] * info["fma_units"] * lanes * flop * info["ghz"]
    screen = ", int16 screening" if lookup and _ext.cpu_screening().startswith("screening") else ""
    return f"fused C++ ({isa}{screen}, peak ~{peak:.0f} GFLOP/s)"


def _codebook(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, C, generator=g).to(device)


def lookup_case(B: int, device: str) -> Case:
    N = B * 256

    def inputs():
        g = torch.Generator().manual_seed(1)
        return torch.randn(N, C, generator=g).to(device), _codebook(device)

    def mk(fn):
        def make(mode):
            z, E = inputs()
            return (lambda: fn(z, E)), None
        return make

    provs = [Provider("eager (VAR formula)", torch.float32, mk(vq_lookup_eager), baseline=True),
             Provider("cdist + argmin", torch.float32,
                      mk(lambda z, E: torch.cdist(z, E).argmin(1)))]
    if device == "cuda":
        provs += [Provider("fused triton", torch.float32,
                           mk(lambda z, E: vq_lookup(z, E, backend="triton"))),
                  Provider("fused triton tf32x3", torch.float32,
                           mk(lambda z, E: vq_lookup(z, E, backend="triton",
                                                     precision="tf32x3"))),
                  Provider("fused CUDA C++", torch.float32,
                           mk(lambda z, E: vq_lookup(z, E, backend="csrc")))]
    else:
        provs.append(Provider(cpu_kernel_label(lookup=True), torch.float32,
                              mk(lambda z, E: vq_lookup(z, E, backend="csrc"))))
        faiss = _faiss()
        if faiss is not None:
            def make_faiss(mode):
                z, E = inputs()
                index = faiss.IndexFlatL2(C)
                index.add(E.numpy())
                zn = z.numpy()
                return (lambda: index.search(zn, 1)), None
            provs.append(Provider("faiss IndexFlatL2", torch.float32, make_faiss))
    flops = 2.0 * N * V * C
    return Case("vq_lookup", f"lookup N={N} (B={B}) V={V} C={C}", lambda mode: flops,
                lambda mode, dt: N * C * 4 + V * C * 4 + N * 8, provs, modes=("fwd",))


def var_eager_quantize(q: MultiScaleQuantizer, f: torch.Tensor):
    """VAR's f_to_idxBl_or_fhat as written: per scale area, sum+addmm+argmin, embedding,
    bicubic, φ; the baseline."""
    E = q.embedding.weight
    B, Cv, H, W = f.shape
    rest, fhat, out = f.clone(), torch.zeros_like(f), []
    for si, pn in enumerate(PN):
        z = rest if si == 9 else F.interpolate(rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, Cv)
        d = torch.sum(z.square(), 1, keepdim=True) + torch.sum(E.square(), 1)
        d.addmm_(z, E.T, alpha=-2, beta=1)
        idx = d.argmin(1)
        h = q.embedding(idx.view(B, pn, pn)).permute(0, 3, 1, 2)
        if si != 9:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = q._phi(si, 10)(h.contiguous())
        fhat.add_(h)
        rest.sub_(h)
        out.append(idx.view(B, -1))
    return out


def quantize_case(B: int, device: str) -> Case:
    def mk(kind):
        def make(mode):
            q = MultiScaleQuantizer(use_cuda_graph=(kind == "graph")).to(device).eval()
            q.requires_grad_(False)
            g = torch.Generator().manual_seed(2)
            f = torch.randn(B, C, 16, 16, generator=g).to(device)
            if kind == "eager":
                return (lambda: var_eager_quantize(q, f)), None
            return (lambda: q.f_to_idxBl_or_fhat(f, to_fhat=False)), None
        return make

    provs = [Provider("eager (VAR loop)", torch.float32, mk("eager"), baseline=True),
             Provider("MultiScaleQuantizer", torch.float32, mk("fused"))]
    if device == "cuda":
        provs.append(Provider("MultiScaleQuantizer + CUDA graph", torch.float32, mk("graph")))
    flops = 2.0 * B * TOKENS * V * C
    return Case("vq_quantize", f"quantize B={B} (10 scales, {B * TOKENS} tokens)",
                lambda mode: flops, lambda mode, dt: B * C * 256 * 4 * 3 + V * C * 4, provs,
                modes=("fwd",))


def phi_case(B: int) -> Case:
    """CPU: one scale's φ step of the quantizer loop at VAR's latent (B, 32, 16, 16): 3x3 conv,
    φ's mix, f_hat += p, f_rest -= p. Eager = VAR's φ on NCHW tensors (what the loop ran before
    ``phi_update``), fused = the C++ pass on the loop's channels-last tensors."""
    r = 0.5

    def make_eager(mode):
        g = torch.Generator().manual_seed(3)
        h, fh, fr = (torch.randn(B, C, 16, 16, generator=g) for _ in range(3))
        w, b = torch.randn(C, C, 3, 3, generator=g) * 0.05, torch.randn(C, generator=g)

        def run():
            p = h.mul(1 - r) + F.conv2d(h, w, b, padding=1).mul_(r)
            fh.add_(p)
            fr.sub_(p)
        return run, None

    def make_fused(mode):
        g = torch.Generator().manual_seed(3)
        h, fh, fr = (torch.randn(B, 16, 16, C, generator=g) for _ in range(3))
        w, b = torch.randn(C, C, 3, 3, generator=g) * 0.05, torch.randn(C, generator=g)
        return (lambda: torch.ops.varformer_ext.phi_update(h, w, b, 1 - r, r, fh, fr)), None

    provs = [Provider("eager (VAR's φ, NCHW)", torch.float32, make_eager, baseline=True),
             Provider(cpu_kernel_label().replace("fused C++", "fused C++ phi_update, NHWC"),
                      torch.float32, make_fused)]
    return Case("vq_phi", f"φ step B={B} (3x3 conv {C}->{C} at 16x16, mix, f_hat/f_rest)",
                lambda mode: 2.0 * B * 256 * C * C * 9, lambda mode, dt: 5 * B * 256 * C * 4,
                provs, modes=("fwd",))


def cases(device: str, quick: bool = False, dtypes=None) -> list[Case]:
    if smoke():                          # VARFORMER_BENCH_SMOKE=1: one tiny case per op
        lookups, quants = [1], [1]
    elif quick:
        lookups, quants = ([16, 64], [16]) if device == "cpu" else ([16, 64], [1, 16])
    else:
        lookups, quants = [1, 16, 64], [1, 16, 64]
    with torch.no_grad():
        return ([lookup_case(B, device) for B in lookups]
                + [quantize_case(B, device) for B in quants]
                + ([phi_case(B) for B in quants] if device == "cpu" else []))


def kernel_report(rep: int = 7) -> str:
    """One-thread CPU time (``time.thread_time``, best of ``rep``: less sensitive to a busy
    machine than wall time) of the lookup on every C++ inner-kernel variant this CPU runs
    against the eager formula, with GFLOP/s, and of the 10-scale quantize at B=16. A markdown
    table; the environment (e.g. ATEN_CPU_CAPABILITY) applies to the eager baseline."""
    import os
    import time

    from varformer.benchmarks import harness
    from varformer.ops import _ext
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = os.environ.get("VARFORMER_CPU_ISA")

    def best(fn):
        fn()
        out = float("inf")
        for _ in range(rep):
            t0 = time.thread_time()
            fn()
            out = min(out, time.thread_time() - t0)
        return out

    try:
        isas = [n for n, why in _ext.cpu_isa_table().items() if not why]
        info = harness.cpu_info(threads=1)
        lines = [f"CPU {info['model']}, eager on ATen {torch.backends.cpu.get_cpu_capability()}, "
                 f"load average {info['loadavg'][0]:.1f}, 1 thread, CPU time best of {rep}", "",
                 "| case | eager | " + " | ".join(f"C++ {n}" for n in isas) + " |",
                 "|---|---|" + "---|" * len(isas)]
        E = _codebook("cpu")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n in (4096, 16384):
                z = torch.randn(n, C, generator=g)
                te = best(lambda: vq_lookup_eager(z, E))
                cells = []
                for isa in isas:
                    os.environ["VARFORMER_CPU_ISA"] = isa
                    t = best(lambda: vq_lookup(z, E, backend="csrc"))
                    cells.append(f"{t * 1e3:.1f} ms, {2 * n * V * C / t / 1e9:.0f} GFLOP/s, "
                                 f"{te / t:.1f}x")
                lines.append(f"| lookup N={n} | {te * 1e3:.1f} ms | " + " | ".join(cells) + " |")
            q = MultiScaleQuantizer().eval().requires_grad_(False)
            f = torch.randn(16, C, 16, 16, generator=g)
            te = best(lambda: var_eager_quantize(q, f))
            cells = []
            for isa in isas:
                os.environ["VARFORMER_CPU_ISA"] = isa
                t = best(lambda: q.f_to_idxBl_or_fhat(f, to_fhat=False))
                cells.append(f"{t * 1e3:.1f} ms, {te / t:.1f}x")
            lines.append(f"| quantize B=16 | {te * 1e3:.1f} ms | " + " | ".join(cells) + " |")
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("VARFORMER_CPU_ISA", None)
        else:
            os.environ["VARFORMER_CPU_ISA"] = env
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--kernels"]:        # python -m varformer.benchmarks.bench_vq --kernels
        print(kernel_report())
        sys.exit(0)
    from varformer.cli import main
    sys.exit(main(["bench", "--op", "vq"] + sys.argv[1:]))
