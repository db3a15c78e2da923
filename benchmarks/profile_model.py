"""Where the VarFormer model spends its CPU time: fused kernels vs every op on its reference.

Runs the small preset (as ``varformer bench --op model --device cpu``) under torch.profiler,
inference (official mode, B = 1, 256²) and a paper-mode training step (B = 1), and prints per
configuration the top operators by self CPU time, and a summary of the time inside the three
fused ops' paths (mediator attention, window attention, VQ lookup) next to everything else.

Run: ``python benchmarks/profile_model.py [--rows N] [--only inference|training]``.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from varformer.models import VarFormer

# operator names that belong to each fused op's path (fused and reference formulations)
GROUPS = {
    "mediator attention": ("varformer::mediator_attention", "aten::_scaled_dot_product_flash"),
    "window attention": ("varformer::window_attention", "varformer_ext::window"),
    "vq lookup": ("varformer::vq", "varformer_ext::vq"),
}


def _model(mode, fused):
    torch.manual_seed(0)
    m = VarFormer.small(mode)
    m.use_fused_kernels = fused
    return m


def inference(fused):
    m = _model("official", fused).eval()
    m.requires_grad_(False)
    lq = torch.rand(1, 3, 256, 256) * 2 - 1

    def run():
        with torch.no_grad():
            m(lq)
    return run


def training(fused):
    m = _model("paper", fused).train()
    lq = torch.rand(1, 3, 256, 256) * 2 - 1
    gt = torch.rand(1, 3, 256, 256) * 2 - 1

    def run():
        out, lq_feat, _ = m(lq, return_all=True)
        loss = F.l1_loss(out, gt) + 0.5 * lq_feat.square().mean()
        loss.backward()
        m.zero_grad(set_to_none=True)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--only", choices=("inference", "training"))
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, loadavg {os.getloadavg()[0]:.1f}")
    for name, make in (("inference", inference), ("training", training)):
        if args.only and name != args.only:
            continue
        for fused in (True, False):
            run = make(fused)
            run()                                   # warm-up (builds, allocations)
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("step"):
                    run()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 1e3
            label = f"{name}, {'fused' if fused else 'reference ops'}"
            print(f"\n== {label}: one unprofiled call {wall * 1e3:.0f} ms wall; "
                  f"profiled self CPU total {total:.0f} ms")
            for group, prefixes in GROUPS.items():
                ms = sum(e.cpu_time_total for e in events
                         if e.key.startswith(prefixes)) / 1e3
                print(f"   {group:<20} {ms:9.1f} ms (incl. children)")
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
