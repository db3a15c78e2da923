"""Command line: ``varformer bench`` (and ``python -m varformer``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

OPS = {"mediator_attention": "varformer.benchmarks.bench_mediator_attention",
       "window_attention": "varformer.benchmarks.bench_window_attention",
       "vq": "varformer.benchmarks.bench_vq"}


def _bench(args) -> int:
    import torch

    if args.compile_report:
        from varformer import compile_check
        rows = compile_check.run(archs=tuple(int(a) for a in args.archs.split(",")))
        text = compile_check.report(rows)
        print(text)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "compile_report.md"), "w") as f:
                f.write(text + "\n")
        return 0 if all(r["ok"] for r in rows) else 1

    from varformer.benchmarks import harness

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("varformer bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    ops = [args.op] if args.op else list(OPS)
    for op in ops:
        if op not in OPS:
            print(f"varformer bench: unknown --op {op!r}; choose from {', '.join(OPS)}",
                  file=sys.stderr)
            return 2
    dtypes = None
    if args.dtype:
        dtypes = [getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
                          .get(x, x)) for x in args.dtype.split(",")]
    command = "varformer " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("varformer") \
        else "varformer bench " + " ".join(a for a in (args.op and f"--op {args.op}",
                                                        f"--device {device}",
                                                        args.quick and "--quick") if a)
    meta = harness.metadata(device, command)
    print(f"# varformer bench — {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"{meta['date']}")
    all_rows = []
    for op in ops:
        mod = importlib.import_module(OPS[op])
        rows = []
        csv_path = os.path.join(args.out, f"{op}_{device}.csv") if args.out else None
        if csv_path:
            os.makedirs(args.out, exist_ok=True)
            if os.path.exists(csv_path):
                os.remove(csv_path)
        for case in mod.cases(device, quick=args.quick, dtypes=dtypes):
            case_rows = harness.run_case(case, device, quick=args.quick,
                                         log=(lambda s: print(s, file=sys.stderr)))
            if csv_path:  # written per shape, so an interrupted run keeps what it measured
                harness.write_csv(case_rows, csv_path, meta)
            rows += case_rows
        all_rows += rows
        if args.out:
            harness.plot(rows, os.path.join(args.out, f"{op}_{device}.png"))
    table = harness.markdown(all_rows)
    print(table)
    if args.out:
        with open(os.path.join(args.out, f"bench_{device}.md"), "w") as f:
            f.write(f"# varformer bench\n\n- date: {meta['date']}\n- device: {meta['device']}\n"
                    f"- torch {meta['torch']}, triton {meta['triton']}\n- command: "
                    f"`{meta['command']}`\n\n{table}\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="varformer", description="varformer command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="benchmark the fused ops against eager PyTorch")
    b.add_argument("--op", help=f"one of: {', '.join(OPS)} (default: all)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    b.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    b.add_argument("--dtype", help="comma list of bf16,fp16,fp32 (default: bf16,fp32 on cuda, "
                                   "fp32 on cpu)")
    b.add_argument("--out", help="folder for CSV, markdown and plots")
    b.add_argument("--compile-report", action="store_true",
                   help="compile every Triton kernel for sm_90a/sm_80 ahead of time and print "
                        "registers, spills and shared memory per kernel and config")
    b.add_argument("--archs", default="90,80", help="with --compile-report (default 90,80)")
    args = ap.parse_args(argv)
    if args.cmd == "bench":
        return _bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
